from __future__ import annotations

from pathlib import Path

import pytest

from rdpo.judging.judges import RuleJudge
from rdpo.judging.scoring import lexicographic
from rdpo.pool import Criterion, PromptRecord, Rubric


def make_record(*criteria: Criterion, n_essential: int = 1) -> PromptRecord:
    return PromptRecord(
        id="p",
        images=(Path("/x.png"),),
        instruction="Describe.",
        rubric=Rubric(essential=criteria[:n_essential], additional=criteria[n_essential:]),
    )


@pytest.mark.parametrize(
    "check, text, met",
    [
        ({"any": [r"\bred\b", "crimson"]}, "It is crimson.", True),
        ({"any": [r"\bred\b", "crimson"]}, "It is reddish.", False),
        ({"all": ["circle", r"\bred\b"]}, "A red circle.", True),
        ({"all": ["circle", r"\bred\b"]}, "A red square.", False),
        ({"none": ["triangle", "square"]}, "A red circle.", True),
        ({"none": ["triangle", "square"]}, "No square here.", False),
        ({"any": ["red"], "none": ["triangle"]}, "red circle", True),
        ({"any": ["red"], "none": ["triangle"]}, "red triangle", False),
        ({"any": ["red"], "none": ["triangle"]}, "blue circle", False),
        ({"any": ["red"], "all": ["one", "circle"], "none": ["two"]}, "One red circle", True),
        ({"any": ["red"], "all": ["one", "circle"], "none": ["two"]}, "One red", False),
        ({"any": [r"\bRED\b"]}, "the circle is red", True),  # case-insensitive
        ({"all": ["^the"]}, "THE END", True),
        ({"any": ["^red"]}, "dark red", False),  # re.search honours anchors
    ],
)
def test_check_semantics(check, text, met):
    judge = RuleJudge()
    assert judge.check(check, text) is met
    record = make_record(Criterion("E1", "t", check=check))
    assert judge.judge(record, [text]) == [{"E1": met}]


def test_judge_many_responses_and_no_check():
    record = make_record(
        Criterion("E1", "red", check={"any": [r"\bred\b"]}),
        Criterion("A1", "one circle"),
        Criterion("A2", "no triangle", 0.5, check={"none": ["triangle"]}),
    )
    verdicts = RuleJudge().judge(record, ["A red circle.", "A blue triangle.", ""])
    assert verdicts == [
        {"E1": True, "A1": None, "A2": True},
        {"E1": False, "A1": None, "A2": False},
        {"E1": False, "A1": None, "A2": True},
    ]
    # The verdicts feed scoring directly; A1 stays unknown (scoring's unknown policy decides
    # what that is worth, rdpo.judging.scoring).
    score = lexicographic(record.rubric, verdicts[0])
    assert score.unknown == 1 and score.essential_pass is True
    assert RuleJudge().judge(record, []) == []


def test_patterns_compiled_once():
    judge = RuleJudge()
    record = make_record(Criterion("E1", "t", check={"any": ["red", "blue"]}))
    judge.judge(record, ["red", "blue", "green"])
    judge.judge(record, ["red"])
    assert set(judge._compiled) == {"red", "blue"}
    assert judge.name == "rule"


def test_bad_check_raises():
    with pytest.raises(ValueError, match="some"):
        RuleJudge().check({"some": ["x"]}, "x")
    with pytest.raises(ValueError):
        RuleJudge().check({}, "x")


def test_many_is_one_protocol():
    """RuleJudge follows the whole `Judge` protocol: *_many equal the per-prompt calls."""
    from rdpo.judging.judges import Judge

    records = [make_record(Criterion("E1", "red", check={"any": [r"\bred\b"]})),
               make_record(Criterion("E1", "blue", check={"any": ["blue"]}))]
    judge: Judge = RuleJudge()
    items = [(records[0], ["red", "blue"]), (records[1], ["blue"]), (records[1], [])]
    assert judge.judge_many(items) == [judge.judge(r, rs) for r, rs in items]
    assert judge.judge_many(items) == [[{"E1": True}, {"E1": False}], [{"E1": True}], []]
    assert judge.outcome_many(items) == [judge.outcome(r, rs) for r, rs in items]
    assert judge.outcome_many(items) == [[None, None], [None], []]
    for method in ("judge", "outcome", "judge_many", "outcome_many"):
        assert callable(getattr(judge, method))
