"""`python -m rdpo.evaluate agreement`: Cohen's kappa against hand-computed values and its
undefined cases, the bootstrap, reordered rubrics, and the command on hand-made run files, a
preference file and the scripted OpenAI-compatible server."""

import json
import random

import pytest
from fake_openai_server import FakeOpenAIServer

from rdpo.demo import toy
from rdpo.judging.judges import RuleJudge
from rdpo.pool import load_pool
from rdpo.tools.agreement import (
    Table,
    VerdictPair,
    agreement_report,
    bootstrap_ci,
    cohen_kappa,
    flip_report,
    kappa,
    percentile,
    raw_agreement,
    reordered,
)
from rdpo.tools.evaluate import main
from rdpo.tools.judge_options import split_judge_options


def test_kappa_hand_computed():
    # Cohen's textbook table: 20 both yes, 5 only A, 10 only B, 15 both no.
    # p_o = 35/50 = 0.7; p_a = 0.5, p_b = 0.6; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5
    t = Table(both=20, a=5, b=10, neither=15)
    assert kappa(t) == pytest.approx(0.4) and raw_agreement(t) == pytest.approx(0.7)
    a = [True] * 25 + [False] * 25
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert Table.of(a, b) == t and cohen_kappa(a, b) == pytest.approx(0.4)
    # 3 of 4 agree, A: 2 met, B: 3 met. p_o = .75, p_e = .5*.75 + .5*.25 = .5 -> kappa .5
    assert cohen_kappa([True, True, False, False], [True, True, True, False]) == pytest.approx(0.5)
    assert cohen_kappa([True, False] * 3, [True, False] * 3) == pytest.approx(1.0)
    assert cohen_kappa([True, False] * 3, [False, True] * 3) == pytest.approx(-1.0)


def test_kappa_edge_cases():
    # both raters gave everything one and the same class: p_e = 1, kappa undefined (null)
    assert cohen_kappa([True] * 5, [True] * 5) is None
    assert cohen_kappa([False] * 5, [False] * 5) is None
    assert kappa(Table()) is None and raw_agreement(Table()) is None
    # opposite constant raters: p_o = 0, p_e = 0 -> 0, defined
    assert cohen_kappa([True] * 4, [False] * 4) == 0.0
    # one constant rater: p_o = .75, p_a = 1, p_b = .75, p_e = .75 -> 0
    assert cohen_kappa([True] * 4, [True, True, True, False]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="3 verdicts against 2"):
        cohen_kappa([True] * 3, [True] * 2)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = random.Random(1)
    groups = []
    for _ in range(30):  # prompts where the judges agree ~80% of the time
        a = [rng.random() < 0.5 for _ in range(6)]
        groups.append(Table.of(a, [x if rng.random() < 0.8 else not x for x in a]))
    total = sum(groups, Table())
    ci = bootstrap_ci(groups, kappa, resamples=300, seed=4)
    assert ci == bootstrap_ci(groups, kappa, resamples=300, seed=4)
    assert ci != bootstrap_ci(groups, kappa, resamples=300, seed=5)
    assert ci[0] < kappa(total) < ci[1] and ci[1] - ci[0] < 0.5
    # every resample undefined: no interval, not [nan, nan]
    assert bootstrap_ci([Table(both=3)] * 4, kappa, resamples=50) is None
    assert bootstrap_ci([], kappa) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([0.0, 1.0], 0.25) == 0.25


def _pairs(rows):
    return [VerdictPair(pid, crit, "essential" if crit.startswith("E") else "additional", a, b)
            for pid, crit, a, b in rows]


def test_report_by_kind_per_criterion_and_unknowns():
    rows = [("p1", "E · red", True, True), ("p1", "A · one", True, False),
            ("p2", "E · red", False, False), ("p2", "A · one", None, True),
            ("p3", "E · red", True, True), ("p3", "A · one", False, None)]
    r = agreement_report(_pairs(rows), resamples=100)
    # known in both: 4 of 6, 3 of them equal
    assert (r["verdicts"], r["both_known"]) == (6, 4)
    assert r["agreement"] == pytest.approx(0.75)
    assert r["kappa"] == pytest.approx(cohen_kappa([True, True, False, True],
                                                   [True, False, False, True]))
    assert r["unknown_rate"] == {"a": pytest.approx(1 / 6), "b": pytest.approx(1 / 6)}
    e, a = r["by_kind"]["essential"], r["by_kind"]["additional"]
    assert (e["agreement"], e["kappa"]) == (1.0, 1.0)
    # one known item, A met and B not: p_o = 0, p_e = 1*0 + 0*1 = 0 -> kappa 0 (defined)
    assert (a["both_known"], a["agreement"], a["kappa"]) == (1, 0.0, 0.0)
    one = r["per_criterion"]["A · one"]
    assert one["met_rate"] == {"a": 0.5, "b": 0.5} and one["kappa"] == 0.0
    assert r["per_criterion"]["E · red"]["kappa"] == 1.0
    assert one["unknown_rate"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3)}
    assert r["bootstrap"]["unit"] == "prompt"
    json.dumps(r, allow_nan=False)  # no NaN anywhere: undefined is null


