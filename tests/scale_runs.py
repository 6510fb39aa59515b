"""Helpers of the scale-out tests (DDP, resume, faults, SLURM): one small toy cache per
session, `python -m rdpo.fit` in a subprocess, and a deterministic judge server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from fake_openai_server import _CRITERION, FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]

# Two rounds of four steps on 16 prompts: small enough for ~20 s a run on two CPU cores.
SMALL = ["run.progress_bar=false", "run.report=false", "run.threads=1",
         "toy.n_train=16", "toy.n_heldout=8", "toy.warmstart_steps=30", "toy.warmstart_lr=3e-3",
         "toy.flaw_rate=0.5", "dpo.max_steps=8", "rollout.every_n_steps=4",
         "rollout.samples_per_prompt=4", "data.batch_size=4", "data.prompts_per_round=16",
         "dpo.lr=5e-3", "eval.samples_per_prompt=2", "eval.max_prompts=2",
         "rollout.max_new_tokens=12"]


def toy_cache(tmp_path_factory) -> Path:
    """The session's small toy cache (tiny VLM, warm start, pools), built on first use."""
    from rdpo.config import load_config
    from rdpo.warmstart import prepare_toy

    cache = tmp_path_factory.getbasetemp() / "scale_toy_cache"
    cfg = load_config(ROOT / "configs/quickstart.yaml",
                      [*SMALL, "run.dir=unused", f"toy.cache_dir={cache}"])
    prepare_toy(cfg.toy)
    return cache


def fit_cli(run_dir: Path, cache: Path, *overrides: str, env: dict | None = None,
            timeout: float = 300, wait: bool = True):
    """`python -m rdpo.fit` with the small quickstart; returns the CompletedProcess (or the
    Popen when `wait` is false). Output goes to run_dir.parent / (run_dir.name + '.log')."""
    args = [sys.executable, "-m", "rdpo.fit", "--config", "configs/quickstart.yaml", *SMALL,
            f"run.dir={run_dir}", f"toy.cache_dir={cache}", *overrides]
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


class HashJudgeServer(FakeOpenAIServer):
    """The fake OpenAI server judging by a hash of (prompt, criterion): deterministic verdicts
    that differ between responses, so rounds keep pairs. ``answered`` lists the prompt texts
    in the order their answers went out."""

    def __post_init__(self):
        super().__post_init__()
        self.answered: list[str] = []
        self._answered_lock = threading.Lock()

    def _answer(self, text: str, fault: str | None) -> str:
        if '"verdicts"' not in text:
            return super()._answer(text, fault)
        verdicts = [{"id": i, "met": hashlib.sha256(f"{text}\0{i}".encode()).digest()[0] % 3 != 0}
                    for i in _CRITERION.findall(text)]
        with self._answered_lock:
            self.answered.append(text)
        return json.dumps({"verdicts": verdicts})

    def judge_overrides(self, concurrency: int = 2) -> list[str]:
        return ["judge.kind=openai", f"judge.model={self.model}", f"judge.base_url={self.url}",
                f"judge.concurrency={concurrency}", "judge.max_retries=1", "judge.timeout=20"]
