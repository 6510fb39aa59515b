"""`python -m rdpo.rubrics audit`: hand-made round files with known findings, discrimination on
a hand-made preference file, and both issue-26 commands (audit, evaluate agreement) on a real
small-toy run's rounds."""

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from rdpo.config import load_config
from rdpo.demo import toy
from rdpo.tools.audit import Thresholds, audit_run, read_rounds
from rdpo.tools.evaluate import main as evaluate_main
from rdpo.tools.rubrics import main

RUBRICS = {
    "p1": {"essential": [{"id": "E1", "text": "Says red.", "check": {"any": ["red"]}},
                         {"id": "E2", "text": "Says circle.", "check": {"any": ["circle"]}}],
           "additional": [{"id": "A1", "text": "Says one.", "weight": 1.0,
                           "check": {"any": ["\\bone\\b"]}}]},
    "p2": {"essential": [{"id": "E1", "text": "Says blue.", "check": {"any": ["blue"]}}],
           "additional": [{"id": "A1", "text": "No triangle.", "weight": 0.5,
                           "check": {"none": ["triangle"]}}]},
    "p3": {"essential": [{"id": "E1", "text": "Says green."}],
           "additional": [{"id": "A1", "text": "Is short.", "weight": 1.0}]},
}
T, F, U = True, False, None
# round -> prompt -> the verdicts of its 3 samples (E1, E2, A1 / E1, A1)
ROUNDS = {
    0: {"p1": [(T, T, F), (T, F, F), (T, T, U)],   # E1 constant and saturated, E2 varies, A1 constant
        "p2": [(F, U), (F, U), (F, T)],            # E1 constant; A1 one known verdict: tells nothing
        "p3": [(U, T), (U, T), (U, T)]},           # E1 never known; A1 constant, saturated
    1: {"p1": [(T, T, T), (T, T, F), (T, T, F)],   # E1, E2 constant and saturated, A1 varies
        "p2": [(T, U), (F, U), (F, U)],            # E1 varies now
        "p3": [(U, T), (U, T), (U, T)]},
}
PAIRS = {0: (["p1"], {"tie": ["p2"], "too_few_eligible": ["p3"]}),
         1: (["p1", "p2"], {"too_few_eligible": ["p3"]})}


def _image(folder):
    (folder / "img.png").parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(folder / "img.png")


