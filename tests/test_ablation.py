"""rdpo.dev.ablation.run's evidence: arms from eval.json files, the equal-start check, round summaries,
tables, figure, and the docs/ablation.md section generated from the committed JSON.

The training half is `fit()` (covered by tests/test_fit.py); these tests write the files a run
leaves and check what the ablation makes of them.
"""

import json
import statistics

import pytest
from PIL import Image
from small_toy import ROOT

from rdpo.dev.ablation.report import (
    BEGIN,
    END,
    METRICS,
    STRATEGIES,
    readme_is_current,
    readme_section,
    split,
)
from rdpo.dev.ablation.run import (
    collect,
    dirty_code,
    export_runs,
    main,
    round_summaries,
    run_dir,
)

BEFORE = {0: 0.40, 1: 0.42, 2: 0.38}
AFTER = {("rubric", 0): 0.60, ("rubric", 1): 0.62, ("rubric", 2): 0.58,
         ("rubric_holistic", 0): 0.55, ("rubric_holistic", 1): 0.52, ("rubric_holistic", 2): 0.55,
         ("outcome", 0): 0.50, ("outcome", 1): 0.47, ("outcome", 2): 0.61}
FACTS = {"command": "python -m rdpo.ablation --seeds 0 1 2", "seconds": 100.0, "seeds": [0, 1, 2],
         "settings": {"toy.task": "hard", "judge.noise": 0.05, "judge.outcome": "holistic",
                      "judge.outcome_noise": 1.25, "dpo.max_steps": 120,
                      "rollout.every_n_steps": 30, "data.prompts_per_round": 48,
                      "rollout.samples_per_prompt": 6, "eval.samples_per_prompt": 4,
                      "toy.n_heldout": 48},
         "machine": {"commit": "0123456789abcdef", "dirty_files": [], "torch": "2.x",
                     "threads": 2, "cpu_count": 2, "cpu": "cpu", "isa": ["avx2"]}}


def _metrics(x: float) -> dict:
    # Each metric its own number, so a mixed-up column shows: metric i is x + i/100.
    return {m: x + i / 100 for i, m in enumerate(METRICS)}


def _write(runs, strategy, seed, before=None):
    d = run_dir(runs, strategy, seed)
    d.mkdir(parents=True)
    kept = {"rubric": 3, "rubric_holistic": 4, "outcome": 5}[strategy]
    (d / "rounds.json").write_text(json.dumps([
        {"round": i, "prompts": 6, "kept": kept, "dropped": {"tie": 6 - kept, "truncated": 0}}
        for i in range(2)]))
    (d / "eval.json").write_text(json.dumps({
        "before": _metrics(before if before is not None else BEFORE[seed]),
        "after": _metrics(AFTER[(strategy, seed)])}))
    (d / "config.yaml").write_text(f"pairs:\n  strategy: {strategy}\n")
    return d


@pytest.fixture
def docs(tmp_path):
    docs = tmp_path / "docs"
    for seed in BEFORE:
        for strategy in STRATEGIES:
            _write(docs / "runs", strategy, seed)
    (docs / "ablation.json").write_text(json.dumps(FACTS))
    return docs


def test_arms_from_the_runs(docs):
    arms = collect(docs / "runs", [0, 1, 2])
    assert arms["base"].values["truth_score"] == [0.40, 0.42, 0.38]
    assert arms["rubric"].values["rubric_score"] == pytest.approx([0.63, 0.65, 0.61])
    s = arms["outcome"].summary()["truth_score"]
    assert s["mean"] == pytest.approx((0.50 + 0.47 + 0.61) / 3)
    assert s["std"] == pytest.approx(statistics.stdev([0.50, 0.47, 0.61]))
    assert (s["min"], s["max"]) == (0.47, 0.61)


def test_unequal_start_is_an_error(tmp_path):
    _write(tmp_path, "rubric", 0)
    _write(tmp_path, "outcome", 0)
    _write(tmp_path, "rubric_holistic", 0, before=0.41)
    with pytest.raises(ValueError, match="seed 0: the runs' 'before' truth_score differ "
                       r"\(outcome 0.4, rubric_holistic 0.41, rubric 0.4\)"):
        collect(tmp_path, [0])


