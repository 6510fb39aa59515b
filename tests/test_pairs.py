from __future__ import annotations

import json

import pytest

from rdpo.judging.scoring import Score
from rdpo.pairs import DROP_REASONS, Pair, build_pairs, select_pair


def sc(value: float, passes: bool | None = True, unknown_essential: int = 0) -> Score:
    return Score(
        value=value,
        essential_met=1.0 if passes else 0.5,
        additional_met=1.0,
        essential_pass=passes,
        unknown=unknown_essential,
        unknown_essential=unknown_essential,
    )


def test_best_and_worst():
    pair = select_pair("p", ["a", "b", "c"], [sc(0.6), sc(0.9), sc(0.2, False)])
    assert pair == Pair("p", "b", "c", 1, 2, 0.9, 0.2)


def test_index_tie_breaking():
    # Equal best: lowest index; equal worst: lowest index other than the chosen one.
    pair = select_pair(
        "p", list("abcde"), [sc(0.1, False), sc(0.9), sc(0.1, False), sc(0.9), sc(0.5)]
    )
    assert (pair.chosen_index, pair.rejected_index) == (1, 0)
    pair = select_pair("p", list("abc"), [sc(0.9), sc(0.2, False), sc(0.2, False)])
    assert (pair.chosen_index, pair.rejected_index) == (0, 1)


def test_tie():
    assert select_pair("p", ["a", "b", "c"], [sc(0.5), sc(0.5), sc(0.5)]) == "tie"
    # Equal up to float noise from different weight sums is still a tie.
    assert select_pair("p", ["a", "b"], [sc(0.1 + 0.2), sc(0.3)]) == "tie"


def test_margin():
    scores = [sc(0.75), sc(0.5)]
    assert select_pair("p", ["a", "b"], scores, min_margin=0.3) == "below_margin"
    assert isinstance(select_pair("p", ["a", "b"], scores, min_margin=0.25), Pair)
    assert isinstance(select_pair("p", ["a", "b"], scores), Pair)


def test_chosen_essential_gate():
    scores = [sc(0.4, False), sc(0.1, False)]
    assert select_pair("p", ["a", "b"], scores) == "chosen_fails_essential"
    pair = select_pair("p", ["a", "b"], scores, require_chosen_essential=False)
    assert (pair.chosen, pair.rejected) == ("a", "b")


def test_unknown_essential_never_chosen_or_rejected():
    scores = [sc(1.0, None, 1), sc(0.7), sc(0.0, None, 2), sc(0.3, False)]
    pair = select_pair("p", ["a", "b", "c", "d"], scores)
    assert (pair.chosen_index, pair.rejected_index) == (1, 3)
    assert select_pair("p", ["a", "b"], [sc(1.0, None, 1), sc(0.2, False)]) == "too_few_eligible"
    assert select_pair("p", [], []) == "too_few_eligible"
    assert select_pair("p", ["a"], [sc(1.0)]) == "too_few_eligible"


def test_identical_text():
    assert select_pair("p", ["same ", " same"], [sc(0.9), sc(0.1, False)]) == "identical_text"


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 responses but 1 scores"):
        select_pair("p", ["a", "b"], [sc(0.1)])


def test_build_pairs_counts():
    groups = [
        ("keep1", ["a", "b"], [sc(1.0), sc(0.0, False)]),
        ("tie", ["a", "b"], [sc(0.5), sc(0.5)]),
        ("few", ["a", "b"], [sc(0.5), sc(0.5, None, 1)]),
        ("gate", ["a", "b"], [sc(0.4, False), sc(0.2, False)]),
        ("margin", ["a", "b"], [sc(0.6), sc(0.55)]),
        ("keep2", ["x", "y", "z"], [sc(0.0, False), sc(0.8), sc(0.7)]),
        ("cut", ["a", "b"], [sc(1.0), sc(0.0, False)], [True, False]),
        # the best answer was cut at the token limit: the next-best finished one is chosen
        ("keep3", ["a", "b", "c"], [sc(1.0), sc(0.9), sc(0.0, False)], [True, False, False]),
    ]
    sel = build_pairs(groups, min_margin=0.1)
    assert [p.prompt_id for p in sel.pairs] == ["keep1", "keep2", "keep3"]
    assert (sel.pairs[1].chosen, sel.pairs[1].rejected) == ("y", "x")
    assert (sel.pairs[2].chosen, sel.pairs[2].rejected) == ("b", "c")
    assert sel.dropped == {
        "truncated": 1,
        "too_few_eligible": 1,
        "tie": 1,
        "below_margin": 1,
        "chosen_fails_essential": 1,
        "identical_text": 0,
    }
    assert list(sel.dropped) == list(DROP_REASONS)
    assert sel.dropped_ids["chosen_fails_essential"] == ["gate"]
    assert (
        sel.dropped_ids["too_few_eligible"] == ["few"] and sel.dropped_ids["identical_text"] == []
    )
    out = json.loads(json.dumps(sel.to_json()))
    assert out["kept"] == 3 and out["dropped"] == sel.dropped
    assert out["pairs"][0] == {
        "prompt_id": "keep1",
        "chosen": "a",
        "rejected": "b",
        "chosen_index": 0,
        "rejected_index": 1,
        "chosen_score": 1.0,
        "rejected_score": 0.0,
    }


def test_build_pairs_empty():
    sel = build_pairs([])
    assert sel.pairs == [] and sel.dropped == dict.fromkeys(DROP_REASONS, 0)
