"""Checkpoints and resume: a run killed (SIGKILL) mid-judging and again mid-training, resumed
with run.resume=auto, ends exactly where the uninterrupted run ends, without asking the judge
again for what it had already judged."""

import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file
from scale_runs import HashJudgeServer, fit_cli, jsonl, log_text, toy_cache

pytestmark = pytest.mark.slow

CADENCE = ["run.checkpoint_every_n_steps=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return toy_cache(tmp_path_factory)


def _kill_mid_judging(run_dir, cache, server, extra):
    """Start a run; SIGKILL it once round 0 is written and round 1 has had 8 answers."""
    proc = fit_cli(run_dir, cache, *extra, wait=False)
    deadline = time.monotonic() + 240
    try:
        while not (run_dir / "rounds/0000").is_dir():
            assert proc.poll() is None, log_text(run_dir)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = len(server.answered)
        while len(server.answered) < start + 8:
            assert proc.poll() is None, log_text(run_dir)
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return start


def test_killed_twice_resumes_to_the_same_weights(cache, tmp_path):
    """Uninterrupted run A vs run B: B is SIGKILLed in the middle of round 1's judging, resumed
    (and killed again at step 7, between checkpoints, by RDPO_TEST_KILL_AT_STEP), and resumed
    once more. B ends with A's pairs, rollouts and adapter weights, bit for bit (CPU, fixed
    seeds: sampling is seeded per round and rank, the checkpoint restores weights, optimizer,
    data position and RNG); judgments answered before a kill are not asked again beyond the
    one judge call that was in flight (one prompt's 4 responses at concurrency 2)."""
    with HashJudgeServer(latency=0.03) as server_a:
        a = tmp_path / "a"
        proc = fit_cli(a, cache, *CADENCE, *server_a.judge_overrides())
        assert proc.returncode == 0, log_text(a)

    with HashJudgeServer(latency=0.03) as server:
        b = tmp_path / "b"
        extra = [*CADENCE, *server.judge_overrides(), "run.resume=auto"]
        round1_start = _kill_mid_judging(b, cache, server, extra)
        killed_at = len(server.answered)
        assert killed_at > round1_start  # killed while round 1 was being judged
        assert not (b / "rounds/0001").exists()  # a round's files appear complete or not at all
        assert (b / "checkpoints/last.ckpt").is_file()
        before_kill = set(server.answered)

        proc = fit_cli(b, cache, *extra, env={"RDPO_TEST_KILL_AT_STEP": "7"})
        assert proc.returncode == -signal.SIGKILL, log_text(b)
        second = server.answered[killed_at:]
        repeated = [t for t in second if t in before_kill]
        assert len(repeated) <= 4, f"{len(repeated)} judgments asked again"
        # Round 1 in B asked exactly what was still missing: together they cover A's round 1.
        after_second = len(server.answered)

        proc = fit_cli(b, cache, *extra)
        assert proc.returncode == 0, log_text(b)
        third = server.answered[after_second:]
        # Resumed at step 6 inside round 1: its pairs came from the checkpoint; the only
        # judgments now are of the final policy's held-out answers, none seen before.
        assert not set(third) & set(server.answered[:after_second])
    assert log_text(b).count("resuming from") == 2

    for name in ("rounds/0000/rollouts.jsonl", "rounds/0000/pairs.jsonl",
                 "rounds/0001/rollouts.jsonl", "rounds/0001/pairs.jsonl"):
        assert jsonl(b / name) == jsonl(a / name), name
    pairs = jsonl(a / "rounds/0001/pairs.jsonl")[:-1]
    assert pairs, "round 1 kept no pair: the comparison would be empty"
    wa = load_file(a / "adapter/adapter_model.safetensors")
    wb = load_file(b / "adapter/adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lora_b = [k for k in wa if "lora_B" in k]
    assert any(wa[k].abs().sum() > 0 for k in lora_b)  # trained, not two untouched adapters
    # logs/metrics.csv covers the whole run once: B's losses are A's, step for step.
    assert _losses(b) == _losses(a) and len(_losses(a)) == 8
    # Same judge answers in total: A asked each judgment once; B at most 4 more.
    assert len(set(server.answered)) == len(set(server_a.answered))


def _losses(run):
    import csv

    rows = csv.DictReader((run / "logs/metrics.csv").open())
    return [(int(r["step"]), float(r["train/dpo_loss_step"])) for r in rows
            if r.get("train/dpo_loss_step")]


def test_resume_refuses_another_seed(cache, tmp_path):
    """A checkpoint is resumed only by the run that wrote it (seed and pool must agree)."""
    run = tmp_path / "r"
    proc = fit_cli(run, cache, "dpo.max_steps=2", "rollout.every_n_steps=2")
    assert proc.returncode == 0, log_text(run)
    assert (run / "checkpoints/last.ckpt").is_file()
    proc = fit_cli(run, cache, "dpo.max_steps=4", "rollout.every_n_steps=2", "run.seed=1",
                   "run.resume=auto")
    assert proc.returncode != 0
    assert "resume with the same run.seed" in log_text(run)