def test_missing_run_names_the_file(docs, capsys):
    (run_dir(docs / "runs", "outcome", 2) / "eval.json").unlink()
    assert main(["--collect-only", "--docs", str(docs), "--readme", ""]) == 2
    assert "outcome-seed2/eval.json: missing" in capsys.readouterr().err


def test_collect_only_writes_json_table_figure_and_page(docs, tmp_path):
    readme = tmp_path / "page.md"
    readme.write_text(f"# x\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    assert main(["--collect-only", "--docs", str(docs), "--page", str(readme)]) == 0
    data = json.loads((docs / "ablation.json").read_text())
    assert data["machine"]["commit"] == "0123456789abcdef"  # the run's facts are kept
    assert data["arms"]["rubric"]["summary"]["truth_score"]["mean"] == pytest.approx(0.60)
    md = (docs / "ablation.md").read_text()
    # truth | correct | hallucinating | rubric | essential, mean ± std (min–max)
    assert ("| rubric filtering (rDPO) | 0.600 ± 0.020 (0.580–0.620) | 61.0 ± 2.0 (59.0–63.0) | "
            "62.0 ± 2.0 (60.0–64.0) | 0.630 ± 0.020 (0.610–0.650) | 64.0 ± 2.0 (62.0–66.0) |") in md
    # per-seed differences +0.10, +0.15, -0.03: the verdict counts the seed the outcome arm won
    assert "rubric − outcome, ground truth score: +0.073 ± 0.093 (rubric ahead on 2 of 3 seeds)" in md
    # holistic − outcome +0.05, +0.05, -0.06; rubric − holistic +0.05, +0.10, +0.03
    assert ("rubric_holistic − outcome, ground truth score: +0.013 ± 0.064 (rubric_holistic "
            "ahead on 2 of 3 seeds)") in md
    assert "rubric − rubric_holistic, ground truth score: +0.060 ± 0.036 (rubric ahead on 3 of 3" in md
    # fewer hallucinating answers is better: a positive difference is not 'ahead'
    assert ("rubric − outcome, hallucinating answers: +7.3 ± 9.3 points (rubric ahead on 1 of 3 "
            "seeds)") in md
    # columns: base | outcome | holistic | rubric
    assert "| 2 | 0.380 / 0.410 | 0.610 / 0.640 | 0.550 / 0.580 | 0.580 / 0.610 |" in md
    assert "| holistic score, rubric as context | 0.540 ± 0.017 (0.520–0.550) |" in md
    with Image.open(docs / "ablation.png") as im:
        assert im.format == "PNG" and im.size == (1600, 480)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nintro\n\n") and text.endswith("after\n")
    assert readme_is_current(readme, data)
    assert "`python -m rdpo.ablation --seeds 0 1 2`" in text and "commit `0123456789ab`" in text
    assert "| rubric | 3.0 / 6 | tie 18 |" in text  # 2 rounds x 3 seeds x 3 ties
    assert "| rubric_holistic | 4.0 / 6 | tie 12 |" in text
    assert "](ablation/ablation.png)" in text  # relative to docs/, beside docs/ablation/
    data["arms"]["rubric"]["values"]["truth_score"][0] = 0.9
    assert not readme_is_current(readme, data)


def test_round_summaries_and_export(tmp_path):
    out = tmp_path / "runs"
    src = _write(out, "rubric", 0)
    for i, kept in enumerate((3, 5)):
        r = src / "rounds" / f"{i:04d}"
        r.mkdir(parents=True)
        summary = {"prompts": 6, "kept": kept, "dropped": {"tie": 6 - kept},
                   "truncated_responses": i}
        (r / "pairs.jsonl").write_text('{"prompt_id": "p"}\n' + json.dumps({"summary": summary}) + "\n")
        (r / "rollouts.jsonl").write_text("".join(json.dumps({"score": s}) + "\n" for s in (0.2, 0.6)))
    rounds = round_summaries(src)
    assert [(r["round"], r["kept"], r["dropped"]["tie"], r["truncated_responses"]) for r in rounds] \
        == [(0, 3, 3, 0), (1, 5, 1, 1)]
    assert rounds[1]["mean_judged_score"] == pytest.approx(0.4)
    for strategy in ("outcome", "rubric_holistic"):
        _write(out, strategy, 0)
        (run_dir(out, strategy, 0) / "rounds").mkdir()
    export_runs(out, tmp_path / "docs", [0])
    copied = run_dir(tmp_path / "docs" / "runs", "rubric", 0)
    assert json.loads((copied / "rounds.json").read_text()) == rounds
    assert (copied / "eval.json").read_text() == (src / "eval.json").read_text()


def test_default_page_is_docs_ablation_md(docs, tmp_path, monkeypatch):
    """Without --page the section of docs/ablation.md (from the working directory, the
    repository root) is rewritten; --readme is the same option under its old name."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    page = repo / "docs" / "ablation.md"
    page.write_text(f"# Ablation\n\n{BEGIN}\nold table\n{END}\n")
    monkeypatch.chdir(repo)
    assert main(["--collect-only", "--docs", str(docs)]) == 0
    data = json.loads((docs / "ablation.json").read_text())
    assert readme_is_current(page, data) and "old table" not in page.read_text()
    page.write_text(f"# Ablation\n\n{BEGIN}\nold table\n{END}\n")
    assert main(["--collect-only", "--docs", str(docs), "--readme", str(page)]) == 0
    assert readme_is_current(page, data)


def test_committed_page_is_current():
    """docs/ablation.md's generated section is exactly what docs/ablation/ablation.json
    generates (rerun `python -m rdpo.ablation --collect-only` after changing either)."""
    data = json.loads((ROOT / "docs/ablation/ablation.json").read_text())
    assert readme_is_current(ROOT / "docs/ablation.md", data), "docs/ablation.md's section is stale"
    assert readme_section(data).count(BEGIN) == 1
    for seed in data["seeds"]:  # every run behind the table is committed
        for strategy in STRATEGIES:
            d = run_dir(ROOT / "docs/ablation/runs", strategy, seed)
            assert {"eval.json", "config.yaml", "rounds.json"} <= {p.name for p in d.iterdir()}
    arms = collect(ROOT / "docs/ablation/runs", data["seeds"])  # and the JSON is theirs
    assert {a: s.values for a, s in arms.items()} == {a: v["values"] for a, v in data["arms"].items()}


def test_split_of_the_effect():
    """outcome -> rubric on the mean, split at the holistic arm: knowing the criteria, then the
    checklist structure; shares of the whole."""
    data = {"arms": {a: {"summary": {"hallucination_rate": {"mean": m}}}
                     for a, m in (("outcome", 0.50), ("rubric_holistic", 0.40), ("rubric", 0.30))}}
    assert split(data, "hallucination_rate") == (
        "Hallucinating answers, outcome → rubric filtering: -20.0 points (mean over seeds), of "
        "which the judge knowing the criteria (outcome → holistic score with the rubric as "
        "context) -10.0 points (50% of it) and the checklist structure (holistic → rubric) "
        "-10.0 points (50% of it).")
    data["arms"]["rubric"]["summary"]["hallucination_rate"]["mean"] = 0.50  # no effect: no shares
    assert "-10.0 points and the checklist structure (holistic → rubric) +10.0 points." \
        in split(data, "hallucination_rate")


def test_dirty_code_leaves_out_the_evidence_being_written():
    porcelain = (" M docs/ablation/runs/rubric-seed0/eval.json\nM  docs/ablation.md\n"
                 " M rdpo/rounds.py\nR  a.py -> b.py\n M docs/ablation-old/x\n")
    assert dirty_code(porcelain, ("docs/ablation", "docs/ablation.md")) == [
        "rdpo/rounds.py", "a.py -> b.py", "docs/ablation-old/x"]
    assert dirty_code("") == []
