"""The pure parts of a round: judging and scoring rollouts, pair records, reference log-probs.

`RubricScoringCallback` coordinates these; they are usable without Lightning.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rdpo.config import RolloutConfig
from rdpo.engine.collate import PairCollator
from rdpo.engine.packing import pair_logps
from rdpo.judging.judges import judge_round
from rdpo.judging.scoring import Score, score_response
from rdpo.pairs import PairSelection, TrainPair, build_pairs
from rdpo.pool import PromptRecord
from rdpo.rollout import Rollout, generate


@dataclass(frozen=True)
class ScoredRollout:
    """A prompt's responses with each response's verdicts and score."""

    rollout: Rollout
    verdicts: list[dict[str, bool | None]]
    scores: list[Score]


ONE_SCORE = ("outcome", "rubric_holistic")
"""pairs.strategy values whose pairs come from one 1-10 judge score per response (`outcome_score`):
no per-criterion verdicts, so the essential gate passes vacuously."""


def outcome_score(score: int | None) -> Score:
    """A holistic 1-10 judge score as a `Score`: value (score-1)/9; None is unknown.

    Outcome mode has no essential criteria, so a known score passes them vacuously and an
    unknown one counts as an unknown essential verdict: pair selection never uses it.
    """
    if score is None:
        return Score(0.0, 0.0, 1.0, None, unknown=1, unknown_essential=1)
    value = (score - 1) / 9
    return Score(value, 1.0, value, True, unknown=0, unknown_essential=0)


def score_rollouts(judge, rollouts: Iterable[Rollout], aggregation: str,
                   strategy: str | None = None) -> list[ScoredRollout]:
    """Judge every response and score it: against its prompt's rubric (strategy ``rubric``), or
    with one holistic 1-10 verdict (``outcome``: without the rubric; ``rubric_holistic``: with
    the rubric as context; verdicts are then ``{strategy: score}``).

    `strategy` defaults to the judge's own. Every judge (`rdpo.judging.judges.Judge`) takes all prompts
    at once through ``judge_many``/``outcome_many`` (remote judges then run them concurrently).
    """
    rollouts = list(rollouts)
    strategy = strategy or judge.strategy
    items = [(r.record, r.responses) for r in rollouts]
    scored = []
    if strategy in ONE_SCORE:
        # outcome: the judge without the rubric; rubric_holistic: with it as context. Either way
        # one 1-10 score per response, recorded as {strategy: score}.
        ask = judge.outcome_many if strategy == "outcome" else judge.rubric_holistic_many
        for rollout, values in zip(rollouts, ask(items), strict=True):
            scored.append(ScoredRollout(rollout, [{strategy: v} for v in values],
                                        [outcome_score(v) for v in values]))
        return scored
    if strategy != "rubric":
        raise ValueError(f"pairs.strategy: {strategy!r} is not one of rubric, "
                         f"{', '.join(ONE_SCORE)}")
    all_verdicts = judge.judge_many(items)
    for rollout, verdicts in zip(rollouts, all_verdicts, strict=True):
        scores = [score_response(rollout.record.rubric, v, aggregation) for v in verdicts]
        scored.append(ScoredRollout(rollout, verdicts, scores))
    return scored


TRUNCATED = ("drop", "keep")


def select_pairs(scored: Sequence[ScoredRollout], *, min_margin: float,
                 require_chosen_essential: bool, truncated: str = "drop") -> PairSelection:
    """The round's pairs. ``truncated="drop"``: a response cut at the token limit is never a
    pair member; ``keep``: it competes like a finished one (and trains as sampled)."""
    if truncated not in TRUNCATED:
        raise ValueError(f"truncated {truncated!r} is not one of {', '.join(TRUNCATED)}")
    groups = [(s.rollout.record.id, s.rollout.responses, s.scores,
               s.rollout.truncated if truncated == "drop" else None) for s in scored]
    return build_pairs(groups, min_margin=min_margin,
                       require_chosen_essential=require_chosen_essential)


@dataclass(frozen=True)
class RoundSummary:
    """The numbers of one round (or of an evaluation) over some prompts."""

    prompts: int
    responses: int
    mean_score: float
    essential_pass_rate: float
    unknown_verdicts: int
    fully_judged: int
    """Responses with a verdict for every criterion."""
    truncated: int
    """Responses cut at the token limit (finish reason ``length``)."""
    pairs: int

    def as_row(self) -> dict:
        return dict(self.__dict__)


def summarize(scored: Sequence[ScoredRollout], selection: PairSelection | None = None
              ) -> RoundSummary:
    scores = [s for item in scored for s in item.scores]
    return RoundSummary(
        prompts=len(scored),
        responses=len(scores),
        mean_score=sum(s.value for s in scores) / max(1, len(scores)),
        essential_pass_rate=sum(s.essential_pass is True for s in scores) / max(1, len(scores)),
        unknown_verdicts=sum(s.unknown for s in scores),
        fully_judged=sum(s.fully_judged for s in scores),
        truncated=sum(sum(item.rollout.truncated) for item in scored),
        pairs=len(selection.pairs) if selection is not None else 0,
    )


REFERENCES = ("base", "round_start")


# -- held-out evaluation: a round without pairs ---------------------------------------------

def evaluate_policy(model, processor, records: Sequence[PromptRecord], judge,
                    settings: RolloutConfig, aggregation: str = "lexicographic",
                    seed: int = 0) -> dict:
    """Sample ``settings.samples_per_prompt`` responses per prompt and judge them against the
    rubric; `heldout_summary` of them.

    Sampling is seeded (and the global RNG state restored), so the same policy scores the same.
    Always the rubric score, whatever the judge's pairs strategy, so rubric- and outcome-trained
    policies are compared on one scale. Inside a Lightning run, `rdpo.callbacks.HeldoutEvaluation`
    does the same on every rank's shard, in the trainer's precision context.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rollouts = list(generate(model, processor, records, settings))
    return heldout_summary(score_rollouts(judge, rollouts, aggregation, strategy="rubric"),
                           settings)