def test_flip_report():
    rows = [("p1", "E · red", True, False), ("p1", "A · one", True, True),
            ("p2", "E · red", False, True), ("p2", "A · one", None, True),
            ("p3", "E · red", False, False)]
    f = flip_report(_pairs(rows), resamples=20)
    assert (f["both_known"], f["flips"], f["flip_rate"]) == (4, 2, 0.5)
    assert (f["met_to_not_met"], f["not_met_to_met"], f["unknown_changed"]) == (1, 1, 1)
    assert f["by_kind"]["essential"]["flips"] == 2 and f["by_kind"]["additional"]["flips"] == 0


def test_reordered_rubric(toy_pools):
    record = load_pool(toy_pools.train)[0]
    ids = [c.id for c in record.rubric.criteria()]
    again = reordered(record, seed=0)
    assert [c.id for c in again.rubric.criteria()] != ids
    assert sorted(c.id for c in again.rubric.criteria()) == sorted(ids)
    assert again.rubric.essential == record.rubric.essential  # kinds unchanged
    assert [c.id for c in reordered(record, seed=0).rubric.criteria()] == \
        [c.id for c in again.rubric.criteria()]
    # the rule judge does not care about order
    assert RuleJudge().judge(again, [record.reference]) == RuleJudge().judge(record, [record.reference])


# -- the command ---------------------------------------------------------------------------------

def test_split_judge_options():
    rest, tokens = split_judge_options(["agreement", "--run", "r", "--a.kind", "openai",
                                        "--a.base-url=http://x/v1", "--b.kind", "rule",
                                        "--b.noise", "0.1", "--consistency"], ("a", "b"))
    assert rest == ["agreement", "--run", "r", "--consistency"]
    assert tokens == {"a": ["--kind", "openai", "--base-url", "http://x/v1"],
                      "b": ["--kind", "rule", "--noise", "0.1"]}


@pytest.fixture(scope="module")
def run_files(toy_pools, tmp_path_factory):
    """A hand-made run: 6 prompts x (reference, a wrong answer, the reference again), round 0;
    recorded verdicts = the rule judge's with E1 flipped on the wrong answers of 3 prompts."""
    run = tmp_path_factory.mktemp("agree") / "run"
    (run / "rounds/0000").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  train_pool: {toy_pools.train}\n")
    records = load_pool(toy_pools.train)[:6]
    raws = [json.loads(x) for x in toy_pools.train.read_text().splitlines()][:6]
    rng, judge, rows, flipped = random.Random(0), RuleJudge(), [], 0
    for k, (record, raw) in enumerate(zip(records, raws, strict=True)):
        wrong = toy.flawed_answers(raw, rng)[1]
        for i, response in enumerate([record.reference, wrong, record.reference]):
            verdicts = judge.judge(record, [response])[0]
            if i == 1 and k < 3:
                verdicts["E1"] = not verdicts["E1"]
                flipped += 1
            rows.append({"prompt_id": record.id, "sample": i, "response": response,
                         "verdicts": verdicts, "score": 0.5, "essential_pass": True, "unknown": 0})
    (run / "rounds/0000/rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "rounds/0000/pairs.jsonl").write_text(json.dumps({"summary": {
        "prompts": 6, "kept": 0, "dropped": {}, "dropped_ids": {}}}) + "\n")
    criteria = sum(len(r.rubric.criteria()) for r in records) * 2  # distinct responses: 2 each
    return run, flipped, criteria


