"""DeepSpeed ZeRO-2 and ZeRO-3 training on two CPU ranks (gloo, DeepSpeed's CPU accelerator):
the code a GPU node runs, except the accelerator, through the real CLI on the small toy.

One ZeRO-3 run and one ZeRO-2 run (`zero2_run`, tests/conftest.py) are shared by the asserts;
a ZeRO-3 run is killed mid-round and resumed; a ZeRO-3 QLoRA run has a rank whose round keeps
no pair. ZeRO-3 really slices the toy's weights (its persistence threshold is 10 x hidden size)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from deepspeed_probe import GREEDY
from deepspeed_runs import fit_deepspeed, losses, probe_dir
from safetensors.torch import load_file
from scale_runs import jsonl, log_text

from rdpo.config import RolloutConfig, load_config
from rdpo.pool import load_pool

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]
pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")

ROUNDS = ("0000", "0001")


@pytest.fixture(scope="module")
def zero3(small_toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("zero3") / "run"
    proc = fit_deepspeed(run, small_toy.cache, 3)
    assert proc.returncode == 0, log_text(run)
    return run


def _probes(run) -> list[dict]:
    return [json.loads((probe_dir(run) / f"probe-rank-{k}.json").read_text()) for k in (0, 1)]


@pytest.mark.parametrize("stage", [2, 3])
def test_trains_from_ln2_on_two_cpu_ranks(stage, zero2_run, zero3):
    """Eight steps over two rounds built from both ranks' shards; step 0 of round 0 is at
    ln 2 with rewards 0 exactly (policy == reference: the reference pass ran gathered, in the
    step's precision, dropout off); the run says once that it is a CPU rehearsal."""
    run = {2: zero2_run, 3: zero3}[stage]
    assert log_text(run).count(f"DeepSpeed ZeRO-{stage} on 2 CPU rank(s)") == 1
    steps = losses(run)
    assert [s for s, _ in steps] == list(range(8))
    assert steps[0][1] == pytest.approx(math.log(2), abs=1e-7)  # ln 2 in float32
    for key in ("train/rewards/chosen_step", "train/rewards/rejected_step"):
        assert losses(run, key)[0] == (0, 0.0)
    for index in ROUNDS:
        assert len(jsonl(run / f"rounds/{index}/rollouts.jsonl")) == 64
    assert jsonl(run / "rounds/0001/pairs.jsonl")[:-1], "round 1 kept no pair"
    assert steps[-1][1] < steps[0][1]


def test_zero3_gathers_for_rollouts_and_releases(zero3):
    """ZeRO-3 sliced the weights (the adapter's included); after the held-out evaluation and
    after a rollout each rank holds none of the sliced values again, with ZeRO-3's per-module
    hooks back on; both ranks sampled the same greedy answers from the gathered weights."""
    probes = _probes(zero3)
    for probe in probes:
        for when in ("start", "end"):
            state = probe[when]
            assert state["sliced"] > 0 and state["sliced_values"] > 300_000
            assert state["held_values"] == 0, when
            assert state["hooks"] == probes[0]["start"]["hooks"] > 0
    assert probes[0]["greedy"] == probes[1]["greedy"]


def test_zero2_and_zero3_sample_the_same_first_round(zero2_run, zero3):
    """Both start from the same policy and sampling seeds: round 0's rollouts, scores and pairs
    are the same under ZeRO-2 (whole weights) and ZeRO-3 (gathered for the rollout)."""
    for name in ("rollouts.jsonl", "pairs.jsonl"):
        assert jsonl(zero3 / "rounds/0000" / name) == jsonl(zero2_run / "rounds/0000" / name)


def _greedy(model, processor, records) -> dict:
    from rdpo.rollout import generate

    return {r.record.id: list(r.token_ids[0])
            for r in generate(model, processor, records, RolloutConfig(**GREEDY))}


def test_zero3_adapter_is_the_trained_one_and_exports(zero3, tmp_path):
    """adapter/ loads with PeftModel.from_pretrained and answers (greedy) as the policy did
    inside the run at its end; `rdpo.tools.export --merge` of the run answers the same."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from rdpo.model import load_base, load_processor
    from rdpo.tools.export import main as export_main

    cfg = load_config(zero3 / "config.yaml")
    records = load_pool(cfg.data.heldout_pool)[:2]
    in_run = _probes(zero3)[0]["greedy"]
    processor = load_processor(str(zero3 / "adapter"))
    model = PeftModel.from_pretrained(load_base(cfg.model), zero3 / "adapter").eval()
    assert _greedy(model, processor, records) == in_run
    with model.disable_adapter():
        assert _greedy(model, processor, records) != in_run  # training changed the answers
    weights = load_file(zero3 / "adapter/adapter_model.safetensors")
    assert all(v.numel() > 0 for v in weights.values())  # whole weights, not a rank's slice

    assert export_main([str(zero3), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert _greedy(merged, processor, records) == in_run


def test_zero3_killed_mid_round_resumes_to_the_same_run(zero3, small_toy, tmp_path):
    """SIGKILL right after step 6 (round 1 of 2, between checkpoints), then run.resume=auto:
    the run finishes with the uninterrupted run's rollouts, pairs, losses (metrics.csv keeps
    the steps before the checkpoint) and adapter weights, bit for bit (CPU, fixed seeds)."""
    run = tmp_path / "run"
    proc = fit_deepspeed(run, small_toy.cache, 3, "run.resume=auto", kill_at_step=6)
    assert proc.returncode == -9, log_text(run)
    assert (run / "checkpoints/last.ckpt/rdpo-complete").is_file()
    assert not (run / "adapter").exists()
    proc = fit_deepspeed(run, small_toy.cache, 3, "run.resume=auto")
    assert proc.returncode == 0, log_text(run)
    assert log_text(run).count(f"resuming from {run / 'checkpoints/last.ckpt'}") == 2  # 2 ranks
    for index in ROUNDS:
        for name in ("rollouts.jsonl", "pairs.jsonl"):
            assert jsonl(run / "rounds" / index / name) == jsonl(zero3 / "rounds" / index / name)
    assert losses(run) == losses(zero3)
    got = load_file(run / "adapter/adapter_model.safetensors")
    want = load_file(zero3 / "adapter/adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)


def _pool_without_pairs_on_rank_1(pool, folder):
    """The pool with every record of rank 1's shard (odd positions) made unpassable: an
    essential criterion no answer meets, so every answer scores 0 and no pair is kept."""
    folder.mkdir()
    shutil.copytree(pool.parent / "images", folder / "images")
    lines = []
    for i, line in enumerate(pool.read_text().splitlines()):
        record = json.loads(line)
        if i % 2:
            record["rubric"]["essential"] = [{"id": "E1", "text": "Says zqxj.",
                                              "check": {"any": ["zqxj"]}}]
        lines.append(json.dumps(record))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def test_zero3_qlora_with_a_rank_without_pairs(small_toy, tmp_path):
    """QLoRA (a 4-bit nf4 base: bitsandbytes' CPU kernels) under ZeRO-3, and rank 1 keeps no
    pair in its round: it still runs every step's forward and backward (a one-token filler
    pair, loss times zero) with rank 0, whose ZeRO-3 gathers would otherwise wait for it
    forever."""
    pool = _pool_without_pairs_on_rank_1(small_toy.paths.train_pool, tmp_path / "pool")
    run = tmp_path / "run"
    proc = fit_deepspeed(run, small_toy.cache, 3, f"data.train_pool={pool}", "dpo.max_steps=2",
                         "rollout.every_n_steps=2", "model.quantization=nf4", timeout=300)
    assert proc.returncode == 0, log_text(run)
    order = [r.id for r in load_pool(pool)]
    kept = [p["prompt_id"] for p in jsonl(run / "rounds/0000/pairs.jsonl")[:-1]]
    assert kept and all(order.index(pid) % 2 == 0 for pid in kept)  # rank 0's shard only
    steps = losses(run)
    assert [s for s, _ in steps] == [0, 1] and all(math.isfinite(v) for _, v in steps)
    assert steps[0][1] == pytest.approx(math.log(2), abs=1e-7)
