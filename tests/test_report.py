"""Run reports from real tiny runs: files, images, numbers, overlays, runs in progress, errors."""

import json
import shutil

import pytest
from PIL import Image

from rdpo.config import load_config
from rdpo.fit import fit
from rdpo.report import CriterionMove, criterion_moves, main, write_report
from rdpo.report.rundir import RoundStats, RunData, load_run

# Only the tests that take `runs` train (slow); the others write run files by hand.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(small_toy, tmp_path_factory):
    """Two real runs: three rounds of two steps (report written by fit), and a one-round run."""
    root = tmp_path_factory.mktemp("report")
    a = fit(load_config("configs/quickstart.yaml", small_toy.overrides + [
        f"run.dir={root / 'a' / 'run'}", "dpo.max_steps=6", "rollout.every_n_steps=2"]))
    b = fit(load_config("configs/quickstart.yaml", small_toy.overrides + [
        f"run.dir={root / 'b' / 'run'}", "dpo.max_steps=2", "rollout.every_n_steps=2",
        "run.seed=1", "data.heldout_pool=null", "run.report=false"]))
    return a, b


def _check_png(path, size=(1800, 2000)):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        # drawn on, not blank: panels, lines and text give many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 200


@slow
def test_fit_writes_its_report(runs):
    a, b = runs
    _check_png(a.run_dir / "report.png")
    md = (a.run_dir / "report.md").read_text()
    ev = a.eval
    before, after = ev["before"]["rubric_score"], ev["after"]["rubric_score"]
    assert f"| {before:.3f} → {after:.3f} |" in md
    assert "![run report](report.png)" in md
    # run.report=false: no report
    assert not (b.run_dir / "report.png").exists() and not (b.run_dir / "report.md").exists()


@slow
def test_numbers_match_the_run_files(runs):
    a, _ = runs
    run = load_run(a.run_dir)
    assert [r.index for r in run.rounds] == [0, 1, 2] and [r.step for r in run.rounds] == [0, 2, 4]
    for stats, history in zip(run.rounds, a.rounds, strict=True):
        assert stats.mean_score == pytest.approx(history["mean_score"])
        assert stats.essential_pass_rate == pytest.approx(history["essential_pass_rate"])
        assert stats.kept == history["pairs"] and stats.prompts == 16 and stats.responses == 64
        assert stats.kept + sum(stats.dropped.values()) == 16
        assert stats.dropped == history["dropped"]
    # per-criterion counts: every non-null verdict of the round, under its rubric text
    rows = [json.loads(x) for x in (a.run_dir / "rounds/0000/rollouts.jsonl").open()]
    judged = sum(v is not None for r in rows for v in r["verdicts"].values())
    met = sum(v is True for r in rows for v in r["verdicts"].values())
    crit = run.rounds[0].criteria
    assert sum(n for _, n in crit.values()) == judged and sum(m for m, _ in crit.values()) == met
    assert "A · Ends with a full stop." in crit  # labels come from the pool's rubric texts
    assert run.last_step == 5  # steps 0..5 logged
    margins = run.metric("train/rewards/margins")
    assert [s for s, _ in margins] == list(range(6)) and margins[0][1] == pytest.approx(0, abs=1e-4)


@slow
def test_overlay_of_two_runs(runs, tmp_path):
    a, b = runs
    result = write_report([a.run_dir, b.run_dir], tmp_path / "cmp.png")
    assert (result.png, result.markdown) == (tmp_path / "cmp.png", tmp_path / "cmp.md")
    _check_png(result.png)
    # both directories are called "run": the legend names them by their parents
    assert [r.name for r in result.runs] == ["a/run", "b/run"]
    md = result.markdown.read_text()
    assert "| a/run | rubric | 3 |" in md and "| b/run | rubric | 1 |" in md
    assert "round 0 vs round 2" in md and "round 0 vs round 0" in md  # single-round run


@slow
def test_run_still_going(runs, tmp_path):
    """No eval.json yet, the last round half written, metrics.csv cut mid-line."""
    a, _ = runs
    run_dir = tmp_path / "going"
    shutil.copytree(a.run_dir, run_dir, ignore=shutil.ignore_patterns("adapter", "report.*"))
    (run_dir / "eval.json").unlink()
    pairs = run_dir / "rounds/0002/pairs.jsonl"
    pairs.write_text("".join(pairs.read_text().splitlines(keepends=True)[:-1]))  # no summary yet
    metrics = run_dir / "logs/metrics.csv"
    text = metrics.read_text()
    metrics.write_text(text[:len(text) - 40])
    assert main([str(run_dir)]) == 0
    _check_png(run_dir / "report.png")
    run = load_run(run_dir)
    assert [r.index for r in run.rounds] == [0, 1]
    md = (run_dir / "report.md").read_text()
    assert "| going | rubric | 2 |" in md and "| – | – |" in md  # no held-out numbers yet


