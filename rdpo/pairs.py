"""Rubric-based filtering: turn each prompt's scored responses into at most one DPO pair.

Per prompt, the best-scored response is chosen and the worst rejected, then filters drop
pairs that would teach nothing (ties, small margins) or the wrong thing (a chosen response
that misses an essential criterion). Every drop is counted by reason so the round's
`pairs.jsonl` shows what was left out and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from rdpo.engine.encode import Completion
from rdpo.judging.scoring import Score
from rdpo.pool import PromptRecord

DROP_REASONS = (
    "truncated",
    "too_few_eligible",
    "tie",
    "below_margin",
    "chosen_fails_essential",
    "identical_text",
)

# Scores are sums of float fractions: two mathematically equal scores reached through different
# weights may differ in the last bits, and must still count as a tie.
_EPS = 1e-9


@dataclass(frozen=True)
class Pair:
    """One DPO pair; indices point into the prompt's response list."""

    prompt_id: str
    chosen: str
    rejected: str
    chosen_index: int
    rejected_index: int
    chosen_score: float
    rejected_score: float


@dataclass
class PairSelection:
    """The kept pairs of a round and, per drop reason, how many prompts it removed."""

    pairs: list[Pair]
    dropped: dict[str, int]
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> prompt ids dropped for it, so artifacts can say which prompts went."""

    def to_json(self) -> dict:
        """A JSON-ready summary: kept count, drop counts and ids, and the pairs."""
        return {
            "kept": len(self.pairs),
            "dropped": dict(self.dropped),
            "dropped_ids": {k: list(v) for k, v in self.dropped_ids.items()},
            "pairs": [asdict(p) for p in self.pairs],
        }


def select_pair(
    prompt_id: str,
    responses: Sequence[str],
    scores: Sequence[Score],
    *,
    min_margin: float = 0.0,
    require_chosen_essential: bool = True,
    truncated: Sequence[bool] | None = None,
) -> Pair | str:
    """Pick (chosen, rejected) for one prompt, or return the reason (one of `DROP_REASONS`).

    Responses with an unknown essential verdict are never used: their score could hide a
    failed essential criterion. Responses flagged in `truncated` (cut at the token limit, when
    the round drops them) are never used either: a pair member teaches where an answer ends;
    ``truncated`` is the reason when they are why fewer than two responses are left.
    Among eligible responses, chosen is the highest score and
    rejected the lowest; ties go to the lowest index (for rejected, the lowest index other
    than the chosen one), so selection is deterministic. Filters apply in the order of
    `DROP_REASONS`.
    """
    if len(responses) != len(scores):
        raise ValueError(
            f"prompt {prompt_id!r}: {len(responses)} responses but {len(scores)} scores"
        )
    known = [i for i, s in enumerate(scores) if s.unknown_essential == 0]
    eligible = [i for i in known if not (truncated and truncated[i])]
    if len(eligible) < 2:
        return "too_few_eligible" if len(known) < 2 else "truncated"
    # max/min return the first extreme element, i.e. the lowest index among equals.
    best = max(eligible, key=lambda i: scores[i].value)
    worst = min((i for i in eligible if i != best), key=lambda i: scores[i].value)
    gap = scores[best].value - scores[worst].value
    if gap <= _EPS:
        return "tie"
    if gap + _EPS < min_margin:
        return "below_margin"
    if require_chosen_essential and scores[best].essential_pass is not True:
        return "chosen_fails_essential"
    if responses[best].strip() == responses[worst].strip():
        return "identical_text"
    return Pair(
        prompt_id=prompt_id,
        chosen=responses[best],
        rejected=responses[worst],
        chosen_index=best,
        rejected_index=worst,
        chosen_score=scores[best].value,
        rejected_score=scores[worst].value,
    )


def build_pairs(
    groups: Iterable[tuple[str, Sequence[str], Sequence[Score]]
                     | tuple[str, Sequence[str], Sequence[Score], Sequence[bool]]],
    *,
    min_margin: float = 0.0,
    require_chosen_essential: bool = True,
) -> PairSelection:
    """Apply `select_pair` to every (prompt_id, responses, scores[, truncated]) group of a round."""
    selection = PairSelection(
        pairs=[], dropped=dict.fromkeys(DROP_REASONS, 0), dropped_ids={r: [] for r in DROP_REASONS}
    )
    for prompt_id, responses, scores, *truncated in groups:
        result = select_pair(
            prompt_id,
            responses,
            scores,
            min_margin=min_margin,
            require_chosen_essential=require_chosen_essential,
            truncated=truncated[0] if truncated else None,
        )
        if isinstance(result, Pair):
            selection.pairs.append(result)
        else:
            selection.dropped[result] += 1
            selection.dropped_ids[result].append(prompt_id)
    return selection


# -- the pair as it trains ---------------------------------------------------------------------

@dataclass(frozen=True)
class TrainPair:
    """One DPO pair of a round as it trains: a selected `Pair` with its prompt record, the token
    ids the policy sampled and the reference log-probs computed when the round built it.

    Why a second type beside `Pair`: a `Pair` is the selection's record (texts, indices into the
    prompt's responses, scores: what ``pairs.jsonl`` keeps, plain data); the step also needs the
    prompt's images and instruction, the exact sampled ids and the reference log-probs, which
    the round adds after selection (`TrainPair.of`, then `rdpo.rounds.with_reference_logps`).

    `chosen_ids`/`rejected_ids` are the token ids the policy sampled; the pair trains on them.
    Pairs written as text (tests, benchmarks) leave them None and are tokenized, with the
    end-of-turn token appended.
    """

    record: PromptRecord
    chosen: str
    rejected: str
    ref_chosen_logp: float
    ref_rejected_logp: float
    chosen_ids: tuple[int, ...] | None = None
    rejected_ids: tuple[int, ...] | None = None

    @property
    def completions(self) -> tuple[Completion, Completion]:
        """What the pair trains on: the sampled ids, or the texts."""
        return (self.chosen if self.chosen_ids is None else self.chosen_ids,
                self.rejected if self.rejected_ids is None else self.rejected_ids)

    @classmethod
    def of(cls, record: PromptRecord, pair: Pair,
           token_ids: Sequence[Sequence[int]] | None = None) -> TrainPair:
        """`pair` of `record`'s responses, trained on their sampled ids (`token_ids`, one per
        response, as the rollout kept them; texts when None); reference log-probs still 0."""
        return cls(record, pair.chosen, pair.rejected, 0.0, 0.0,
                   tuple(token_ids[pair.chosen_index]) if token_ids else None,
                   tuple(token_ids[pair.rejected_index]) if token_ids else None)


def pair_to_dict(pair: TrainPair) -> dict:
    """A `TrainPair` as plain data (the prompt by id) for checkpoints."""
    return {"id": pair.record.id, "chosen": pair.chosen, "rejected": pair.rejected,
            "ref_chosen_logp": pair.ref_chosen_logp, "ref_rejected_logp": pair.ref_rejected_logp,
            "chosen_ids": None if pair.chosen_ids is None else list(pair.chosen_ids),
            "rejected_ids": None if pair.rejected_ids is None else list(pair.rejected_ids)}


def pair_from_dict(d: dict, records: dict[str, PromptRecord]) -> TrainPair:
    """The `TrainPair` `pair_to_dict` wrote, its prompt looked up in `records` by id."""
    if d["id"] not in records:
        raise ValueError(f"checkpoint pair for prompt {d['id']!r}: no such prompt in the pool")
    ids = [None if d.get(k) is None else tuple(d[k]) for k in ("chosen_ids", "rejected_ids")]
    return TrainPair(records[d["id"]], d["chosen"], d["rejected"], d["ref_chosen_logp"],
                     d["ref_rejected_logp"], *ids)
