"""The pure parts of a round: judging and scoring rollouts, pair records, reference log-probs.

`RubricScoringCallback` coordinates these; they are usable without Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rdpo.data import PairCollator, TrainPair
from rdpo.logps import sequence_logps
from rdpo.pairs import PairSelection, build_pairs
from rdpo.rollout import Rollout
from rdpo.scoring import Score, score_response


@dataclass(frozen=True)
class ScoredRollout:
    """A prompt's responses with each response's verdicts and score."""

    rollout: Rollout
    verdicts: list[dict[str, bool | None]]
    scores: list[Score]


def score_rollouts(judge, rollouts: Iterable[Rollout], aggregation: str) -> list[ScoredRollout]:
    """Judge every response against its prompt's rubric and aggregate the verdicts."""
    scored = []
    for rollout in rollouts:
        verdicts = judge.judge(rollout.record, rollout.responses)
        scores = [score_response(rollout.record.rubric, v, aggregation) for v in verdicts]
        scored.append(ScoredRollout(rollout, verdicts, scores))
    return scored


def select_pairs(scored: Sequence[ScoredRollout], *, min_margin: float,
                 require_chosen_essential: bool) -> PairSelection:
    groups = [(s.rollout.record.id, s.rollout.responses, s.scores) for s in scored]
    return build_pairs(groups, min_margin=min_margin,
                       require_chosen_essential=require_chosen_essential)


@dataclass(frozen=True)
class RoundSummary:
    """The numbers of one round (over this rank's prompts)."""

    prompts: int
    responses: int
    mean_score: float
    essential_pass_rate: float
    unknown_verdicts: int
    pairs: int


def summarize(scored: Sequence[ScoredRollout], selection: PairSelection) -> RoundSummary:
    scores = [s for item in scored for s in item.scores]
    return RoundSummary(
        prompts=len(scored),
        responses=len(scores),
        mean_score=sum(s.value for s in scores) / max(1, len(scores)),
        essential_pass_rate=sum(s.essential_pass is True for s in scores) / max(1, len(scores)),
        unknown_verdicts=sum(s.unknown for s in scores),
        pairs=len(selection.pairs),
    )


@torch.no_grad()
def reference_logps(model, collator: PairCollator, scored: Sequence[ScoredRollout],
                    selection: PairSelection, batch_size: int = 8) -> list[TrainPair]:
    """`TrainPair`s for the kept pairs, reference log-probs from the base model (adapters off).

    Computed once here, when the round builds its pairs, instead of at every DPO step.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError("reference log-probs with adapters disabled need a PEFT model")
    by_id = {s.rollout.record.id: s.rollout.record for s in scored}
    pairs = selection.pairs
    out: list[TrainPair] = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                records = [by_id[p.prompt_id] for p in chunk] * 2
                batch = collator.sequences(records, [p.chosen for p in chunk] + [p.rejected for p in chunk])
                logps = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}).cpu()
                chosen, rejected = logps.chunk(2)
                for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                    out.append(TrainPair(by_id[p.prompt_id], p.chosen, p.rejected, c, r))
    finally:
        model.train(was_training)
    return out


def write_round(directory: Path, scored: Sequence[ScoredRollout], selection: PairSelection,
                train_pairs: Sequence[TrainPair], summary: RoundSummary) -> None:
    """rollouts.jsonl (every response, its verdicts and score) and pairs.jsonl (kept pairs,
    then one summary line with the drop counts by reason)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "rollouts.jsonl", "w") as f:
        for item in scored:
            for i, (response, verdicts, score) in enumerate(
                    zip(item.rollout.responses, item.verdicts, item.scores, strict=True)):
                f.write(json.dumps({
                    "prompt_id": item.rollout.record.id, "sample": i, "response": response,
                    "verdicts": verdicts, "score": score.value,
                    "essential_pass": score.essential_pass, "unknown": score.unknown,
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
                                        "dropped": selection.dropped}}) + "\n")
