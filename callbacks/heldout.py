"""HeldoutEvaluation: the policy's held-out rubric score before the first step and after the last.

It runs inside the trainer, so the policy is evaluated where and as it trains: on its device,
in the trainer's precision context, with ZeRO-3 weights gathered. Every rank samples its shard
of the held-out prompts and the scores are gathered, so the numbers are the whole set's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from rdpo.callbacks.progress import phase
from rdpo.callbacks.round import gather_objects, score_chunks
from rdpo.callbacks.sampling import sample

from rdpo.config import RolloutConfig
from rdpo.pool import PromptRecord
from rdpo.rounds import heldout_summary
from rdpo.rundir import atomic_write

log = logging.getLogger("rdpo")


class HeldoutEvaluation(L.Callback):
    """``results["before"]`` at train start, ``results["after"]`` and ``results["gain"]`` when
    training reaches ``max_steps`` (not when it stops early, e.g. on preemption).

    `settings` is the sampling of the evaluation (a `RolloutConfig`). `before` is a result
    measured earlier (a resumed run keeps its first "before"). With `run_dir`, rank 0 writes
    ``eval_before.json`` there as soon as it is measured. `server`: sample through this
    `rdpo.rollout_server.VLLMRollout` (rollout.engine=vllm). `truth`: a
    `rdpo.demo.truth.GroundTruth`; its scores of the same answers join the results.
    `judge_chunk`: prompts judged per call (0: the whole shard at once), as in
    `RubricScoringCallback`: a cached judge keeps every verdict received before a failure.
    """

    def __init__(self, records: Sequence[PromptRecord], judge, settings: RolloutConfig, *,
                 aggregation: str = "lexicographic", seed: int = 0, before: dict | None = None,
                 run_dir: str | Path | None = None, server=None, truth=None,
                 judge_chunk: int = 0):
        self.server, self.truth, self.judge_chunk = server, truth, judge_chunk
        self.records = list(records)
        self.judge = judge
        self.settings = settings
        self.aggregation = aggregation
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir else None
        self.results: dict = {"before": before} if before else {}

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 label: str = "held-out") -> dict:
        rank, world = trainer.global_rank, trainer.world_size
        shard = self.records[rank::world]
        with phase(trainer, "sampling", len(shard) * self.settings.samples_per_prompt,
                   "responses", where=label) as shown:
            rollouts = sample(trainer, pl_module, shard, self.settings, seed=self.seed + rank,
                              prompts=getattr(trainer.datamodule, "prompts", None),
                              server=self.server, progress=shown.update)
        with phase(trainer, "judging", sum(len(r.responses) for r in rollouts), "responses",
                   where=label) as shown:
            scored = score_chunks(self.judge, rollouts, self.aggregation, self.judge_chunk,
                                  strategy="rubric", progress=shown.update)
        scored = [s for part in gather_objects(trainer, scored) for s in part]
        summary = heldout_summary(scored, self.settings)
        if self.truth is not None:
            summary |= self.truth.summary([(s.rollout.record.id, s.rollout.responses)
                                           for s in scored])
        return summary

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.records or "before" in self.results:
            return
        self.results["before"] = self.evaluate(trainer, pl_module, "held-out before")
        if self.run_dir is not None and trainer.is_global_zero:
            atomic_write(self.run_dir / "eval_before.json",
                         json.dumps(self.results["before"], indent=2) + "\n")
        self._log(trainer, "before")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.records or trainer.global_step < trainer.max_steps:
            return
        self.results["after"] = self.evaluate(trainer, pl_module, "held-out after")
        self.results["gain"] = (self.results["after"]["rubric_score"]
                                - self.results["before"]["rubric_score"])
        self._log(trainer, "after")

    def _log(self, trainer: L.Trainer, when: str) -> None:
        r = self.results[when]
        if trainer.is_global_zero:
            log.info("held-out %s: rubric score %.3f, essential pass %.1f%%, %d/%d responses "
                     "fully judged, %d cut at max_new_tokens", when, r["rubric_score"],
                     100 * r["essential_pass_rate"], r["fully_judged"], r["responses"],
                     r["truncated"])
            if "truth_score" in r:
                log.info("held-out %s: ground truth %.3f, correct %.1f%%, hallucinating %.1f%%",
                         when, r["truth_score"], 100 * r["truth_correct_rate"],
                         100 * r["hallucination_rate"])
        for logger in trainer.loggers:
            logger.log_metrics({f"heldout/{when}/rubric_score": r["rubric_score"],
                                f"heldout/{when}/essential_pass_rate": r["essential_pass_rate"]},
                               step=trainer.global_step)
