"""RubricScoringCallback: runs each round of on-policy rubric DPO.

rollout (current policy, K samples per prompt) → judge → score → pairs → reference log-probs
→ hand the pairs to the `OnPolicyDataModule`. A round is one Lightning epoch of
``rollout.every_n_steps`` optimizer steps, so the first round runs before the first step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from rdpo.pairs import PairSelection
from rdpo.rollout import SamplingSettings, generate
from rdpo.rounds import (
    RoundSummary,
    reference_logps,
    score_rollouts,
    select_pairs,
    summarize,
    write_round,
)

log = logging.getLogger("rdpo")


class RubricScoringCallback(L.Callback):
    """Runs a round at the start of every training epoch and feeds the data module its pairs.

    Needs ``trainer.datamodule`` to be an `OnPolicyDataModule` and the LightningModule to have
    ``model`` (PEFT-wrapped VLM) and ``processor`` attributes, as `RubricDPOModule` does.
    Writes ``rounds/NNNN/{rollouts,pairs}.jsonl`` under `run_dir` when given.
    """

    def __init__(self, judge, sampling: SamplingSettings, *, aggregation: str = "lexicographic",
                 min_margin: float = 0.1, require_chosen_essential: bool = True,
                 run_dir: str | Path | None = None, ref_batch_size: int = 8,
                 reference: str = "base", reference_model=None):
        self.judge = judge
        self.sampling = sampling
        self.aggregation = aggregation
        self.min_margin = min_margin
        self.require_chosen_essential = require_chosen_essential
        self.run_dir = Path(run_dir) if run_dir else None
        self.ref_batch_size = ref_batch_size
        self.reference = reference
        self.reference_model = reference_model
        self.history: list[dict] = []
        self._prompt_cache: dict = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_round(trainer, pl_module, trainer.current_epoch)

    def run_round(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int) -> RoundSummary:
        dm = trainer.datamodule
        start = time.perf_counter()
        records = dm.round_prompts(index)
        rollouts = generate(pl_module.model, pl_module.processor, records, self.sampling,
                            prompt_cache=self._prompt_cache)
        scored = score_rollouts(self.judge, rollouts, self.aggregation)
        selection = select_pairs(scored, min_margin=self.min_margin,
                                 require_chosen_essential=self.require_chosen_essential)
        train_pairs = reference_logps(pl_module.model, dm.collator, scored, selection,
                                      self.ref_batch_size, reference=self.reference,
                                      reference_model=self.reference_model)
        dm.set_pairs(train_pairs, index)
        summary = summarize(scored, selection)
        if self.run_dir is not None:
            name = f"{index:04d}" if trainer.world_size == 1 else f"{index:04d}/rank{trainer.global_rank}"
            write_round(self.run_dir / "rounds" / name, scored, selection, train_pairs, summary)
        self._report(trainer, index, summary, selection, time.perf_counter() - start)
        return summary

    def _report(self, trainer: L.Trainer, index: int, summary: RoundSummary,
                selection: PairSelection, seconds: float) -> None:
        # Sum over ranks, so the line and the metrics describe the whole round.
        local = torch.tensor([summary.prompts, summary.responses, summary.mean_score * summary.responses,
                              summary.essential_pass_rate * summary.responses, summary.pairs,
                              summary.unknown_verdicts], dtype=torch.float64)
        total = trainer.strategy.reduce(local.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        prompts, responses, score_sum, pass_sum, pairs, unknown = total.tolist()
        row = {"round": index, "step": trainer.global_step, "prompts": int(prompts),
               "responses": int(responses), "mean_score": score_sum / max(1, responses),
               "essential_pass_rate": pass_sum / max(1, responses), "pairs": int(pairs),
               "unknown_verdicts": int(unknown), "seconds": seconds,
               "dropped": dict(selection.dropped)}
        self.history.append(row)
        self._emit(trainer, row)

    @rank_zero_only
    def _emit(self, trainer: L.Trainer, row: dict) -> None:
        line = (f"round {row['round']}: mean score {row['mean_score']:.3f}, essential pass "
                f"{row['essential_pass_rate']:.1%}, pairs {row['pairs']}/{row['prompts']} "
                f"({row['seconds']:.1f}s)")
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(line)
        else:
            log.info(line)
        metrics = {f"round/{k}": float(v) for k, v in row.items()
                   if k in ("mean_score", "essential_pass_rate", "pairs", "unknown_verdicts")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


__all__ = ["RubricScoringCallback"]
