"""Aggregate a judge's per-criterion verdicts into one score per response.

Pure functions of a rubric and a verdict mapping. A verdict is `True` (met), `False` (not met)
or `None` (the judge could not tell); a criterion missing from the mapping counts as `None`.
Unknown criteria are skipped: they are left out of both numerator and denominator, as if the
rubric did not have them. Callers that must not trust such scores (pair selection) look at
`Score.unknown_essential`.
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
    """Fraction of known essential criteria met (0.0 if none is known)."""
    additional_met: float
    """Weight-normalised fraction of known additional criteria met (1.0 if none is known)."""
    essential_pass: bool | None
    """True: every essential met; False: one is not met; None: none failed but some unknown."""
    unknown: int
    """Number of criteria whose verdict is None or missing."""
    unknown_essential: int
    """Number of essential criteria whose verdict is None or missing."""


@dataclass(frozen=True)
class _Tally:
    essential_known: int
    essential_met: int
    additional_known_weight: float
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
    e_known = e_met = unknown = unknown_e = 0
    a_known = a_met = 0.0
    failed = False
    for c in rubric.essential:
        v = verdicts.get(c.id)
        if v is None:
            unknown += 1
            unknown_e += 1
            continue
        e_known += 1
        e_met += v
        failed |= not v
    for c in rubric.additional:
        v = verdicts.get(c.id)
        if v is None:
            unknown += 1
            continue
        a_known += c.weight
        a_met += c.weight if v else 0.0
    return _Tally(e_known, e_met, a_known, a_met, failed, unknown, unknown_e)


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
        essential_met=t.essential_met / t.essential_known if t.essential_known else 0.0,
        # With no known additional criterion the fraction is vacuously full, exactly as for a
        # rubric that has none: unknowns are skipped, never counted as failures.
        additional_met=(
            t.additional_met_weight / t.additional_known_weight
            if t.additional_known_weight
            else 1.0
        ),
        essential_pass=essential_pass,
        unknown=t.unknown,
        unknown_essential=t.unknown_essential,
    )


def lexicographic(rubric: Rubric, verdicts: Verdicts) -> Score:
    """The DESIGN default: essentials first, then additional criteria.

    With e the fraction of known essential criteria met and a the weight-normalised fraction
    of known additional criteria met: value = e/2 if e < 1, else 0.5 + a/2. So any response
    meeting every essential criterion outranks every response that misses one.
    """
    s = _score(_tally(rubric, verdicts), 0.0)
    e, a = s.essential_met, s.additional_met
    value = e / 2 if e < 1 else 0.5 + a / 2
    return replace(s, value=value)


def weighted(rubric: Rubric, verdicts: Verdicts) -> Score:
    """Weighted fraction of known criteria met; essentials weigh `ESSENTIAL_WEIGHT` (2.0).

    Additional criteria keep their rubric weight. With no known criterion the value is 0.0.
    """
    t = _tally(rubric, verdicts)
    known = ESSENTIAL_WEIGHT * t.essential_known + t.additional_known_weight
    met = ESSENTIAL_WEIGHT * t.essential_met + t.additional_met_weight
    return _score(t, met / known if known else 0.0)


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
