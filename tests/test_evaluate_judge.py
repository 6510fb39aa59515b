"""`python -m rdpo.evaluate judge`: accuracy with and without the rubric, ties, unknowns, CI."""

import json
import random

import pytest
from fake_openai_server import FakeOpenAIServer

from rdpo.demo import toy
from rdpo.tools.evaluate import load_preferences, main, wilson


@pytest.fixture(scope="module")
def data(toy_pools):
    """12 pairs (reference vs a wrong answer, preferred side alternating) + 1 unjudgeable one."""
    rng = random.Random(0)
    raws = [json.loads(x) for x in toy_pools.train.read_text().splitlines()][:12]
    path = toy_pools.train.parent / "prefs.jsonl"
    with path.open("w") as f:
        for i, r in enumerate(raws):
            wrong = toy.flawed_answers(r, rng)[1]  # breaks an essential criterion
            responses = [r["reference"], wrong] if i % 2 else [wrong, r["reference"]]
            f.write(json.dumps({"id": r["id"], "images": r["images"], "instruction": r["instruction"],
                                "responses": responses, "preferred": 0 if i % 2 else 1,
                                "rubric": r["rubric"]}) + "\n")
        # a rubric without checks: RuleJudge cannot tell, so the pair is unknown
        f.write(json.dumps({"id": "nocheck", "images": raws[0]["images"], "instruction": "Q?",
                            "responses": ["a", "b"], "preferred": 0,
                            "rubric": {"essential": [{"id": "E1", "text": "Says a."}]}}) + "\n")
        # no rubric at all: counted only without the rubric
        f.write(json.dumps({"id": "norubric", "images": raws[0]["images"], "instruction": "Q?",
                            "responses": ["a", "b"], "preferred": 1}) + "\n")
    return path


def test_rule_judge_accuracy(data, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["judge", "--data", str(data), "--kind", "rule", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    r = result["with_rubric"]
    assert (r["n"], r["correct"], r["ties"], r["unknown"]) == (13, 12, 0, 1)
    assert r["accuracy"] == pytest.approx(12 / 13) and r["accuracy_decided"] == 1.0
    assert r["ci95"] == pytest.approx(list(wilson(12, 13)))
    # the pairs carry no outcome check: RuleJudge has no holistic verdict, all unknown
    w = result["without_rubric"]
    assert (w["n"], w["correct"], w["unknown"], w["accuracy_decided"]) == (14, 0, 14, None)
    assert result["interval"] == "wilson" and result["pairs"] == 14


def test_openai_judge_ties_and_cache(data, tmp_path):
    out, cache = tmp_path / "o.json", tmp_path / "cache.sqlite"
    with FakeOpenAIServer() as srv:
        args = ["judge", "--data", str(data), "--kind", "openai", "--model", srv.model,
                "--base-url", srv.url, "--cache", str(cache), "--out", str(out)]
        assert main(args) == 0
        first = json.loads(out.read_text())
        # every response meets every criterion and gets the same score: all ties
        assert first["with_rubric"]["ties"] == 13 and first["without_rubric"]["ties"] == 14
        assert first["with_rubric"]["accuracy"] == 0.0 and srv.problems == []
        n = srv.request_count
        assert n == first["judge_stats"]["requests"] == 13 * 2 + 14 * 2 - 2  # "a"/"b" repeat
        assert main(args) == 0
        assert srv.request_count == n  # second evaluation: all from the cache


def test_wilson():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 10)[0] == pytest.approx(0.0)


def test_bad_preference_file(tmp_path, toy_pools, capsys):
    bad = toy_pools.train.parent / "badprefs.jsonl"
    bad.write_text(
        '{"id": "x", "images": ["images/train-00000.png"], "instruction": "Q", '
        '"responses": ["a"], "preferred": 2}\n'
        '{"id": "y", "images": ["images/train-00000.png"], "instruction": "Q", '
        '"responses": ["a", "b"], "preferred": true, "rubric": {"essential": []}}\n')
    assert main(["judge", "--data", str(bad), "--kind", "rule"]) == 1
    err = capsys.readouterr().err
    for where in (":1: responses: must be a list of exactly two", ":1: preferred: must be 0 or 1",
                  ":2: preferred:", ":2: rubric.essential: is empty"):
        assert where in err, where
    with pytest.raises(ValueError, match="not found"):
        load_preferences(tmp_path / "none.jsonl")


def test_vlrewardbench_converter(tmp_path, toy_pools):
    import importlib.util

    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = importlib.util.spec_from_file_location("conv", "scripts/convert_vlrewardbench.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    png = (toy_pools.train.parent / "images" / "train-00000.png").read_bytes()
    rows = [
        {"id": "a/1", "query": "What?", "response": ["good", "bad"], "human_ranking": [0, 1],
         "image": {"bytes": png, "path": None}},
        {"id": "b", "query": "Where?", "response": ["bad", "good"], "human_ranking": [1, 0],
         "image": {"bytes": png, "path": None}},
        {"id": "c", "query": "Tie?", "response": ["x", "y"], "human_ranking": [0, 0],
         "image": {"bytes": png, "path": None}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "vl.parquet")
    assert conv.main([str(tmp_path / "vl.parquet"), str(tmp_path / "out")]) == 0
    pairs = load_preferences(tmp_path / "out" / "pairs.jsonl")
    assert [(p.record.id, p.preferred, p.responses) for p in pairs] == [
        ("a_1", 0, ("good", "bad")), ("b", 1, ("bad", "good"))]
    assert pairs[0].record.images[0].read_bytes() == png and not pairs[0].has_rubric
    # JSONL with a path image; a record missing a field is an error naming it
    (tmp_path / "vl.jsonl").write_text(
        json.dumps({"id": "p", "query": "Q", "response": ["a", "b"], "human_ranking": [1, 0],
                    "image": str(toy_pools.train.parent / "images" / "train-00001.png")}) + "\n"
        + json.dumps({"id": "q", "query": "Q", "response": ["a", "b"]}) + "\n")
    assert conv.main([str(tmp_path / "vl.jsonl"), str(tmp_path / "out2")]) == 1
    (tmp_path / "vl.jsonl").write_text(
        (tmp_path / "vl.jsonl").read_text().splitlines()[0] + "\n")
    assert conv.convert(tmp_path / "vl.jsonl", tmp_path / "out3")["written"] == 1


def test_judge_options_are_checked_by_the_schema(data, capsys):
    """The options are JudgeConfig's: a range or a rule broken on the command line is named by
    its option, and nothing is judged."""
    assert main(["judge", "--data", str(data), "--concurrency", "0", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "--concurrency: must be > 0, got 0" in err
    assert "--base-url: an openai judge needs the server's URL" in err


def test_judge_options_default_to_the_config(data):
    from rdpo.config import JudgeConfig
    from rdpo.tools.evaluate import build_parser

    args = build_parser().parse_args(["judge", "--data", str(data)])
    for name in ("concurrency", "timeout", "max_retries", "max_tokens", "batch_size",
                 "parse_retries"):
        assert getattr(args, name) == getattr(JudgeConfig, name), name
    assert (args.kind, args.cache) == ("openai", None)  # this CLI's own defaults