def heldout_summary(scored: Sequence[ScoredRollout], settings: RolloutConfig) -> dict:
    """``rubric_score`` (mean score over all responses), ``essential_pass_rate`` (fraction of
    responses meeting every essential criterion), ``fully_judged`` (responses with a verdict for
    every criterion: unknowns count as not met, `rdpo.judging.scoring`), ``truncated`` and the counts."""
    s = summarize(scored)
    return {"rubric_score": s.mean_score, "essential_pass_rate": s.essential_pass_rate,
            "prompts": s.prompts, "responses": s.responses, "fully_judged": s.fully_judged,
            "unknown_verdicts": s.unknown_verdicts, "truncated": s.truncated,
            "temperature": settings.temperature, "samples_per_prompt": settings.samples_per_prompt}


def _reference_context(model, reference: str):
    if reference == "round_start":
        # Iterative DPO: the policy as it is now, when the round begins.
        return contextlib.nullcontext()
    if not hasattr(model, "disable_adapter"):
        raise TypeError("reference 'base' needs a PEFT model (adapters disabled) or a frozen "
                        "reference_model")
    return model.disable_adapter()


def follow_policy(ref: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Put a frozen reference copy on the policy's device and in the policy's dtypes, tensor by
    tensor, buffers included (a precision plugin such as ``bf16-true`` converts the policy only,
    rotary frequencies too)."""
    for mine, theirs in ((ref.named_parameters(), dict(policy.named_parameters())),
                         (ref.named_buffers(), dict(policy.named_buffers()))):
        for name, t in mine:
            target = theirs.get(name)
            if target is not None and (t.device, t.dtype) != (target.device, target.dtype):
                t.data = t.data.to(target.device, target.dtype)
    ref.to(next(policy.parameters()).device)  # anything left (a no-op after the first round)


def reference_logps(model, collator: PairCollator, scored: Sequence[ScoredRollout],
                    selection: PairSelection, batch_size: int = 8, *, reference: str = "base",
                    reference_model=None, precision=None, progress=None) -> list[TrainPair]:
    """`TrainPair`s for a round's kept pairs, each with the token ids its responses were sampled
    as and reference log-probs computed once, here (`with_reference_logps`)."""
    by_id = {s.rollout.record.id: s.rollout for s in scored}
    pairs = [TrainPair.of(by_id[p.prompt_id].record, p, by_id[p.prompt_id].token_ids)
             for p in selection.pairs]
    return with_reference_logps(model, collator, pairs, batch_size, reference=reference,
                                reference_model=reference_model, precision=precision,
                                progress=progress)


@torch.no_grad()
def with_reference_logps(model, collator: PairCollator, pairs: Sequence[TrainPair],
                         batch_size: int = 8, *, reference: str = "base", reference_model=None,
                         precision=None, progress=None) -> list[TrainPair]:
    """`pairs` with their reference log-probs filled in.

    `reference`: ``base`` — the model without its adapters (or `reference_model`, a frozen copy,
    for full fine-tuning); ``round_start`` — the policy as it is when the round builds its pairs
    (iterative DPO; free, since it is computed at the same moment). Instead of a reference
    forward at every DPO step, each pair costs one reference forward per round. `precision` is
    the training step's precision (Lightning: ``trainer.precision_plugin``; anything with
    ``forward_context()`` and ``convert_input(batch)``): the reference must be computed as the
    step computes the policy, inputs converted the same way, or a round's first step does not
    start at loss ln 2. `progress(n)` is told of every n pairs done.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference {reference!r} is not one of {', '.join(REFERENCES)}")
    out: list[TrainPair] = []
    ref = reference_model if reference_model is not None and reference == "base" else model
    context = (contextlib.nullcontext() if ref is not model
               else _reference_context(model, reference))
    if ref is not model:
        follow_policy(ref, model)
    device = next(model.parameters()).device
    was_training = ref.training
    ref.eval()
    try:
        with context, (precision.forward_context() if precision else contextlib.nullcontext()):
            for start in range(0, len(pairs), batch_size):
                chunk = list(pairs[start:start + batch_size])
                batch = _to(collator(chunk), device)
                chosen, rejected = pair_logps(ref, precision.convert_input(batch) if precision
                                              else batch)
                for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                    out.append(dataclasses.replace(p, ref_chosen_logp=c, ref_rejected_logp=r))
                if progress is not None:
                    progress(len(chunk))
    finally:
        ref.train(was_training)
    return out


