"""Parsing judge answers: JSON in prose or code fences; missing, conflicting, odd values -> None."""

import pytest

from rdpo.judging.chat import extract_json
from rdpo.judging.judges import parse_score, parse_verdicts

IDS = ["E1", "E2", "A1"]


@pytest.mark.parametrize("text, expect", [
    ('{"verdicts": [{"id": "E1", "met": true}, {"id": "E2", "met": false}, {"id": "A1", "met": true}]}',
     {"E1": True, "E2": False, "A1": True}),
    ('Sure!\n```json\n{"verdicts": [{"id": "E1", "met": true}]}\n```\nHope this helps {x}',
     {"E1": True, "E2": None, "A1": None}),
    ('Reasoning: E1 holds {because}. {"verdicts": [{"id": "E2", "met": "yes"}, {"id": "A1", "met": "No"}]} done',
     {"E1": None, "E2": True, "A1": False}),
    # conflicting duplicates, a non-boolean, a stray id and a non-object entry
    ('{"verdicts": [{"id": "E1", "met": true}, {"id": "E1", "met": false}, {"id": "E2", "met": 1},'
     ' {"id": "Z9", "met": true}, "A1"]}', {"E1": None, "E2": None, "A1": None}),
    ('{"verdicts": [{"id": "E1", "met": true}, {"id": "E1", "met": true}]}',
     {"E1": True, "E2": None, "A1": None}),
])
def test_parse_verdicts(text, expect):
    assert parse_verdicts(text, IDS) == expect


@pytest.mark.parametrize("text", ["", "no json here", '{"verdicts": "E1 yes"}', '{"score": 3}',
                                  '```json\n{"verdicts": [\n```', "[1, 2]"])
def test_unparseable_verdicts(text):
    assert parse_verdicts(text, IDS) is None


@pytest.mark.parametrize("text, score", [
    ('{"score": 7}', 7), ('The answer is good.\n```\n{"score": 10}\n```', 10), ('{"score": "3"}', 3),
    ('{"score": 8.0}', 8), ('{"score": 0}', None), ('{"score": 11}', None), ('{"score": 7.5}', None),
    ('{"score": true}', None), ('{"score": null}', None), ("score: 7", None),
])
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_extract_json_prefers_object_with_key():
    assert extract_json('{"a": 1} then {"score": 2}', "score") == {"score": 2}
    assert extract_json('{"a": {"score": 5}}', "score") == {"score": 5}


def test_extract_json_takes_the_last_object_with_the_key():
    assert extract_json('{"score": 2} no, on reflection: {"score": 3}', "score") == {"score": 3}
    # a fenced block is not special when a later object has the key
    assert extract_json('```json\n{"score": 2}\n```\nFinal: {"score": 4}', "score") == {"score": 4}
    # an object with the key is taken whole: the objects inside it are not candidates
    outer = {"verdicts": [{"id": "E1", "met": True, "why": {"verdicts": []}}]}
    assert extract_json(f"{outer}".replace("'", '"').replace("True", "true"), "verdicts") == outer


def test_judge_that_quotes_a_response_holding_verdict_json():
    """The graded response itself prints verdict JSON (a user asked it to); a judge that quotes
    it before its own verdict is read by its own, last, JSON."""
    response = 'Here you go: {"verdicts": [{"id": "E1", "met": true}, {"id": "E2", "met": true}]}'
    answer = (f'The response reads:\n"{response}"\nIt claims every criterion is met, but the '
              'image shows otherwise.\n```json\n{"verdicts": [{"id": "E1", "met": false}, '
              '{"id": "E2", "met": true}, {"id": "A1", "met": false}]}\n```')
    assert parse_verdicts(answer, IDS) == {"E1": False, "E2": True, "A1": False}
    assert parse_score('It says {"score": 10} about itself. My rating: {"score": 2}') == 2


def test_own_verdict_cut_off_after_a_quoted_one_is_unparseable():
    """The judge's own JSON cut at the token limit: asking again beats reading the quote."""
    answer = ('The response says {"verdicts": [{"id": "E1", "met": true}]}. Verdict:\n'
              '{"verdicts": [{"id": "E1", "met": fal')
    assert parse_verdicts(answer, IDS) is None
    assert parse_score('Quoted {"score": 9}; mine: { "score" : ') is None


DEEP = '{"verdicts": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("text", [
    '{"score": NaN}', '{"score": Infinity}', '{"score": -Infinity}', '{"score": 1e999}',
    '{"score": ' + "9" * 5000 + "}", '{"score": "²"}', '{"score": "' + "9" * 5000 + '"}',
    '{"score": ' + "[" * 100_000 + "]" * 100_000 + "}", "{" * 100_000,
])
def test_non_finite_malformed_or_deep_scores_are_unknown(text):
    """An answer the judge model wrote never raises (ValueError, OverflowError,
    RecursionError): it is unknown, so the caller asks again and, still unknown, counts it."""
    assert parse_score(text) is None


@pytest.mark.parametrize("text", [
    DEEP, '{"verdicts": [{"id": "E1", "met": true, "p": NaN}]}',
    '{"verdicts": [{"id": "E1", "met": true, "p": 1e400}]}', "[" * 100_000,
])
def test_non_finite_or_deep_verdicts_are_unparseable(text):
    assert parse_verdicts(text, IDS) is None


def test_a_finite_object_after_a_broken_one_still_counts():
    assert parse_score('{"score": NaN} no, {"score": 4}') == 4
    assert parse_verdicts('{"x": Infinity} {"verdicts": [{"id": "E1", "met": true}]}',
                          IDS) == {"E1": True, "E2": None, "A1": None}
