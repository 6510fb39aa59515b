"""The DeepSpeed runs of the tests (tests/test_deepspeed.py, tests/test_slurm.py): `python -m rdpo.fit`
on two CPU ranks of the small toy (`scale_runs.RUN`: two rounds of four steps), with the probe
of tests/deepspeed_probe.py, or SIGKILLed after a step (tests/kill_at_step.py)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from scale_runs import ROOT, RUN
from small_toy import QUICKSTART

CPU_RANKS = ["run.devices=2", "run.strategy=deepspeed", "run.accelerator=cpu",
             "data.prompts_per_round=8"]
"""Two CPU ranks; 8 prompts per rank and round: each rank's whole shard of the 16."""


def deepspeed_overrides(stage: int, *extra: str) -> list[str]:
    return [*RUN, *CPU_RANKS, f"run.deepspeed_stage={stage}", *extra]


def fit_deepspeed(run_dir: Path, cache: Path, stage: int, *extra: str,
                  kill_at_step: int | None = None, timeout: float = 600):
    """Run it to the end (or to the kill); returns the CompletedProcess. Output goes to
    run_dir.parent / (run_dir.name + '.log'), the probe's files to `probe_dir(run_dir)`."""
    entry = [str(ROOT / "tests/deepspeed_probe.py"), "--out", str(probe_dir(run_dir))] \
        if kill_at_step is None else [str(ROOT / "tests/kill_at_step.py"), "--step",
                                      str(kill_at_step)]
    args = [sys.executable, *entry, "--config", str(QUICKSTART),
            *deepspeed_overrides(stage, *extra), f"run.dir={run_dir}", f"toy.cache_dir={cache}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        return subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout)


def probe_dir(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-probe"


def losses(run: Path, key: str = "train/dpo_loss_step") -> list[tuple[int, float]]:
    rows = csv.DictReader((run / "logs/metrics.csv").open())
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
