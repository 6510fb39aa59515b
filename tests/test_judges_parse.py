"""Parsing judge answers: JSON in prose or code fences; missing, conflicting, odd values -> None."""

import pytest

from rdpo.chat import extract_json
from rdpo.judges import parse_score, parse_verdicts

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
