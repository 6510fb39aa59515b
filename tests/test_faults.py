"""Faults: the judge endpoint going down mid-run, a non-finite loss, an unwritable run dir."""

import math
import time

import pytest
import torch
from fake_openai_server import FakeOpenAIServer
from scale_runs import fit_cli, jsonl, log_text

from rdpo.config import ModelConfig
from rdpo.engine.collate import PairCollator
from rdpo.model import load_policy
from rdpo.module import RubricDPOModule
from rdpo.pairs import TrainPair
from rdpo.pool import load_pool


@pytest.mark.slow
def test_judge_down_mid_run_then_resume(small_toy, tmp_path):
    """The endpoint dies after round 0: round 1's judging fails after bounded retries (the run
    ends by itself) with a clear error naming the checkpoint; with the endpoint back (at a new
    address: judge.base_url may change on resume), the run resumes from that checkpoint and
    finishes without sampling or judging round 0 or the held-out "before" again."""
    cache = small_toy.cache
    run = tmp_path / "run"
    with FakeOpenAIServer(judging="hash") as server:
        proc = fit_cli(run, cache, *server.judge_overrides(), "run.resume=auto", wait=False)
        try:
            deadline = time.monotonic() + 240
            while not (run / "rounds/0000").is_dir():
                assert proc.poll() is None, log_text(run)
                assert time.monotonic() < deadline, "round 0 not written in 240 s"
                time.sleep(0.05)
            server.hold_after(0)  # from now on nothing is answered: round 0 is all it judged
            # Down: the server process ends; open connections close, new ones are refused.
            server.stop()
            proc.wait(120)  # raises TimeoutExpired if the retries were not bounded
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log_text(run)
    assert proc.returncode == 1, out
    assert "error: judge failed at step 4" in out
    assert "after 1 retries" in out and "run.resume=auto" in out
    assert f"Last checkpoint: {run / 'checkpoints/last.ckpt'}" in out
    assert not (run / "rounds/0001").exists() and not (run / "adapter").exists()

    with FakeOpenAIServer(judging="hash") as back:
        proc = fit_cli(run, cache, *back.judge_overrides(), "run.resume=auto")
        assert proc.returncode == 0, log_text(run)
    # Round 0 and the held-out "before" are kept: not measured again. (The judge cache is keyed
    # by the judge's URL, so a text that round 1 or "after" repeats is asked of the new server.)
    resumed = log_text(run).split("resuming from", 1)[1]
    assert "round 1:" in resumed and "held-out after:" in resumed
    assert "round 0:" not in resumed and "held-out before:" not in resumed, resumed
    assert len(jsonl(run / "rounds/0001/rollouts.jsonl")) == 64
    assert (run / "adapter/adapter_model.safetensors").is_file()


@pytest.mark.slow  # a `python -m rdpo.fit` process
def test_unwritable_run_dir_fails_at_start(tmp_path):
    """A run dir that cannot be written is refused before anything is loaded or built."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cache = tmp_path / "cache"
    proc = fit_cli(tmp_path / "x", cache, f"run.dir={blocker / 'run'}")
    out = log_text(tmp_path / "x")
    assert proc.returncode == 2, out
    assert f"error: run.dir={blocker / 'run'}: cannot write there" in out
    assert not cache.exists()  # failed before the toy model was built


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return load_policy(ModelConfig(path=str(tiny_dir)))


def _nan_batch(policy, toy_pools):
    record = load_pool(toy_pools.train)[0]
    collator = PairCollator(policy[1], packed=True)
    return collator([TrainPair(record, "A red circle.", "A blue square.", math.nan, -3.0)])


def test_nonfinite_loss_is_skipped_and_counted(policy, toy_pools):
    model, processor = policy
    module = RubricDPOModule(model, processor, on_nonfinite="skip")
    model.zero_grad()
    loss = module.training_step(_nan_batch(policy, toy_pools), 0)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert module.nonfinite_skipped == 1


def test_nonfinite_loss_stops_when_asked(policy, toy_pools):
    model, processor = policy
    module = RubricDPOModule(model, processor, on_nonfinite="stop")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 0 .*reference "
                       r"chosen \[nan\].*run.on_nonfinite=skip"):
        module.training_step(_nan_batch(policy, toy_pools), 0)