def test_run_with_nothing_yet(tmp_path):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("rollout:\n  every_n_steps: 5\n")
    result = write_report([run_dir])
    _check_png(result.png)
    assert "No round written yet." in result.markdown.read_text()


def test_unknown_verdicts_are_left_out_of_pass_rates(tmp_path):
    d = tmp_path / "run" / "rounds" / "0000"
    d.mkdir(parents=True)
    rows = [{"prompt_id": "p", "sample": i, "response": "x", "verdicts": {"E1": v, "A1": True},
             "score": 0.5, "essential_pass": v, "unknown": int(v is None)}
            for i, v in enumerate([True, False, None, None])]
    (d / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "pairs.jsonl").write_text(json.dumps(
        {"summary": {"prompts": 1, "kept": 0, "dropped": {"tie": 1}}}) + "\n")
    run = load_run(tmp_path / "run")
    stats = run.rounds[0]
    assert stats.criteria == {"E1": (1, 2), "A1": (4, 4)}  # 2 unknowns neither met nor failed
    assert stats.unknown_verdicts == 2 and stats.essential_pass_rate == 0.25


def test_criteria_ranked_by_evidence_not_by_size():
    def stats(criteria):
        return RoundStats(0, 0, 1, 1, 0.0, 0.0, 0, 0, {}, criteria)

    first = stats({"broad": (300, 600), "narrow": (9, 12), "rare": (1, 2)})
    last = stats({"broad": (420, 600), "narrow": (3, 12), "rare": (2, 2)})
    run = RunData("r", None, rounds=[first, last])
    source, moves = criterion_moves(run, top=None, min_judged=10)
    # +20 pts on 600 samples beats -50 pts on 12; 'rare' (2 samples) is not ranked at all
    assert [m.text for m in moves] == ["broad", "narrow"]
    assert moves[0].change == pytest.approx(0.2) and source == "training prompts, round 0 vs round 0"
    assert CriterionMove("x", 0.5, 0.5, 10, 10).z == 0.0


@slow
def test_bad_input_names_the_file_and_line(runs, tmp_path, capsys):
    a, _ = runs
    assert main([str(tmp_path / "missing")]) == 2
    assert "missing: no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "not an rdpo run directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(a.run_dir, broken, ignore=shutil.ignore_patterns("adapter"))
    rollouts = broken / "rounds/0001/rollouts.jsonl"
    lines = rollouts.read_text().splitlines(keepends=True)
    rollouts.write_text("".join(lines[:2] + ['{"prompt_id": "x", "verdicts": {}}\n'] + lines[2:]))
    with pytest.raises(ValueError, match=r"rounds/0001/rollouts\.jsonl:3: bad rollout record"):
        write_report([broken])
    rollouts.write_text("".join(lines[:4] + ["{not json\n"]))
    with pytest.raises(ValueError, match=r"rollouts\.jsonl:5: invalid JSON"):
        write_report([broken])


def test_outcome_rounds_have_no_criteria(tmp_path):
    """pairs.strategy=outcome writes {"outcome": 1-10} verdicts: scores, not criteria."""
    d = tmp_path / "run" / "rounds" / "0000"
    d.mkdir(parents=True)
    rows = [{"prompt_id": "p", "sample": i, "response": "x", "verdicts": {"outcome": v},
             "score": (v - 1) / 9, "essential_pass": True, "unknown": 0} for i, v in enumerate([10, 1])]
    (d / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "pairs.jsonl").write_text(json.dumps(
        {"summary": {"prompts": 1, "kept": 1, "dropped": {}}}) + "\n")
    (tmp_path / "run" / "config.yaml").write_text("pairs:\n  strategy: outcome\n")
    stats = load_run(tmp_path / "run").rounds[0]
    assert stats.criteria == {} and stats.mean_score == 0.5
    result = write_report([tmp_path / "run"])
    _check_png(result.png)
    md = result.markdown.read_text()
    # essential criteria pass vacuously in outcome mode: the round pass rate is not shown
    assert "| run | outcome | 1 | 0 | – | – | 0.500 | – | 1/1 | 0 |" in md
    assert "no per-criterion pass rates" in md
