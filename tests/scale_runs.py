"""Helpers of the scale-out tests (DDP, resume, faults, SLURM): `python -m rdpo.fit` in a
subprocess on the session's small toy (the ``small_toy`` fixture), and what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from small_toy import QUICKSTART, ROOT, SMALL

__all__ = ["ROOT", "RUN", "fit_cli", "jsonl", "log_text"]

RUN = [*SMALL, "run.report=false", "run.threads=1", "dpo.max_steps=8",
       "rollout.every_n_steps=4", "eval.max_prompts=2"]
"""`SMALL` as two rounds of four steps, one thread, no report: ~20 s a run on two CPU cores."""


def fit_cli(run_dir: Path, cache: Path, *overrides: str, env: dict | None = None,
            timeout: float = 300, wait: bool = True, kill_at_step: int | None = None):
    """`python -m rdpo.fit` with `RUN`; returns the CompletedProcess (or the Popen when `wait`
    is false). With `kill_at_step`, tests/kill_at_step.py runs it instead and SIGKILLs it
    right after that optimizer step. Output goes to run_dir.parent / (run_dir.name + '.log')."""
    entry = ["-m", "rdpo.fit"] if kill_at_step is None else \
        [str(ROOT / "tests/kill_at_step.py"), "--step", str(kill_at_step)]
    args = [sys.executable, *entry, "--config", str(QUICKSTART), *RUN, f"run.dir={run_dir}",
            f"toy.cache_dir={cache}", *overrides]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    if not wait:
        return proc
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return proc


def log_text(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text()


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