def _to(batch: dict, device) -> dict:
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()
            if k not in ("ref_chosen_logps", "ref_rejected_logps")}


def write_round(directory: Path, scored: Sequence[ScoredRollout], selection: PairSelection,
                train_pairs: Sequence[TrainPair], summary: RoundSummary, *,
                policy: dict | None = None) -> None:
    """rollouts.jsonl (every response, its verdicts and score) and pairs.jsonl (kept pairs,
    then one summary line with the drop counts by reason and `policy`, the policy that sampled
    the round: ``{"round": r, "step": s}``, r = the round itself unless rollout.async_rounds)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "rollouts.jsonl", "w") as f:
        for item in scored:
            r = item.rollout
            for i, (response, verdicts, score) in enumerate(
                    zip(r.responses, item.verdicts, item.scores, strict=True)):
                f.write(json.dumps({
                    "prompt_id": r.record.id, "sample": i, "response": response,
                    "finish_reason": r.finish_reasons[i] if r.finish_reasons else None,
                    "verdicts": verdicts, "score": score.value,
                    "essential_pass": score.essential_pass, "unknown": score.unknown,
                    "token_ids": list(r.token_ids[i]) if r.token_ids else None,
                }, ensure_ascii=False) + "\n")
    ref = {(p.record.id, p.chosen, p.rejected): p for p in train_pairs}
    with open(directory / "pairs.jsonl", "w") as f:
        for p in selection.pairs:
            t = ref.get((p.prompt_id, p.chosen, p.rejected))
            f.write(json.dumps({
                "prompt_id": p.prompt_id, "chosen": p.chosen, "rejected": p.rejected,
                "chosen_index": p.chosen_index, "rejected_index": p.rejected_index,
                "chosen_score": p.chosen_score, "rejected_score": p.rejected_score,
                "ref_chosen_logp": t.ref_chosen_logp if t else None,
                "ref_rejected_logp": t.ref_rejected_logp if t else None,
            }, ensure_ascii=False) + "\n")
        f.write(json.dumps({"summary": {"prompts": summary.prompts, "kept": summary.pairs,
                                        "dropped": selection.dropped,
                                        "dropped_ids": selection.dropped_ids,
                                        "truncated_responses": summary.truncated,
                                        **({"policy": policy} if policy else {})}}) + "\n")


# -- the pipelined round: judge while sampling, reference passes as pairs appear -------------

@dataclass(frozen=True)
class BuiltRound:
    """What a round built on one rank: every prompt's scored responses, the kept pairs and drop
    counts, the pairs as they train (reference log-probs filled in) and the seconds each phase
    was busy (``sampling``, ``judging``, ``reference``; in a pipelined round they overlap, so
    their sum exceeds the round's wall time)."""

    scored: list[ScoredRollout]
    selection: PairSelection
    train_pairs: list[TrainPair]
    seconds: dict[str, float]


class RoundPipeline:
    """Judges a round's prompts while the rest are still being sampled, and computes reference
    log-probs as soon as judged prompts yield pairs.

    The thread that owns the model `add`s each sampled `Rollout`, in prompt order; every
    `chunk` prompts become one ``score_rollouts`` call (`judge`, `aggregation`) on a judge
    thread. One judge thread, one call at a time, in order: a call already sends up to
    judge.concurrency requests at once (rdpo.fit sizes `chunk` so that one call fills it),
    so the judge's concurrency bound holds, and a judge object (its stats, its cache, a
    local model) is never used from two threads at once. Judged chunks are taken in order;
    `select` (`select_pairs` with the round's settings) keeps their pairs, and `reference`
    (`with_reference_logps` bound to the model) fills in batches of exactly `batch_size`
    pairs, the same batches the sequential round computes (`reference_logps` batches the
    round's kept pairs in order), so the log-probs are bit for bit the same. `poll` runs the
    batches that are ready, `finish` waits for the rest; both on the model's thread.

    A judge error is raised in the caller's thread at the next `add`, `poll` or `finish`;
    leaving the context (`with RoundPipeline(...)`) after any error cancels the chunks not yet
    judged and shuts the judge thread down (waiting only for a judge call that has already
    ended). Use it as a context manager; it enters the judge's round (`judge_round`: one
    deadline over its calls) at the first call.
    """

    def __init__(self, judge, aggregation: str, *, chunk: int, select, reference,
                 batch_size: int, strategy: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.judge, self.aggregation, self.strategy = judge, aggregation, strategy
        self.chunk, self.batch_size = max(1, chunk), max(1, batch_size)
        self.select, self.reference = select, reference
        self.seconds = {"sampling": 0.0, "judging": 0.0, "reference": 0.0}
        self.judged = 0
        """Responses judged so far (taken in order by the model's thread)."""
        self.on_judged = None
        """Told of every n responses judged (a progress display), on the model's thread."""
        self._pending: list[Rollout] = []
        self._futures: collections.deque = collections.deque()
        self._scored: list[ScoredRollout] = []
        self._todo: list[TrainPair] = []
        self._done: list[TrainPair] = []
        self._stop = threading.Event()
        self._failed = False
        self._round = contextlib.ExitStack()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rdpo-judge")

    def __enter__(self) -> RoundPipeline:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        # After a judge error its call has ended: the join is immediate. After an error on the
        # model's thread (sampling) a judge call may be in flight: it is left to end on its
        # own (bounded by the judge's timeouts and round deadline), not waited for.
        self._pool.shutdown(wait=exc_type is None or self._failed, cancel_futures=True)
        self._round.close()

    def add(self, rollout: Rollout) -> None:
        """A sampled prompt; a chunk's worth goes to the judge. Raises a judge error."""
        self._pending.append(rollout)
        if len(self._pending) >= self.chunk:
            self._submit()
        self._collect(block=False)

    def poll(self) -> None:
        """Take the judged chunks and compute the reference batches that are complete."""
        self._collect(block=False)
        self._references(final=False)

    def finish(self) -> BuiltRound:
        """Judge what is left, wait for every chunk, compute the last reference batches."""
        self._submit()
        while self._futures:
            self._collect(block=True)
            self._references(final=False)
        self._references(final=True)
        # The whole round's selection, as the sequential round builds it (same pairs, same
        # order; the drop counts summed over the chunks).
        selection = self.select(self._scored)
        return BuiltRound(list(self._scored), selection, list(self._done), dict(self.seconds))

    def _submit(self) -> None:
        if not self._pending:
            return
        if not self._futures and not self._scored:
            self._round.enter_context(judge_round(self.judge))
        chunk, self._pending = self._pending, []
        self._futures.append(self._pool.submit(self._judge, chunk))

    def _judge(self, rollouts: list[Rollout]) -> list[ScoredRollout] | None:
        if self._stop.is_set():
            return None
        start = time.perf_counter()
        try:
            return score_rollouts(self.judge, rollouts, self.aggregation, self.strategy)
        except BaseException:
            self._stop.set()  # the chunks queued behind it are not judged
            raise
        finally:
            self.seconds["judging"] += time.perf_counter() - start

    def _collect(self, *, block: bool) -> None:
        while self._futures and (block or self._futures[0].done()):
            future = self._futures.popleft()
            try:
                scored = future.result()
            except BaseException:
                self._failed = True
                raise
            block = False
            self._scored += scored
            by_id = {s.rollout.record.id: s.rollout for s in scored}
            self._todo += [TrainPair.of(by_id[p.prompt_id].record, p, by_id[p.prompt_id].token_ids)
                           for p in self.select(scored).pairs]
            n = sum(len(s.rollout.responses) for s in scored)
            self.judged += n
            if self.on_judged is not None:
                self.on_judged(n)

    def _references(self, *, final: bool) -> None:
        while len(self._todo) >= self.batch_size or (final and self._todo):
            batch, self._todo = self._todo[:self.batch_size], self._todo[self.batch_size:]
            start = time.perf_counter()
            self._done += self.reference(batch)
            self.seconds["reference"] += time.perf_counter() - start
