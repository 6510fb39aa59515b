from __future__ import annotations

import pytest

from rdpo.judging.scoring import (
    AGGREGATIONS,
    ESSENTIAL_WEIGHT,
    Score,
    lexicographic,
    score_response,
    weighted,
)
from rdpo.pool import Criterion, Rubric

RUBRIC = Rubric(
    essential=(Criterion("E1", "e1"), Criterion("E2", "e2"), Criterion("E3", "e3")),
    additional=(Criterion("A1", "a1", 1.0), Criterion("A2", "a2", 0.5)),
)
ALL_E = {"E1": True, "E2": True, "E3": True}


def test_two_of_three_essential():
    s = lexicographic(RUBRIC, {"E1": True, "E2": False, "E3": True, "A1": True, "A2": True})
    assert s.value == pytest.approx(1 / 3)
    assert s.essential_met == pytest.approx(2 / 3)
    assert s.additional_met == 1.0
    assert s.essential_pass is False
    assert (s.unknown, s.unknown_essential) == (0, 0)


def test_all_essential_only_light_additional():
    s = lexicographic(RUBRIC, {**ALL_E, "A1": False, "A2": True})
    assert s.value == pytest.approx(0.5 + (0.5 / 1.5) / 2)
    assert s.additional_met == pytest.approx(1 / 3)
    assert s.essential_pass is True


def test_all_met_and_none_met():
    assert lexicographic(RUBRIC, {**ALL_E, "A1": True, "A2": True}).value == 1.0
    zero = lexicographic(RUBRIC, dict.fromkeys(["E1", "E2", "E3", "A1", "A2"], False))
    assert zero.value == 0.0 and zero.essential_met == 0.0 and zero.additional_met == 0.0


def test_essential_dominates_additional():
    # Meeting every essential but no additional beats missing one essential with all additional.
    low = lexicographic(RUBRIC, {**ALL_E, "A1": False, "A2": False})
    high = lexicographic(RUBRIC, {**ALL_E, "E3": False, "A1": True, "A2": True})
    assert low.value == 0.5 and high.value == pytest.approx(1 / 3)


def test_unknown_verdicts_count_as_not_met():
    s = lexicographic(RUBRIC, {**ALL_E, "A1": None, "A2": True})
    assert s.value == pytest.approx(0.5 + (0.5 / 1.5) / 2)  # A1 unknown = not met: a = 0.5/1.5
    assert s.unknown == 1 and s.unknown_essential == 0 and not s.fully_judged
    s = lexicographic(RUBRIC, {"E1": True, "E2": None, "E3": False, "A1": False, "A2": True})
    assert s.essential_met == pytest.approx(1 / 3) and s.value == pytest.approx(1 / 6)
    assert s.unknown == 1 and s.unknown_essential == 1


def test_less_judged_never_outranks_fully_judged():
    # The same answer judged fully and with criteria left out: judging can only add to it.
    full = {**ALL_E, "A1": True, "A2": False}
    for aggregate in (lexicographic, weighted):
        base = aggregate(RUBRIC, full).value
        for left_out in full:
            partial = {k: v for k, v in full.items() if k != left_out}
            assert aggregate(RUBRIC, partial).value <= base, (aggregate.__name__, left_out)
        # an answer whose failing criterion was not judged does not beat one judged to meet it
        assert aggregate(RUBRIC, {**ALL_E, "A1": True}).value < aggregate(
            RUBRIC, {**ALL_E, "A1": True, "A2": True}).value


def test_missing_ids_are_unknown():
    s = lexicographic(RUBRIC, {"E1": True, "E2": True, "A2": False})
    assert s.value == pytest.approx(2 / 3 / 2)  # e = 2/3 (E3 unknown = not met)
    assert (s.unknown, s.unknown_essential) == (2, 1)
    assert s.essential_pass is None
    empty = lexicographic(RUBRIC, {})
    assert (empty.value, empty.essential_met, empty.additional_met) == (0.0, 0.0, 0.0)
    assert (empty.unknown, empty.unknown_essential, empty.essential_pass) == (5, 3, None)


def test_all_additional_unknown_counts_as_none_met():
    s = lexicographic(RUBRIC, {**ALL_E, "A1": None})
    assert s.additional_met == 0.0 and s.value == 0.5


def test_no_additional_criteria():
    rubric = Rubric(essential=(Criterion("E1", "e"),), additional=())
    assert lexicographic(rubric, {"E1": True}).value == 1.0
    assert lexicographic(rubric, {"E1": True}).additional_met == 1.0
    assert lexicographic(rubric, {"E1": False}).value == 0.0


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        ({**ALL_E}, True),
        ({**ALL_E, "A1": False}, True),
        ({**ALL_E, "E2": False}, False),
        ({**ALL_E, "E2": None}, None),
        ({"E1": False, "E2": None}, False),  # a known failure wins over unknowns
    ],
)
def test_essential_pass(verdicts, expected):
    assert lexicographic(RUBRIC, verdicts).essential_pass is expected
    assert weighted(RUBRIC, verdicts).essential_pass is expected


def test_unknown_id_raises():
    with pytest.raises(ValueError, match="E9"):
        lexicographic(RUBRIC, {**ALL_E, "E9": True})
    with pytest.raises(ValueError, match="E9"):
        weighted(RUBRIC, {"E9": None})


def test_non_bool_verdict_raises():
    with pytest.raises(ValueError, match="'E1'"):
        lexicographic(RUBRIC, {"E1": "yes"})
    with pytest.raises(ValueError):
        lexicographic(RUBRIC, {"E1": 1})


def test_weighted():
    assert ESSENTIAL_WEIGHT == 2.0
    s = weighted(RUBRIC, {"E1": True, "E2": False, "E3": True, "A1": False, "A2": True})
    # met: 2*2 + 0.5 = 4.5 of 3*2 + 1.5 = 7.5
    assert s.value == pytest.approx(4.5 / 7.5)
    assert s.essential_met == pytest.approx(2 / 3) and s.additional_met == pytest.approx(1 / 3)
    s = weighted(RUBRIC, {"E1": True, "E2": None, "A2": True})
    assert s.value == pytest.approx((2 + 0.5) / 7.5)  # unknowns (E2, E3, A1) count as not met
    assert weighted(RUBRIC, {}).value == 0.0


def test_score_response_dispatch():
    verdicts = {**ALL_E, "A1": False, "A2": True}
    assert score_response(RUBRIC, verdicts) == lexicographic(RUBRIC, verdicts)
    assert score_response(RUBRIC, verdicts, "weighted") == weighted(RUBRIC, verdicts)
    assert set(AGGREGATIONS) == {"lexicographic", "weighted"}
    with pytest.raises(ValueError, match="lexicographic, weighted"):
        score_response(RUBRIC, verdicts, "mean")


def test_score_is_plain_dataclass():
    s = lexicographic(RUBRIC, ALL_E)
    assert isinstance(s, Score) and 0.0 <= s.value <= 1.0
