"""Checkpoints and resume: a run killed (SIGKILL) mid-judging and again mid-training, resumed
with run.resume=auto, ends exactly where the uninterrupted run ends, without asking the judge
again for what it had already judged."""

import os
import shutil
import signal
import time

import pytest
import torch
from fake_openai_server import FakeOpenAIServer
from safetensors.torch import load_file, save_file
from scale_runs import fit_cli, jsonl, log_text

pytestmark = pytest.mark.slow

CADENCE = ["run.checkpoint_every_n_steps=2"]


@pytest.fixture(scope="module")
def cache(small_toy):
    return small_toy.cache


@pytest.fixture(scope="module")
def policy(small_toy):
    return small_toy.paths.policy


def _wait_for(proc, run_dir, done, deadline, what):
    while not done():
        assert proc.poll() is None, log_text(run_dir)
        assert time.monotonic() < deadline, f"{what}: not reached in time"
        time.sleep(0.05)


def _kill_mid_judging(run_dir, cache, server, extra):
    """Start a run; once round 0 is written, let the judge answer 8 more requests and hold
    the next ones unanswered; SIGKILL the run while it waits on them (so the kill lands at
    the same point every time). Returns the answer count when round 0 was written."""
    proc = fit_cli(run_dir, cache, *extra, wait=False)
    deadline = time.monotonic() + 240
    try:
        _wait_for(proc, run_dir, (run_dir / "rounds/0000").is_dir, deadline, "round 0")
        # Round 1 samples after 4 training steps: it is not being judged yet.
        start = server.hold_after(8)

        def held():
            state = server.state()
            return state["held"] > 0 and len(state["answered"]) == start + 8

        _wait_for(proc, run_dir, held, deadline, "8 answers, then a request held")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    server.release()
    return start


def test_killed_twice_resumes_to_the_same_weights(cache, tmp_path):
    """Uninterrupted run A vs run B: B is SIGKILLed in the middle of round 1's judging, resumed
    (and killed again right after step 7, between checkpoints, by tests/kill_at_step.py), and
    resumed once more. B ends with A's pairs, rollouts and adapter weights, bit for bit (CPU, fixed
    seeds: sampling is seeded per round and rank, the checkpoint restores weights, optimizer,
    data position and RNG); judgments answered before a kill are not asked again beyond the
    one judge call that was in flight (one prompt's 4 responses at concurrency 2)."""
    with FakeOpenAIServer(judging="hash") as server_a:
        a = tmp_path / "a"
        proc = fit_cli(a, cache, *CADENCE, *server_a.judge_overrides())
        assert proc.returncode == 0, log_text(a)
        answered_a = server_a.answered

    with FakeOpenAIServer(judging="hash") as server:
        b = tmp_path / "b"
        extra = [*CADENCE, *server.judge_overrides(), "run.resume=auto"]
        round1_start = _kill_mid_judging(b, cache, server, extra)
        killed_at = len(server.answered)
        assert killed_at == round1_start + 8  # killed while round 1 was being judged
        assert not (b / "rounds/0001").exists()  # a round's files appear complete or not at all
        assert (b / "checkpoints/last.ckpt").is_file()
        before_kill = set(server.answered)

        proc = fit_cli(b, cache, *extra, kill_at_step=7)
        assert proc.returncode == -signal.SIGKILL, log_text(b)
        second = server.answered[killed_at:]
        repeated = [t for t in second if t in before_kill]
        assert len(repeated) <= 4, f"{len(repeated)} judgments asked again"
        # Round 1 in B asked exactly what was still missing: together they cover A's round 1.
        after_second = len(server.answered)

        proc = fit_cli(b, cache, *extra)
        assert proc.returncode == 0, log_text(b)
        answered_b = server.answered
        third = answered_b[after_second:]
        # Resumed at step 6 inside round 1: its pairs came from the checkpoint; the only
        # judgments now are of the final policy's held-out answers, none seen before.
        assert not set(third) & set(answered_b[:after_second])
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
    assert len(set(answered_b)) == len(set(answered_a))


def _losses(run):
    import csv

    rows = csv.DictReader((run / "logs/metrics.csv").open())
    return [(int(r["step"]), float(r["train/dpo_loss_step"])) for r in rows
            if r.get("train/dpo_loss_step")]


def test_resume_refuses_another_seed_or_base(cache, policy, tmp_path):
    """A checkpoint is resumed only by the run that wrote it: the seed must agree, and the base
    weights (another model.path of the same shapes, one weight nudged by 1e-2). Refused before
    anything is written: config.yaml and the logs stay the first run's."""
    run = tmp_path / "r"
    short = ["dpo.max_steps=2", "rollout.every_n_steps=2"]
    proc = fit_cli(run, cache, *short)
    assert proc.returncode == 0, log_text(run)
    assert (run / "checkpoints/last.ckpt").is_file()
    written = {name: (run / name).read_bytes() for name in ("config.yaml", "logs/metrics.csv")}
    proc = fit_cli(run, cache, *short, "run.seed=1", "run.resume=auto")
    assert proc.returncode == 2, log_text(run)
    assert "was written by a run with other settings:\n    run.seed: 0 → 1\n" in log_text(run)
    other = tmp_path / "other-base"
    shutil.copytree(policy, other)
    weights = load_file(other / "model.safetensors")
    name = next(n for n in sorted(weights) if weights[n].is_floating_point())
    weights[name] += 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    proc = fit_cli(run, cache, *short, "run.resume=auto", f"model.path={other}")
    assert proc.returncode == 2, log_text(run)
    assert "was written on another base model" in log_text(run)
    assert {name: (run / name).read_bytes() for name in written} == written
