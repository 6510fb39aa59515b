"""RubricScoringCallback: runs each round of on-policy rubric DPO.

rollout (current policy, K samples per prompt) → judge → score → pairs → reference log-probs
→ hand the pairs to the `OnPolicyDataModule`. A round is one Lightning epoch of
``rollout.every_n_steps`` optimizer steps, so the first round runs before the first step.
With several ranks each rank runs its own shard; the round's results are gathered so every
rank reports the same numbers and rank 0 writes the artifacts once, complete.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from rdpo.callbacks.ahead import AheadRound, Snapshot, policy_weights
from rdpo.callbacks.progress import phase
from rdpo.callbacks.sampling import (
    gathered_for_generation,
    iter_sample,
    publish,
    round_seed,
    sample,
    server_rollouts,
)

from rdpo.config import JudgeConfig, PairsConfig, RolloutConfig
from rdpo.cost import FILE as COST_FILE
from rdpo.cost import WRITE_EVERY, CostLedger, Prices, RoundCost, round_row, sampled_tokens
from rdpo.engine.encode import end_of_turn_id
from rdpo.judging import audit as auditing
from rdpo.judging.judges import judge_round
from rdpo.pairs import PairSelection, TrainPair
from rdpo.rounds import (
    BuiltRound,
    RoundPipeline,
    RoundSummary,
    ScoredRollout,
    reference_logps,
    score_rollouts,
    select_pairs,
    summarize,
    with_reference_logps,
    write_round,
)
from rdpo.strategy import is_deepspeed

log = logging.getLogger("rdpo")


def merge_selections(selections: list[PairSelection]) -> PairSelection:
    """The kept pairs and drop counts of several ranks as one selection."""
    dropped: dict[str, int] = {}
    dropped_ids: dict[str, list[str]] = {}
    for s in selections:
        for reason, n in s.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
        for reason, ids in s.dropped_ids.items():
            dropped_ids.setdefault(reason, []).extend(ids)
    return PairSelection([p for s in selections for p in s.pairs], dropped, dropped_ids)


class RubricScoringCallback(L.Callback):
    """Runs a round at the start of every training epoch and feeds the data module its pairs.

    Needs ``trainer.datamodule`` to be an `OnPolicyDataModule` and the LightningModule to have
    ``model`` (PEFT-wrapped VLM) and ``processor`` attributes, as `RubricDPOModule` does.
    `rollout` and `pairs` are the config sections of the same names (`rdpo.config`). Sampling
    and the reference pass run in the trainer's precision context, as the training step does.
    Writes ``rounds/NNNN/{rollouts,pairs}.jsonl`` under `run_dir` when given (rank 0, all
    ranks' rollouts). `judge_chunk`: prompts judged per call (0: the whole round at once, or,
    pipelined, ``rollout.batch_size`` per call); a cached judge stores each call's verdicts, so
    a run killed mid-judging loses at most the call in flight. `server`: a
    `rdpo.rollout_server.VLLMRollout` to sample through (rollout.engine=vllm); None samples
    with ``generate``. With ``rollout.pipeline`` (the default) judging runs on a thread while
    the round samples (`_pipelined`); each rank pipelines its own shard, and the gathers of
    the round's results stay where they are. History rows carry each phase's busy seconds
    (``sampling_seconds``, ``judging_seconds``, ``reference_seconds``) beside ``seconds``, and
    the policy that sampled the round (``policy_round``, ``policy_step``). With
    ``rollout.async_rounds`` the next round is sampled from the policy as this round starts and
    judged while this round trains (`rdpo.callbacks.ahead`).
    """

    def __init__(self, judge, rollout: RolloutConfig | None = None,
                 pairs: PairsConfig | None = None, *, run_dir: str | Path | None = None,
                 ref_batch_size: int = 8, reference: str = "base", reference_model=None,
                 seed: int = 0, judge_chunk: int = 0, server=None,
                 judge_settings: JudgeConfig | None = None, audit=None):
        self.judge = judge
        self.server = server
        self.rollout = rollout or RolloutConfig()
        self.pairs = pairs or PairsConfig()
        self.run_dir = Path(run_dir) if run_dir else None
        self.ref_batch_size = ref_batch_size
        self.reference = reference
        self.reference_model = reference_model
        self.seed = seed
        self.judge_chunk = judge_chunk
        self.history: list[dict] = []
        self._ahead: AheadRound | None = None
        """The next round, being built while this one trains (rollout.async_rounds)."""
        self._restored: Snapshot | None = None
        """A checkpoint's sampling policy for a round not yet built, until training resumes."""
        self._init_accounts(judge_settings or JudgeConfig(), audit)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if self._restored is not None:
            # Resumed while the next round was being built: build it again from the same policy
            # (the same seed: the same rollouts and pairs), round r+1 while round r trains.
            snapshot, self._restored = self._restored, None
            if snapshot.target in (trainer.current_epoch, trainer.current_epoch + 1):
                self._start_ahead(trainer, pl_module, snapshot, restored=True)
        if dm.round == trainer.current_epoch:
            # Resumed from a checkpoint saved after this round was built: its pairs (with their
            # reference log-probs) came back with the checkpoint; nothing is sampled or judged.
            log.info("round %d: pairs restored from the checkpoint", dm.round)
            if trainer.is_global_zero and self.history:
                self._emit(trainer, self.history[-1])  # the metrics rows restart at the checkpoint
        else:
            self.run_round(trainer, pl_module, trainer.current_epoch)
        self._trained_at = time.perf_counter()  # the round's training seconds start here

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch.get("empty") and is_deepspeed(trainer):
            # A rank whose round kept no pair: under DeepSpeed its zero-loss step must still run
            # the forward and backward the others run (ZeRO-3 gathers each layer's weights in
            # a collective; ZeRO-2 lays the gradients out for the reduction in the order
            # backward produced them). A one-token pair of the pool's first prompt, whose
            # loss the module multiplies by zero (`RubricDPOModule`).
            dm = trainer.datamodule
            end = (end_of_turn_id(pl_module.processor),)
            filler = dm.collator([TrainPair(dm.records[0], "", "", 0.0, 0.0, end, end)])
            batch.update(move_data_to_device(filler, pl_module.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        trainer.datamodule.batches_done = batch_idx + 1
        self._count_training(trainer)

    def run_round(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int) -> RoundSummary:
        dm = trainer.datamodule
        start = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.index == index:
            # Sampled when the previous round started, judged while it trained.
            cost, policy = ahead.cost, ahead.snapshot.record
            with phase(trainer, "judging (rest), reference log-probs", 1, "rounds"):
                built = ahead.take()
        else:
            if ahead is not None:
                ahead.close()
            records = dm.round_prompts(index)
            cost = RoundCost(self.judge, self.audit)  # the judges' counters as the round begins
            policy = {"round": index, "step": trainer.global_step}
            seed = round_seed(self.seed, index, trainer.global_rank)
            build = self._pipelined if self.rollout.pipeline else self._sequential
            built = build(trainer, pl_module, records, seed)
        scored, selection, train_pairs = built.scored, built.selection, built.train_pairs
        dm.set_pairs(train_pairs, index)
        # Every rank gets every rank's results: the numbers are the whole round's on each rank.
        parts = gather_objects(trainer, (scored, selection, train_pairs, dm.pair_usage()))
        scored_all = [s for part in parts for s in part[0]]
        selection_all = merge_selections([part[1] for part in parts])
        pairs_all = [p for part in parts for p in part[2]]
        summary = summarize(scored_all, selection_all)
        if self.run_dir is not None and trainer.is_global_zero:
            _write_once(self.run_dir / "rounds" / f"{index:04d}", scored_all, selection_all,
                        pairs_all, summary, policy)
        accounts = self._account(trainer, index, cost, built, scored_all, summary)
        if self.rollout.async_rounds and _runs_round(trainer, index + 1, self.rollout):
            # Before the round's seconds are taken: with the transformers engine the next
            # round's sampling runs here, and training waits for it.
            self._start_ahead(trainer, pl_module,
                              Snapshot.of(pl_module.model, index, trainer.global_step))
        usage = [part[3] for part in parts]
        self._report(trainer, index, summary, selection_all, time.perf_counter() - start,
                     [len(part[2]) for part in parts], {**accounts,
                         "pair_uses_min": min(u["pair_uses_min"] for u in usage),
                         "pair_uses_max": max(u["pair_uses_max"] for u in usage),
                         "pairs_unused": sum(u["pairs_unused"] for u in usage),
                         **{f"{name}_seconds": s for name, s in built.seconds.items()},
                         "policy_round": policy["round"], "policy_step": policy["step"]})
        return summary

    def _start_ahead(self, trainer, pl_module, snapshot: Snapshot, *, restored: bool = False) -> None:
        """Start building round ``snapshot.target`` from the snapshot's policy (`restored`: not
        the model's current weights, which are loaded for the sampling and put back)."""
        dm, model, index = trainer.datamodule, pl_module.model, snapshot.target
        records = dm.round_prompts(index)
        seed = round_seed(self.seed, index, trainer.global_rank)
        weights = snapshot if restored else None
        cost = RoundCost(self.judge, self.audit)
        pipeline = self._pipeline(trainer, pl_module).__enter__()
        where = f"round {index} (ahead)"
        try:
            if self.server is None:
                with policy_weights(model, weights):
                    self._sample_into(pipeline, trainer, pl_module, records, seed, where)
                self._ahead = AheadRound(index, snapshot, pipeline, cost)
                return
            with policy_weights(model, weights):
                publish(trainer, pl_module, self.server, step=snapshot.step)  # collective
        except BaseException as err:
            pipeline.__exit__(type(err), err, err.__traceback__)
            raise
        # The server samples on a thread of its own, from the adapter published at the
        # snapshot's step, with a prompt cache of its own (the trainer's is not thread-safe).
        from rdpo.engine.encode import PromptCache

        server, processor = self.server, pl_module.processor
        rollouts = server_rollouts(pl_module, records, self.rollout, seed=seed,
                                    prompts=PromptCache(processor, max_mb=0), server=server)

        def feed(stop) -> None:
            with contextlib.closing(rollouts):
                for rollout in rollouts:
                    if stop.is_set():
                        return
                    pipeline.add(rollout)

        self._ahead = AheadRound(index, snapshot, pipeline, cost, feed)

    def _sequential(self, trainer, pl_module, records, seed: int) -> BuiltRound:
        """Sample every prompt, then judge every response, then the reference pass."""
        dm = trainer.datamodule
        k = self.rollout.samples_per_prompt
        seconds = {}
        clock = time.perf_counter()
        with phase(trainer, "sampling", len(records) * k, "responses") as shown:
            rollouts = sample(trainer, pl_module, records, self.rollout, seed=seed,
                              prompts=dm.prompts, server=self.server, progress=shown.update)
        seconds["sampling"], clock = time.perf_counter() - clock, time.perf_counter()
        with phase(trainer, "judging", len(records) * k, "responses") as shown:
            scored = self._score(rollouts, shown.update)
        seconds["judging"], clock = time.perf_counter() - clock, time.perf_counter()
        selection = self._select(scored)
        # Under ZeRO-3, gathered: each rank computes its own pairs, as many batches as it kept.
        with phase(trainer, "reference log-probs", len(selection.pairs), "pairs") as shown, \
                gathered_for_generation(trainer, pl_module.model):
            train_pairs = reference_logps(pl_module.model, dm.collator, scored, selection,
                                          self.ref_batch_size, reference=self.reference,
                                          reference_model=self.reference_model,
                                          precision=trainer.precision_plugin,
                                          progress=shown.update)
        seconds["reference"] = time.perf_counter() - clock
        return BuiltRound(scored, selection, train_pairs, seconds)

    def _pipelined(self, trainer, pl_module, records, seed: int) -> BuiltRound:
        """The round as a pipeline (`rdpo.rounds.RoundPipeline`): each chunk of prompts is
        judged on a judge thread as soon as it is sampled; the reference pass, which needs the
        model, runs on this thread.

        Where the reference pass goes: with the transformers engine this thread samples, so
        sampling and the reference pass share one device and one thread and cannot overlap
        each other; running reference batches between generation batches would only reorder
        that thread's work (and switch the adapters off and on inside a generation) without
        shortening it. So they run after sampling, while the judge finishes the last chunks:
        the round takes about max(sampling + reference, judging + the last chunk's reference).
        With the vLLM engine the server samples and this thread only waits for answers, so
        reference batches run here between arriving prompts: about max(sampling, judging +
        reference). Same rollouts, pairs and losses as `_sequential` for the same seed.
        """
        dm, model = trainer.datamodule, pl_module.model
        k = self.rollout.samples_per_prompt
        with self._pipeline(trainer, pl_module) as pipeline:
            clock = time.perf_counter()
            if self.server is None:
                self._sample_into(pipeline, trainer, pl_module, records, seed)
                with phase(trainer, "judging, reference log-probs", len(records) * k,
                           "responses") as shown, gathered_for_generation(trainer, model):
                    shown.update(pipeline.judged)
                    pipeline.on_judged = shown.update
                    return pipeline.finish()
            # vLLM: publishing is collective (as in `sample`); then, under ZeRO-3, the weights
            # stay gathered for the reference batches run between arriving prompts.
            publish(trainer, pl_module, self.server)
            with phase(trainer, "sampling, judging, reference log-probs", len(records) * k,
                       "responses") as shown, gathered_for_generation(trainer, model), \
                    contextlib.closing(server_rollouts(pl_module, records, self.rollout,
                                                        seed=seed, prompts=dm.prompts,
                                                        server=self.server)) as rollouts:
                for rollout in rollouts:
                    pipeline.add(rollout)
                    pipeline.poll()
                    shown.update(len(rollout.responses))
                pipeline.seconds["sampling"] = time.perf_counter() - clock
                return pipeline.finish()

    def _sample_into(self, pipeline: RoundPipeline, trainer, pl_module, records, seed: int,
                     where: str | None = None) -> None:
        """Sample `records` with the transformers engine on this thread, each prompt handed to
        `pipeline` as it comes (its judge thread starts on it); the seconds go to its account."""
        clock = time.perf_counter()
        with phase(trainer, "sampling", len(records) * self.rollout.samples_per_prompt,
                   "responses", where) as shown, \
                contextlib.closing(iter_sample(trainer, pl_module, records, self.rollout, seed=seed,
                                               prompts=trainer.datamodule.prompts)) as rollouts:
            for rollout in rollouts:
                pipeline.add(rollout)
                shown.update(len(rollout.responses))
        pipeline.seconds["sampling"] = time.perf_counter() - clock

    def _pipeline(self, trainer, pl_module) -> RoundPipeline:
        # The same batches as `reference_logps`: the pipeline hands `ref_batch_size` pairs.
        reference = functools.partial(
            with_reference_logps, pl_module.model, trainer.datamodule.collator,
            batch_size=self.ref_batch_size, reference=self.reference,
            reference_model=self.reference_model, precision=trainer.precision_plugin)
        return RoundPipeline(self.judge, self.pairs.aggregation,
                             chunk=self.judge_chunk or self.rollout.batch_size,
                             select=self._select, reference=reference,
                             batch_size=self.ref_batch_size)

    def _select(self, scored) -> PairSelection:
        return select_pairs(scored, min_margin=self.pairs.min_margin,
                            require_chosen_essential=self.pairs.require_chosen_essential,
                            truncated=self.rollout.truncated)

    def _score(self, rollouts, progress=None) -> list[ScoredRollout]:
        return score_chunks(self.judge, rollouts, self.pairs.aggregation, self.judge_chunk,
                            progress=progress)

    def _report(self, trainer: L.Trainer, index: int, summary: RoundSummary,
                selection: PairSelection, seconds: float, pairs_per_rank: list[int],
                usage: dict) -> None:
        row = {"round": index, "step": trainer.global_step, **summary.as_row(),
               "seconds": seconds, "dropped": dict(selection.dropped),
               "pairs_per_rank": pairs_per_rank, **usage}
        self.history.append(row)
        if trainer.is_global_zero:
            self._emit(trainer, row)

    def _emit(self, trainer: L.Trainer, row: dict) -> None:
        line = (f"round {row['round']}: mean score {row['mean_score']:.3f}, essential pass "
                f"{row['essential_pass_rate']:.1%}, pairs {row['pairs']}/{row['prompts']} "
                f"({row['seconds']:.1f}s)")
        if row.get("truncated"):
            line += f"; {row['truncated']}/{row['responses']} responses cut at max_new_tokens"
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(line)
        else:
            log.info(line)
        metrics = {f"round/{k}": float(v) for k, v in row.items() if k in ROUND_METRICS}
        metrics |= {f"round/dropped/{k}": float(v) for k, v in row.get("dropped", {}).items()}
        metrics |= _flat_metrics("round/cost", row.get("cost", {}))
        metrics |= _flat_metrics("round/audit", row.get("audit", {}))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict:
        # The next round's sampling policy (rank 0's copy: every rank trains the same weights).
        ahead = self._ahead.snapshot if self._ahead is not None else self._restored
        return {"history": self.history, "cost": self.ledger.state(),
                "audit": self.audit_log.state() if self.audit_log else None,
                "ahead": ahead.state() if ahead is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = Snapshot.from_state(state_dict.get("ahead"))
        self.history = list(state_dict.get("history", []))
        self.ledger.load(state_dict.get("cost"))
        if self.audit_log is not None:
            self.audit_log.load(state_dict.get("audit"))

    # -- what rounds cost (run.dir/cost.json) and the audit judge's watch (judge_audit.json)

    def _init_accounts(self, settings: JudgeConfig, audit) -> None:
        self.audit, self.audit_fraction = audit, settings.audit_fraction
        self.ledger = CostLedger(self.run_dir / COST_FILE if self.run_dir else None,
                                 Prices.of(settings), Prices.of(settings.audit))
        self.audit_log = None if audit is None else auditing.AuditLog(
            self.run_dir / auditing.FILE if self.run_dir else None,
            getattr(audit, "name", type(audit).__name__), self.audit_fraction)
        # The judges' work outside rounds (held-out evaluation): all of it, less the rounds'.
        self._outside = {"start": RoundCost(self.judge, audit), "rounds": []}
        self._trained_at: float | None = None

    def _account(self, trainer: L.Trainer, index: int, cost: RoundCost, built: BuiltRound,
                 scored_all: list[ScoredRollout], summary: RoundSummary) -> dict:
        """The round's cost row and, with an audit judge, its audit (each rank audits a sample
        of its own pairs, `rdpo.judging.audit`); gathered from every rank; rank 0 writes
        cost.json, judge_audit.json and rounds/NNNN/judge_audit.json. Returns the history row's
        ``cost`` and ``audit`` entries (collective: every rank calls it)."""
        audited, seconds = [], dict(built.seconds)
        if self.audit is not None:
            clock = time.perf_counter()
            sample = auditing.audit_sample(built.selection.pairs, self.audit_fraction,
                                           seed=self.seed, round_index=index)
            with phase(trainer, "audit", 2 * len(sample), "responses"):
                audited = auditing.audit_round(self.audit, built.scored, sample,
                                               self.pairs.aggregation)
            seconds["audit"] = time.perf_counter() - clock
        part = cost.part(seconds)
        self._outside["rounds"].append(part)
        parts = gather_objects(trainer, (part, audited))
        row = round_row(index, trainer.global_step, [p[0] for p in parts],
                        *sampled_tokens(scored_all), summary.pairs)
        self.ledger.put(row)
        out = {"cost": next(r for r in self.ledger.document()["rounds"] if r["round"] == index)}
        del out["cost"]["seconds"]["training"]  # logged when the round's training ends
        if self.audit_log is not None:
            audited = [a for p in parts for a in p[1]]
            out["audit"] = auditing.summarize(index, trainer.global_step, audited)
            warning = self.audit_log.put(out["audit"])
            if warning and trainer.is_global_zero:
                log.warning("round %d: %s", index, warning)
        if trainer.is_global_zero:
            self.ledger.write()
            if self.audit_log is not None:
                self.audit_log.write()
                if self.run_dir is not None:
                    from rdpo.rundir import atomic_write

                    atomic_write(self.run_dir / "rounds" / f"{index:04d}" / auditing.FILE,
                                 json.dumps({**out["audit"], "judge": self.audit_log.judge,
                                             "audited": audited}, indent=1) + "\n")
        return out

    def _count_training(self, trainer: L.Trainer, *, final: bool = False) -> None:
        """Add the seconds since the last call to the current round's training seconds; rank 0
        writes cost.json at most every `rdpo.cost.WRITE_EVERY` seconds (`final`: now)."""
        if self._trained_at is None:
            return
        now = time.perf_counter()
        self.ledger.add_training(trainer.current_epoch, now - self._trained_at)
        self._trained_at = None if final else now
        if trainer.is_global_zero:
            self.ledger.write(at_most_every=0.0 if final else WRITE_EVERY)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count_training(trainer, final=True)
        row = next((r for r in self.ledger.rows if r["round"] == trainer.current_epoch), None)
        if trainer.is_global_zero and row is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"round/cost/seconds/training": row["seconds"]["training"]},
                                   step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path and trainer.is_global_zero:
            # Resumed: the checkpoint's rows stand; what cost.json holds beyond them is redone.
            self.ledger.continue_file()
            self.ledger.write()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A run that stops (an error, preemption, max_steps inside a round) abandons the round
        # it was building; a resume builds it again from the checkpoint's snapshot.
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The held-out evaluation ran before this (`HeldoutEvaluation` comes first): what the
        # judges did in this process, less the rounds, over every rank (collective).
        total = self._outside["start"].part()
        del total["seconds"]
        for part in self._outside["rounds"]:
            total = {k: v - part[k] for k, v in total.items()}
        parts = gather_objects(trainer, total)
        if trainer.is_global_zero:
            self.ledger.add_outside({k: sum(p[k] for p in parts) for k in parts[0]})
            self.ledger.write()


def _flat_metrics(prefix: str, tree: dict) -> dict[str, float]:
    """Numbers of a nested dict as ``prefix/key/...`` metrics (None and the round's own index
    and step left out)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat_metrics(f"{prefix}/{key}", value)
        elif isinstance(value, (int, float)) and key not in ("round", "step"):
            out[f"{prefix}/{key}"] = float(value)
    return out


ROUND_METRICS = ("mean_score", "essential_pass_rate", "pairs", "unknown_verdicts", "fully_judged",
                 "truncated", "pair_uses_min", "pair_uses_max", "pairs_unused", "seconds")


def _runs_round(trainer: L.Trainer, index: int, rollout: RolloutConfig) -> bool:
    """Whether the run reaches round `index` (it starts at step index × every_n_steps)."""
    return trainer.max_steps < 0 or index * rollout.every_n_steps < trainer.max_steps


def gather_objects(trainer: L.Trainer, obj) -> list:
    """Every rank's `obj`, in rank order (picklable objects; `[obj]` on one process)."""
    if trainer.world_size == 1:
        return [obj]
    out = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _write_once(directory: Path, scored, selection, train_pairs, summary, policy=None) -> None:
    """Write the round's files next to `directory`, then move them in: a reader (or a resumed
    run) sees a round's folder complete or not at all."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_round(tmp, scored, selection, train_pairs, summary, policy=policy)
    shutil.rmtree(directory, ignore_errors=True)  # a round a killed run had already written
    tmp.rename(directory)


def score_chunks(judge, rollouts, aggregation: str, chunk: int, *, strategy: str | None = None,
                 progress=None) -> list[ScoredRollout]:
    """`score_rollouts` over `chunk` prompts per judge call (0: all at once), in one judge round
    (`rdpo.judging.judges.judge_round`: one deadline, judge.round_timeout, over every call)."""
    size = chunk or len(rollouts) or 1
    scored: list[ScoredRollout] = []
    with judge_round(judge):
        for i in range(0, len(rollouts), size):
            scored += score_rollouts(judge, rollouts[i:i + size], aggregation, strategy)
            if progress is not None:
                progress(sum(len(r.responses) for r in rollouts[i:i + size]))
    return scored


__all__ = ["RubricScoringCallback", "gather_objects", "merge_selections", "score_chunks"]
