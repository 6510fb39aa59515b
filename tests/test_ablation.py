"""rdpo.ablation's tabulation: arms from eval.json files, the equal-start check, table and figure.

The training half is `fit()` (covered by tests/test_fit.py); these tests write the eval.json
files a run leaves and check what the ablation makes of them.
"""

import json
import statistics

import pytest
from PIL import Image

from rdpo.ablation import collect, main, render_markdown, run_dir

BEFORE = {0: (0.40, 0.30), 1: (0.42, 0.32), 2: (0.38, 0.28)}
AFTER = {("rubric", 0): (0.60, 0.55), ("rubric", 1): (0.62, 0.50), ("rubric", 2): (0.58, 0.52),
         ("outcome", 0): (0.50, 0.40), ("outcome", 1): (0.47, 0.41), ("outcome", 2): (0.49, 0.39)}


def _write(out, strategy, seed, before=None):
    d = run_dir(out, strategy, seed)
    d.mkdir(parents=True)
    b, a = before or BEFORE[seed], AFTER[(strategy, seed)]
    (d / "eval.json").write_text(json.dumps({
        "before": {"rubric_score": b[0], "essential_pass_rate": b[1]},
        "after": {"rubric_score": a[0], "essential_pass_rate": a[1]}, "gain": a[0] - b[0]}))


@pytest.fixture
def out(tmp_path):
    for seed in BEFORE:
        for strategy in ("rubric", "outcome"):
            _write(tmp_path, strategy, seed)
    return tmp_path


def test_arms_from_the_runs(out):
    arms = collect(out, [0, 1, 2])
    assert arms["base"].rubric_score == [0.40, 0.42, 0.38]
    assert arms["rubric"].essential_pass_rate == [0.55, 0.50, 0.52]
    s = arms["outcome"].summary()["rubric_score"]
    assert s["mean"] == pytest.approx((0.50 + 0.47 + 0.49) / 3)
    assert s["std"] == pytest.approx(statistics.stdev([0.50, 0.47, 0.49]))
    assert (s["min"], s["max"]) == (0.47, 0.50)
    md = render_markdown(arms)
    assert "| rubric filtering (rDPO) | 0.600 ± 0.020 (0.580–0.620) | 52.3 ± 2.5 (50.0–55.0) |" in md
    assert "| 1 | 0.420 / 32.0 | 0.470 / 41.0 | 0.620 / 50.0 | +0.150 |" in md


def test_unequal_start_is_an_error(tmp_path):
    _write(tmp_path, "rubric", 0)
    _write(tmp_path, "outcome", 0, before=(0.41, 0.30))
    with pytest.raises(ValueError, match="seed 0: the runs' 'before' rubric_score differ"):
        collect(tmp_path, [0])


def test_missing_run_names_the_file(tmp_path, capsys):
    _write(tmp_path, "rubric", 0)
    assert main(["--collect-only", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "outcome-seed0/eval.json: missing" in capsys.readouterr().err


def test_collect_only_writes_table_json_and_figure(out):
    for strategy in ("rubric", "outcome"):  # the overlaid report needs run directories
        for seed in BEFORE:
            (run_dir(out, strategy, seed) / "config.yaml").write_text(
                f"pairs:\n  strategy: {strategy}\n")
    assert main(["--collect-only", "--out", str(out)]) == 0
    data = json.loads((out / "ablation.json").read_text())
    assert data["arms"]["rubric"]["summary"]["rubric_score"]["mean"] == pytest.approx(0.60)
    assert data["seconds"] is None  # nothing was trained
    assert (out / "ablation.md").read_text().startswith("Held-out rubric score")
    with Image.open(out / "ablation.png") as im:
        assert im.format == "PNG" and im.size == (1100, 495)
    assert (out / "report.png").is_file()
