"""Rounds across ranks: Lightning DDP on CPU, 2 processes (gloo), through the real CLI."""

import csv
import math

import pytest
import torch
from scale_runs import fit_cli, jsonl, log_text

from rdpo.config import load_config
from rdpo.pool import load_pool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(small_toy, tmp_path_factory):
    cache = small_toy.cache
    root = tmp_path_factory.mktemp("ddp")
    ddp, single = root / "ddp", root / "single"
    # 8 prompts per rank = each rank's whole shard, so both runs' rounds cover the same 16.
    proc = fit_cli(ddp, cache, "run.devices=2", "run.strategy=ddp", "run.accelerator=cpu",
                   "data.prompts_per_round=8")
    assert proc.returncode == 0, log_text(ddp)
    proc = fit_cli(single, cache, "data.prompts_per_round=16", "run.threads=2")
    assert proc.returncode == 0, log_text(single)
    return ddp, single


def _rows(run, key):
    rows = csv.DictReader((run / "logs/metrics.csv").open())
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_artifacts_hold_both_ranks_written_once(runs):
    ddp, _ = runs
    cfg = load_config(ddp / "config.yaml")
    pool = [r.id for r in load_pool(cfg.data.train_pool)]
    rank_of = {pid: i % 2 for i, pid in enumerate(pool)}  # OnPolicyDataModule: shard = pool[rank::2]
    assert sorted(p.name for p in (ddp / "rounds").iterdir()) == ["0000", "0001"]  # no rank dirs
    uneven = 0
    for index in ("0000", "0001"):
        rollouts = jsonl(ddp / f"rounds/{index}/rollouts.jsonl")
        assert len(rollouts) == 16 * 4
        prompts = {r["prompt_id"] for r in rollouts}
        assert prompts == set(pool)  # both shards: 8 prompts from each rank
        lines = jsonl(ddp / f"rounds/{index}/pairs.jsonl")
        pairs, summary = lines[:-1], lines[-1]["summary"]
        assert summary["prompts"] == 16 and summary["kept"] == len(pairs)
        assert summary["kept"] + sum(summary["dropped"].values()) == 16
        per_rank = [sum(rank_of[p["prompt_id"]] == k for p in pairs) for k in (0, 1)]
        uneven += per_rank[0] != per_rank[1]
        # round metrics are over both ranks: rank 0 alone has 32 responses, not 64
        step = {"0000": 0, "0001": 4}[index]
        assert (step, pytest.approx(sum(r["score"] for r in rollouts) / 64)) in \
            _rows(ddp, "round/mean_score")
        assert (step, len(pairs)) in [(s, int(v)) for s, v in _rows(ddp, "round/pairs")]
    assert uneven, "the ranks kept equal pair counts: the uneven case went untested"


def test_equal_steps_with_uneven_pairs(runs):
    """Both ranks took 4 optimizer steps per round whatever they kept (a rank that took fewer
    would have hung the gradient all-reduce); the run ended at max_steps with one checkpoint."""
    ddp, _ = runs
    losses = _rows(ddp, "train/dpo_loss_step")
    assert [s for s, _ in losses] == list(range(8))
    ckpt = torch.load(ddp / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    # the data module's state carries each rank's own pairs
    state = ckpt["OnPolicyDataModule"]
    assert len(state["pairs"]) == 2
    last = jsonl(ddp / "rounds/0001/pairs.jsonl")[:-1]
    assert sorted(p["id"] for part in state["pairs"] for p in part) == \
        sorted(p["prompt_id"] for p in last)


def test_matches_single_process_where_it_should(runs):
    """A 2-rank run equals a 1-rank run in what does not depend on the samples: every round
    covers the same 16 prompts, the loss at step 0 is ln 2 (policy == reference), and the
    reference log-probs of a pair are those a single process computes for it. The sampled
    responses themselves differ by design: each rank samples its own shard with its own seed
    (`round_seed(seed, round, rank)`) in its own generation batches."""
    from rdpo.engine.collate import PairCollator
    from rdpo.engine.packing import pair_logps
    from rdpo.model import load_policy

    ddp, single = runs
    for index in ("0000", "0001"):
        ids = [{r["prompt_id"] for r in jsonl(run / f"rounds/{index}/rollouts.jsonl")}
               for run in (ddp, single)]
        assert ids[0] == ids[1]
    for run in (ddp, single):
        assert _rows(run, "train/dpo_loss_step")[0][1] == pytest.approx(math.log(2), abs=1e-5)

    cfg = load_config(ddp / "config.yaml")
    model, processor = load_policy(cfg.model)
    model.eval()
    records = {r.id: r for r in load_pool(cfg.data.train_pool)}
    collator = PairCollator(processor, packed=True)
    pairs, chosen_ids, rejected_ids = [], [], []
    for index in ("0000", "0001"):
        samples = {(r["prompt_id"], r["sample"]): r["token_ids"]
                   for r in jsonl(ddp / f"rounds/{index}/rollouts.jsonl")}
        for p in jsonl(ddp / f"rounds/{index}/pairs.jsonl")[:-1]:
            pairs.append(p)
            chosen_ids.append(samples[(p["prompt_id"], p["chosen_index"])])
            rejected_ids.append(samples[(p["prompt_id"], p["rejected_index"])])
    assert pairs
    # the pairs as they trained: the sampled token ids
    batch = collator.pairs([records[p["prompt_id"]] for p in pairs], chosen_ids, rejected_ids)
    with torch.no_grad(), model.disable_adapter():
        chosen, rejected = pair_logps(model, batch)
    assert chosen.tolist() == pytest.approx([p["ref_chosen_logp"] for p in pairs], abs=1e-4)
    assert rejected.tolist() == pytest.approx([p["ref_rejected_logp"] for p in pairs], abs=1e-4)


def test_async_rounds_on_two_ranks(runs, small_toy, tmp_path):
    """rollout.async_rounds under DDP: each rank builds its shard of round 1 while round 0
    trains (its judge on a thread beside gloo's collectives), the round files hold both shards
    once; round 0 is the synchronous run's, round 1 was sampled by the initial policy."""
    ddp, _ = runs
    run = tmp_path / "async"
    proc = fit_cli(run, small_toy.cache, "run.devices=2", "run.strategy=ddp",
                   "run.accelerator=cpu", "data.prompts_per_round=8", "rollout.async_rounds=true")
    assert proc.returncode == 0, log_text(run)
    assert jsonl(run / "rounds/0000/rollouts.jsonl") == jsonl(ddp / "rounds/0000/rollouts.jsonl")
    rollouts = jsonl(run / "rounds/0001/rollouts.jsonl")
    assert len(rollouts) == 16 * 4 and rollouts != jsonl(ddp / "rounds/0001/rollouts.jsonl")
    policies = [jsonl(r / "rounds/0001/pairs.jsonl")[-1]["summary"]["policy"] for r in (run, ddp)]
    assert policies == [{"round": 0, "step": 0}, {"round": 1, "step": 4}]
