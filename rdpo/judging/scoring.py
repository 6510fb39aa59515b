"""Aggregate a judge's per-criterion verdicts into one score per response.

Pure functions of a rubric and a verdict mapping. A verdict is `True` (met), `False` (not met)
or `None` (the judge could not tell); a criterion missing from the mapping counts as `None`.

The one policy for unknown verdicts, the same in scoring, pair selection and evaluation: for the
score, an unknown criterion counts as **not met** (so a less-judged answer never outranks a fully
judged one: judging a criterion can only add to a score), and a response with an unknown
essential criterion has ``essential_pass`` None and is never a pair member (its score could hide
a failed essential criterion; `rdpo.pairs`). Evaluations report how many responses were fully
judged beside the score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from rdpo.pool import Rubric

Verdicts = Mapping[str, bool | None]

# In `weighted`, an essential criterion counts twice an additional one of weight 1.0, so
# essentials dominate without the hard threshold of `lexicographic`.
ESSENTIAL_WEIGHT = 2.0


@dataclass(frozen=True)
class Score:
    """One response's aggregated score and the tallies behind it."""

    value: float
    """Aggregated score in [0, 1]; higher is better."""
    essential_met: float
    """Fraction of essential criteria met (unknown: not met)."""
    additional_met: float
    """Weight-normalised fraction of additional criteria met (unknown: not met; 1.0 if the
    rubric has none)."""
    essential_pass: bool | None
    """True: every essential met; False: one is not met; None: none failed but some unknown."""
    unknown: int
    """Number of criteria whose verdict is None or missing."""
    unknown_essential: int
    """Number of essential criteria whose verdict is None or missing."""

    @property
    def fully_judged(self) -> bool:
        return self.unknown == 0


@dataclass(frozen=True)
class _Tally:
    essential_total: int
    essential_met: int
    additional_total_weight: float
    additional_met_weight: float
    essential_failed: bool
    unknown: int
    unknown_essential: int


def _tally(rubric: Rubric, verdicts: Verdicts) -> _Tally:
    ids = {c.id for c in rubric.criteria()}
    stray = sorted(set(verdicts) - ids)
    if stray:
        # A verdict for a criterion the rubric lacks means the judge mixed up rubrics or ids.
        raise ValueError(f"verdicts for unknown criterion id(s) {stray}; rubric has {sorted(ids)}")
    for cid, v in verdicts.items():
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"verdict for {cid!r} must be True, False or None, got {v!r}")
    e_met = unknown = unknown_e = 0
    a_total = a_met = 0.0
    failed = False
    for c in rubric.essential:
        v = verdicts.get(c.id)
        if v is None:
            unknown += 1
            unknown_e += 1
            continue
        e_met += v
        failed |= not v
    for c in rubric.additional:
        v = verdicts.get(c.id)
        a_total += c.weight
        if v is None:
            unknown += 1
            continue
        a_met += c.weight if v else 0.0
    return _Tally(len(rubric.essential), e_met, a_total, a_met, failed, unknown, unknown_e)


def _score(t: _Tally, value: float) -> Score:
    essential_pass: bool | None
    if t.essential_failed:
        essential_pass = False
    elif t.unknown_essential:
        essential_pass = None
    else:
        essential_pass = True
    return Score(
        value=value,
        essential_met=t.essential_met / t.essential_total if t.essential_total else 0.0,
        # A rubric without additional criteria leaves nothing to miss: vacuously full.
        additional_met=(
            t.additional_met_weight / t.additional_total_weight
            if t.additional_total_weight
            else 1.0
        ),
        essential_pass=essential_pass,
        unknown=t.unknown,
        unknown_essential=t.unknown_essential,
    )


def lexicographic(rubric: Rubric, verdicts: Verdicts) -> Score:
    """The DESIGN default: essentials first, then additional criteria.

    With e the fraction of essential criteria met and a the weight-normalised fraction of
    additional criteria met (unknown: not met): value = e/2 if e < 1, else 0.5 + a/2. So any
    response meeting every essential criterion outranks every response that misses one.
    """
    s = _score(_tally(rubric, verdicts), 0.0)
    e, a = s.essential_met, s.additional_met
    value = e / 2 if e < 1 else 0.5 + a / 2
    return replace(s, value=value)


def weighted(rubric: Rubric, verdicts: Verdicts) -> Score:
    """Weighted fraction of criteria met (unknown: not met); essentials weigh `ESSENTIAL_WEIGHT`
    (2.0), additional criteria their rubric weight."""
    t = _tally(rubric, verdicts)
    total = ESSENTIAL_WEIGHT * t.essential_total + t.additional_total_weight
    met = ESSENTIAL_WEIGHT * t.essential_met + t.additional_met_weight
    return _score(t, met / total if total else 0.0)


AGGREGATIONS: dict[str, Callable[[Rubric, Verdicts], Score]] = {
    "lexicographic": lexicographic,
    "weighted": weighted,
}


def score_response(rubric: Rubric, verdicts: Verdicts, aggregation: str = "lexicographic") -> Score:
    """Score one response's verdicts with the aggregation named in the config."""
    try:
        aggregate = AGGREGATIONS[aggregation]
    except KeyError:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
        ) from None
    return aggregate(rubric, verdicts)
