"""rollout.async_rounds: round r+1 is sampled from the policy as round r starts and judged while
round r trains; the round files say which policy sampled them, and a run killed while the next
round was being built resumes to the same pairs and weights."""

import json
import threading

import pytest
import torch
from rdpo.callbacks.ahead import Snapshot, policy_weights
from rdpo.callbacks.sampling import round_seed
from scale_runs import fit_cli, log_text

from rdpo.config import ConfigError, load_config
from rdpo.fit import fit
from rdpo.judging.judges import RuleJudge
from rdpo.pool import load_pool
from rdpo.rollout import generate

QUICKSTART = "configs/quickstart.yaml"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _summary(run_dir, index):
    return _rows(run_dir / "rounds" / f"{index:04d}" / "pairs.jsonl")[-1]["summary"]


def test_policy_weights_swaps_and_restores_bit_for_bit():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    snap = Snapshot.of(model, 4, 40)
    assert (snap.round, snap.step, snap.target) == (4, 40, 5)
    assert set(snap.weights) == {"0.bias", "1.weight", "1.bias"}  # trainable only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with policy_weights(model, snap):
        now = dict(model.named_parameters())
        assert torch.equal(now["1.weight"], before["1.weight"])
        assert torch.equal(now["0.weight"], moved["0.weight"])  # frozen: not the snapshot's
    for n, p in model.named_parameters():
        assert torch.equal(p, moved[n])
    assert Snapshot.from_state(snap.state()).weights.keys() == snap.weights.keys()
    other = Snapshot(4, 40, 5, {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit this model's trainable weights"):
        with policy_weights(model, other):
            pass


@pytest.mark.parametrize("extra, message", [
    (["model.finetune=full"], "model.finetune=full needs rollout.async_rounds=false"),
    (["run.strategy=deepspeed", "run.deepspeed_stage=3"], "ZeRO-3 shards the adapter"),
])
def test_async_rounds_refuses_what_it_cannot_snapshot(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, ["rollout.async_rounds=true", *extra])


@pytest.mark.slow
def test_async_run_samples_from_the_round_start_policy_and_resumes_exactly(small_toy, tmp_path):
    """Rounds of 2 steps, 6 steps: round 0 is sampled by the initial policy, round 1 by the same
    (one round off-policy), round 2 by the policy at step 2. A run SIGKILLed at step 3 (round 2
    being judged meanwhile; checkpoint each step) resumes to byte-identical round files and the
    same final adapter as the run that was not killed."""
    run = ["rollout.async_rounds=true", "dpo.max_steps=6", "rollout.every_n_steps=2",
           "run.checkpoint_every_n_steps=1", "data.heldout_pool=null", "run.report=false"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert fit_cli(whole, small_toy.cache, *run).returncode == 0, log_text(whole)
    assert fit_cli(killed, small_toy.cache, *run, kill_at_step=3).returncode != 0
    assert (killed / "rounds/0001").is_dir() and not (killed / "rounds/0002").exists()
    done = fit_cli(killed, small_toy.cache, *run, "run.resume=auto")
    assert done.returncode == 0, log_text(killed)
    for index in range(3):
        for name in ("rollouts.jsonl", "pairs.jsonl"):
            path = f"rounds/{index:04d}/{name}"
            assert (whole / path).read_bytes() == (killed / path).read_bytes(), path
    from safetensors.torch import load_file

    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert [_summary(whole, i)["policy"] for i in range(3)] == [
        {"round": 0, "step": 0}, {"round": 0, "step": 0}, {"round": 1, "step": 2}]
    # Round 1's answers are the initial policy's, drawn with round 1's seed.
    cfg = load_config(QUICKSTART, [*small_toy.overrides, *run])
    from rdpo.model import load_policy

    model, processor = load_policy(cfg.model)
    by_id = {r.id: r for r in load_pool(cfg.data.train_pool)}
    rows = _rows(whole / "rounds/0001/rollouts.jsonl")
    records = list({r["prompt_id"]: by_id[r["prompt_id"]] for r in rows}.values())
    with torch.random.fork_rng():
        torch.manual_seed(round_seed(cfg.run.seed, 1, 0))
        expected = list(generate(model, processor, records, cfg.rollout))
    assert [r["token_ids"] for r in rows] == [list(ids) for e in expected for ids in e.token_ids]

@pytest.mark.slow
def test_a_judge_error_while_training_fails_the_next_round(small_toy, tmp_path, monkeypatch):
    """Round 1's judge fails on its thread while round 0 trains (it waits for the first
    training step, then raises): round 1 stops the run with that error, round 0's files stand,
    and no rdpo thread is left behind."""
    from rdpo.callbacks.round import RubricScoringCallback

    from rdpo.module import RubricDPOModule

    ahead, training, seen = threading.Event(), threading.Event(), []
    judge_many, start_ahead = RuleJudge.judge_many, RubricScoringCallback._start_ahead
    step = RubricDPOModule.training_step

    def failing(self, items):
        if ahead.is_set():  # round 1's judging
            assert training.wait(120)
            seen.append(threading.current_thread().name)
            raise RuntimeError("judge down while round 0 trained")
        return judge_many(self, items)

    def starting(self, *args, **kw):
        ahead.set()
        return start_ahead(self, *args, **kw)

    def marking(self, *args, **kw):
        training.set()
        return step(self, *args, **kw)

    monkeypatch.setattr(RuleJudge, "judge_many", failing)
    monkeypatch.setattr(RubricScoringCallback, "_start_ahead", starting)
    monkeypatch.setattr(RubricDPOModule, "training_step", marking)
    cfg = load_config(QUICKSTART, [*small_toy.overrides, f"run.dir={tmp_path / 'run'}",
                                   "rollout.async_rounds=true", "dpo.max_steps=4",
                                   "rollout.every_n_steps=2", "data.heldout_pool=null",
                                   "data.prompts_per_round=8", "run.report=false"])
    with pytest.raises(RuntimeError, match="judge down while round 0 trained"):
        fit(cfg)
    assert seen and seen[0].startswith("rdpo-judge")
    assert (tmp_path / "run/rounds/0000").is_dir() and not (tmp_path / "run/rounds/0001").exists()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("rdpo-")]