def test_recorded_against_rule_on_run_files(run_files, tmp_path, capsys):
    run, flipped, criteria = run_files
    out = tmp_path / "a.json"
    assert main(["agreement", "--run", str(run), "--b.kind", "rule", "--resamples", "200",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == r
    assert (r["responses"], r["prompts"]) == (12, 6)  # the repeated reference counted once
    assert r["judges"]["a"]["kind"] == "recorded" and r["judges"]["b"]["kind"] == "rule"
    assert r["verdicts"] == r["both_known"] == criteria
    assert r["agreement"] == pytest.approx(1 - flipped / criteria)
    e1 = [v for k, v in r["per_criterion"].items() if k.startswith("E · ")]
    assert sum(v["verdicts"] - v["both_known"] * v["agreement"] for v in e1) == pytest.approx(3)
    assert r["by_kind"]["additional"]["agreement"] == 1.0
    assert r["unknown_rate"] == {"a": 0.0, "b": 0.0}
    assert r["kappa_ci95"][0] <= r["kappa"] <= r["kappa_ci95"][1]
    # the same judge on both sides: perfect agreement
    assert main(["agreement", "--run", str(run), "--a.kind", "rule", "--b.kind", "rule",
                 "--resamples", "20", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["agreement"] == 1.0


def test_noisy_rule_judge_and_consistency(run_files, tmp_path):
    run, _, criteria = run_files
    out = tmp_path / "n.json"
    assert main(["agreement", "--run", str(run), "--a.kind", "rule", "--b.kind", "rule",
                 "--b.noise", "0.3", "--seed", "2", "--resamples", "50", "--consistency", "b",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert 0.5 < r["agreement"] < 0.9  # ~30% of verdicts flipped
    # the simulated judge's errors are a function of the answer, not of the criteria's order
    c = r["consistency"]
    assert (c["judge"], c["flips"], c["both_known"]) == ("b", 0, criteria)


def test_bad_invocations(run_files, tmp_path, capsys):
    run, _, _ = run_files
    assert main(["agreement", "--run", str(run)]) == 2
    assert "name both judges" in capsys.readouterr().err
    assert main(["agreement", "--run", str(run), "--b.kind", "openai", "--b.bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert "--b.bogus: unknown judge option" in err and "--b.model" in err  # every problem
    assert main(["agreement", "--run", str(tmp_path), "--b.kind", "rule"]) == 1
    assert "config.yaml: missing" in capsys.readouterr().err
    assert main(["agreement", "--run", str(run), "--rounds", "3", "--b.kind", "rule"]) == 1
    assert "no complete round [3] (has [0])" in capsys.readouterr().err
    yaml = tmp_path / "judge.yaml"
    yaml.write_text("judge:\n  kind: rule\n  nois: 0.1\n")
    assert main(["agreement", "--run", str(run), "--b", str(yaml)]) == 2
    assert "nois: unknown key (from " in capsys.readouterr().err
    assert main(["agreement", "--run", str(run), "--a", str(tmp_path / "recorded-a"),
                 "--b.kind", "rule", "--consistency"]) == 2


def test_openai_judge_on_a_preference_file(toy_pools, tmp_path):
    """The scripted server grading by the rules (now and then forgetting a criterion) agrees
    with the rule judge on every verdict it gives; grading by a hash of the prompt, it flips
    verdicts when the criteria come in another order."""
    records = load_pool(toy_pools.train)[:4]
    raws = [json.loads(x) for x in toy_pools.train.read_text().splitlines()][:4]
    rng = random.Random(2)
    data = toy_pools.train.parent / "agreement_prefs.jsonl"  # beside the images it names
    with data.open("w") as f:
        for raw in raws:
            f.write(json.dumps({"id": raw["id"], "images": raw["images"],
                                "instruction": raw["instruction"], "rubric": raw["rubric"],
                                "responses": [raw["reference"], toy.flawed_answers(raw, rng)[0]],
                                "preferred": 0}) + "\n")
    out = tmp_path / "o.json"
    with FakeOpenAIServer(judging="rule", pools=[str(toy_pools.train)]) as srv:
        assert main(["agreement", "--data", str(data), "--a.kind", "rule", "--b.kind", "openai",
                     "--b.model", srv.model, "--b.base-url", srv.url, "--resamples", "50",
                     "--out", str(out)]) == 0
        r = json.loads(out.read_text())
        assert srv.problems == [] and r["responses"] == 8
        assert r["agreement"] == 1.0 and r["unknown_rate"]["a"] == 0.0
        n = sum(len(rec.rubric.criteria()) for rec in records) * 2
        assert r["verdicts"] == n and r["both_known"] == round(n * (1 - r["unknown_rate"]["b"]))
        assert r["judge_stats"]["b"]["requests"] == 8
    with FakeOpenAIServer(judging="hash") as srv:
        assert main(["agreement", "--data", str(data), "--a.kind", "openai", "--a.model",
                     srv.model, "--a.base-url", srv.url, "--b.kind", "rule", "--consistency",
                     "--resamples", "20", "--out", str(out)]) == 0
        c = json.loads(out.read_text())["consistency"]
        assert c["judge"] == "a" and c["responses"] == 8 and c["both_known"] > 30
        assert 0 < c["flips"] < c["both_known"] and srv.request_count == 16
