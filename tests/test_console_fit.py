"""End to end through the CLI: a small fit with every logger at once, its console captured as a
user's terminal shows it (each carriage return redraws the line), and each logger read back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from small_toy import QUICKSTART

from rdpo.console import NOISE

pytestmark = pytest.mark.slow

STEPS, EVERY = 4, 2


def terminal_lines(output: str) -> list[str]:
    """What stays on a terminal: per line, the text after its last redraw (\\r); blank lines
    and bare escape sequences dropped."""
    lines = []
    for raw in output.split("\n"):
        shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw.split("\r")[-1]).rstrip()
        if shown:
            lines.append(shown)
    return lines


@pytest.fixture(scope="module")
def cli_run(small_toy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console_fit")
    run_dir = tmp / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "rdpo.fit", "--config", str(QUICKSTART), *small_toy.overrides,
           f"run.dir={run_dir}", "run.progress_bar=true", f"dpo.max_steps={STEPS}",
           f"rollout.every_n_steps={EVERY}", "run.loggers=[csv,tensorboard,wandb,mlflow]",
           "logger.wandb.offline=true", f"logger.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
           f"logger.mlflow.artifact_location={tmp}/mlartifacts"]
    # Bytes: text mode would turn the bars' carriage returns into newlines.
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, timeout=900)
    output = (done.stdout + done.stderr).decode()
    (tmp / "console.txt").write_text(output)
    assert done.returncode == 0, output[-3000:]
    return run_dir, tmp, output


def test_console_prints_each_line_once_and_no_known_noise(cli_run):
    _, _, output = cli_run
    lines = terminal_lines(output)
    repeated = sorted({line for line in lines if lines.count(line) > 1})
    assert repeated == []
    for pattern in NOISE:
        assert not re.search(pattern, output), pattern
    for word in ("FutureWarning", "DeprecationWarning", "INFO:", "Epoch", "Loading weights",
                 "litlogger"):
        assert word not in output
    text = "\n".join(lines)
    # The progress display: held-out phases, each round's phases, the steps out of max_steps.
    assert f"training: {STEPS} steps in {STEPS // EVERY} rounds of {EVERY}" in text
    for where in ("held-out before", "round 0", "round 1", "held-out after"):
        assert f"{where} · sampling" in output
    # A pipelined round (the default) judges while it samples, then finishes judging beside
    # the reference pass: one phase for both.
    assert "round 0 · judging, reference log-probs" in output
    assert re.search(rf"round 1 · training: 100%.*\| {STEPS}/{STEPS} \[", text)
    assert re.search(r"round 0: mean score \d\.\d{3}, essential pass", text)


def test_every_logger_holds_the_run(cli_run):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, tmp, _ = cli_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"round/mean_score", "round/pairs", "round/essential_pass_rate", "train/loss_step",
            "heldout/before/rubric_score", "heldout/after/rubric_score",
            "heldout/gain"} <= set(tags["scalars"])
    assert any(t.startswith("round/dropped/") for t in tags["scalars"])
    assert [e.step for e in events.Scalars("round/mean_score")] == [0, EVERY]
    assert tags["images"] == ["report"]
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("run-*.wandb")) and list(wandb_run.glob("files/media/images/report_*"))
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("rdpo").experiment_id])
    assert run.data.params["dpo/max_steps"] == str(STEPS)
    assert {"round/mean_score", "heldout/gain", "train/loss_step"} <= set(run.data.metrics)
    assert "report.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "round/mean_score" in header and "heldout/gain" in header


def test_the_fitted_run_exports_and_answers(cli_run, capsys):
    """The trained run (not a made-up one): merged export answers as the run's policy does,
    and rdpo.tools.try_policy judges its answers against a held-out rubric."""
    import torch
    from transformers import AutoModelForImageTextToText

    from rdpo.config import RolloutConfig
    from rdpo.pool import load_pool
    from rdpo.rollout import generate
    from rdpo.tools.export import export
    from rdpo.tools.try_policy import load_run_policy
    from rdpo.tools.try_policy import main as generate_main

    run_dir, tmp, _ = cli_run
    out = export(run_dir, tmp / "export", merge=True)
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    policy, processor, cfg = load_run_policy(run_dir)
    records = load_pool(cfg.data.heldout_pool)[:3]
    greedy = RolloutConfig(temperature=0.0, max_new_tokens=24, samples_per_prompt=1)
    assert ([r.token_ids for r in generate(merged, processor, records, greedy)]
            == [r.token_ids for r in generate(policy, processor, records, greedy)])
    assert generate_main(["--run", str(run_dir), "--rubric", cfg.data.heldout_pool, "--id",
                          records[0].id, "--samples", "2", "-q"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{records[0].id}: {records[0].instruction}")
    assert "[2] " in printed and "over 2 answers" in printed