@pytest.fixture
def hand_run(tmp_path):
    _image(tmp_path)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": pid, "images": ["img.png"], "instruction": "Q?",
                                        "rubric": rubric}) + "\n" for pid, rubric in RUBRICS.items()))
    run = tmp_path / "run"
    for r, prompts in ROUNDS.items():
        d = run / "rounds" / f"{r:04d}"
        d.mkdir(parents=True)
        rows = []
        for pid, samples in prompts.items():
            ids = [c["id"] for k in ("essential", "additional") for c in RUBRICS[pid][k]]
            rows += [{"prompt_id": pid, "sample": i, "response": f"{pid} answer {i}",
                      "verdicts": dict(zip(ids, v, strict=True)), "score": 0.5}
                     for i, v in enumerate(samples)]
        (d / "rollouts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        kept, dropped = PAIRS[r]
        (d / "pairs.jsonl").write_text("".join(json.dumps({"prompt_id": p}) + "\n" for p in kept)
                                       + json.dumps({"summary": {
                                           "prompts": 3, "kept": len(kept),
                                           "dropped": {k: len(v) for k, v in dropped.items()},
                                           "dropped_ids": dropped}}) + "\n")
    return pool, run


def test_findings_on_hand_made_rounds(hand_run, tmp_path, capsys):
    pool, run = hand_run
    out = tmp_path / "audit"
    assert main(["audit", str(pool), "--run", str(run), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert md == (out / "audit.md").read_text()
    r = json.loads((out / "audit.json").read_text())["run"]
    crit = {f"{c['prompt_id']}/{c['criterion']}": c for c in r["criteria"]}
    assert {k for k, c in crit.items() if c["never_varies"]} == {"p1/E1", "p3/A1"}
    assert crit["p1/E1"]["stuck_at"] == "met" and crit["p1/A1"]["never_varies"] is False
    assert crit["p2/A1"]["never_varies"] is False  # no round had 2 known verdicts
    assert {k for k, c in crit.items() if c["mostly_unknown"]} == {"p3/E1"}
    assert crit["p2/A1"]["unknown_rate"] == pytest.approx(5 / 6)
    assert {k: c["saturated_rounds"] for k, c in crit.items() if c["saturated_rounds"]} == {
        "p1/E1": [0, 1], "p1/E2": [1], "p3/A1": [0, 1]}
    assert r["summary"] == {"criteria": 7, "never_varies": 2, "mostly_unknown": 1, "saturated": 3}
    r0, r1 = r["rounds"]
    assert (r0["criteria"], r0["constant"], r0["saturated"], r0["pairs"]) == (7, 4, 2, 1)
    assert (r1["constant"], r1["saturated"], r1["pairs"]) == (3, 3, 2)
    assert r0["unknown_rate"] == pytest.approx(6 / 21) and r0["dropped"] == {
        "tie": 1, "too_few_eligible": 1}
    recs = {x["prompt_id"]: x for x in r["records"]}
    assert [x["prompt_id"] for x in r["records"] if x["never_paired"]] == ["p3"]
    assert recs["p3"]["drop_reasons"] == {"too_few_eligible": 2}
    assert (recs["p3"]["criteria_never_vary"], recs["p3"]["criteria"]) == (1, 2)
    assert (recs["p1"]["pairs"], recs["p2"]["pairs"], recs["p2"]["drops"]) == (2, 1, {"0": "tie"})
    assert "## Records that never yield a pair: 1 of 3" in md
    assert "| p3 | 2 | too_few_eligible 2 | 1 of 2 |" in md
    assert "## Criteria that never vary across a prompt's samples: 2 of 7" in md
    # thresholds are options: at 80% unknown p2's A1 counts too; round 1 only
    assert main(["audit", str(pool), "--run", str(run), "--unknown", "0.8", "--rounds", "1",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["thresholds"] == {"saturated": 0.95, "unknown": 0.8, "min_samples": 2}
    assert [x["round"] for x in r["run"]["rounds"]] == [1]
    assert {f"{c['prompt_id']}/{c['criterion']}" for c in r["run"]["criteria"]
            if c["mostly_unknown"]} == {"p2/A1", "p3/E1"}


def test_pure_function_and_one_score_rounds(hand_run):
    pool, run = hand_run
    from rdpo.pool import load_pool

    records = {r.id: r for r in load_pool(pool)}
    rounds = read_rounds(run, [0])
    # min_samples 3: p1's A1 (2 known in round 0) no longer shows as constant
    result = audit_run(records, rounds, Thresholds(min_samples=3))
    assert result["rounds"][0]["constant"] == 3
    # an outcome run's rows: one score, no criteria
    rounds[0].rows[:] = [{**row, "verdicts": {"outcome": 7}} for row in rounds[0].rows]
    result = audit_run(records, rounds)
    assert result["one_score_rounds"] == 3 and result["criteria"] == []
    assert [x["prompt_id"] for x in result["records"] if x["never_paired"]] == ["p2", "p3"]


def test_bad_inputs(hand_run, tmp_path, capsys):
    pool, run = hand_run
    assert main(["audit", str(pool), "--run", str(run), "--saturated", "1.5",
                 "--min-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "--saturated: must be in [0, 1], got 1.5" in err and "--min-samples: at least 2" in err
    assert main(["audit", str(pool)]) == 1
    assert "give --run RUN" in capsys.readouterr().err
    small = tmp_path / "small.jsonl"
    small.write_text(pool.read_text().splitlines()[0] + "\n")
    assert main(["audit", str(small), "--run", str(run)]) == 1
    assert "the rounds judged prompt(s) the pool lacks: ['p2', 'p3']" in capsys.readouterr().err
    (run / "rounds/0001/rollouts.jsonl").write_text("{not json\n")
    assert main(["audit", str(pool), "--run", str(run)]) == 1
    assert "rounds/0001/rollouts.jsonl:1: not JSON" in capsys.readouterr().err


def test_discrimination_on_hand_made_preferences(tmp_path, capsys):
    """Rule judge: right when the preferred answer meets more; wrong when the rubric's pitfall
    (no triangle) penalises the preferred answer; a tie; an unknown (no check on E1)."""
    _image(tmp_path)
    prefs = tmp_path / "prefs.jsonl"
    rows = [("right", RUBRICS["p1"], ["one red circle", "a blue square"], 0),
            ("wrong", RUBRICS["p2"], ["a blue sky, no shapes", "a blue triangle"], 1),
            ("tie", RUBRICS["p1"], ["a red circle", "red circle"], 0),
            ("unknown", RUBRICS["p3"], ["green", "blue"], 0)]
    prefs.write_text("".join(json.dumps({"id": i, "images": ["img.png"], "instruction": "Q?",
                                         "rubric": rb, "responses": rs, "preferred": p}) + "\n"
                             for i, rb, rs, p in rows))
    judge = tmp_path / "judge.yaml"
    judge.write_text("judge:\n  kind: rule\n")
    assert main(["audit", str(prefs), "--judge", str(judge), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["discrimination"]
    assert (d["pairs"], d["right"], d["wrong"], d["tie"], d["unknown"]) == (4, 1, 1, 1, 1)
    assert d["accuracy"] == 0.25
    assert d["wrong_records"] == [{"id": "wrong", "preferred_score": pytest.approx(1 / 2),
                                   "other_score": pytest.approx(1.0), "deciding": [
                                       {"criterion": "A1", "text": "No triangle.",
                                        "preferred": False, "other": True}]}]
    assert main(["audit", str(prefs)]) == 1
    assert "needs a judge: --judge YAML or --run" in capsys.readouterr().err


# -- a real run -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_run(small_toy, tmp_path_factory):
    """Two rounds of two steps of the small toy (quickstart settings, rule judge)."""
    from rdpo.fit import fit

    root = tmp_path_factory.mktemp("audit_run")
    cfg = load_config("configs/quickstart.yaml", [
        *small_toy.overrides, f"run.dir={root / 'run'}", "dpo.max_steps=4",
        "rollout.every_n_steps=2", "data.heldout_pool=null", "run.report=false"])
    return cfg, fit(cfg).run_dir


@pytest.mark.slow
def test_both_commands_on_a_toy_run(toy_run, tmp_path, capsys):
    cfg, run = toy_run
    pool = cfg.data.train_pool
    out = tmp_path / "audit"
    assert main(["audit", pool, "--run", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    r = json.loads((out / "audit.json").read_text())["run"]
    summaries = [json.loads((run / f"rounds/{i:04d}/pairs.jsonl").read_text().splitlines()[-1])
                 ["summary"] for i in range(2)]
    assert [x["pairs"] for x in r["rounds"]] == [s["kept"] for s in summaries]
    assert [x["prompts"] for x in r["rounds"]] == [16, 16]
    assert [x["responses"] for x in r["rounds"]] == [64, 64]
    unpaired = [x for x in r["records"] if x["never_paired"]]
    dropped = {pid for s in summaries for ids in s["dropped_ids"].values() for pid in ids}
    assert {x["prompt_id"] for x in unpaired} <= dropped
    assert all(sum(x["drop_reasons"].values()) == x["rounds"] == 2 for x in unpaired)
    from rdpo.pool import load_pool

    assert r["summary"]["criteria"] == sum(len(x.rubric.criteria()) for x in load_pool(pool))
    # agreement: the recorded verdicts (the exact rule judge) against itself and a noisy one
    res = tmp_path / "agree.json"
    assert evaluate_main(["agreement", "--run", str(run), "--a", str(run / "config.yaml"),
                          "--resamples", "100", "--b.kind", "rule", "--out", str(res)]) == 0
    assert json.loads(res.read_text())["agreement"] == 1.0
    assert evaluate_main(["agreement", "--run", str(run), "--b.kind", "rule", "--b.noise", "0.1",
                          "--consistency", "b", "--resamples", "200", "--out", str(res)]) == 0
    a = json.loads(res.read_text())
    assert 0.82 < a["agreement"] < 0.97 and 0.4 < a["kappa"] < 0.95
    assert a["kappa_ci95"][0] < a["kappa"] < a["kappa_ci95"][1]
    assert a["unknown_rate"] == {"a": 0.0, "b": 0.0} and a["consistency"]["flips"] == 0
    assert set(a["by_kind"]) == {"essential", "additional"} and len(a["per_criterion"]) > 10
    # discrimination: the pool's references against a hallucinating answer, the run's judge
    raws = [json.loads(x) for x in open(pool).read().splitlines()]
    prefs = Path(pool).parent / "audit_prefs.jsonl"  # beside the pool's images
    rng = random.Random(0)
    prefs.write_text("".join(json.dumps({
        "id": raw["id"], "images": raw["images"], "instruction": raw["instruction"],
        "rubric": raw["rubric"], "responses": [toy.flawed_answers(raw, rng)[0], raw["reference"]],
        "preferred": 1}) + "\n" for raw in raws))
    assert main(["audit", str(prefs), "--run", str(run), "--out", str(out)]) == 0
    d = json.loads((out / "audit.json").read_text())["discrimination"]
    assert d["pairs"] == 16 and d["right"] == 16 and d["accuracy"] == 1.0
    assert "## Discrimination on reference responses" in (out / "audit.md").read_text()
