"""The invariants that hold in every precision and quantisation (DESIGN.md), through `fit()`:

- a round's first step has DPO loss ln 2, rewards 0 and reward accuracy 0: the reference pass
  and the training step compute the same function (same precision context, inputs converted the
  same way, dropout off, reference log-probs not rounded by the precision plugin);
- the tokens a step trains on are the tokens the rollout sampled; a response cut at
  ``max_new_tokens`` is marked (finish reason ``length``) and, with ``rollout.truncated=drop``,
  is never a pair member.

The runs use the real recipe's settings that matter here (LoRA dropout 0.05, nf4 + bf16) on the
small toy, with every round-0 pair in one batch (so padding is identical in both passes).
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from small_toy import QUICKSTART

from rdpo.config import load_config
from rdpo.engine.packing import CHOSEN, REJECTED
from rdpo.fit import fit
from rdpo.module import RubricDPOModule

pytestmark = pytest.mark.slow

# One round, one step, all pairs in one batch; every prompt of the round can give a pair.
ONE_STEP = ["dpo.max_steps=1", "rollout.every_n_steps=1", "data.batch_size=64",
            "rollout.samples_per_prompt=8", "rollout.max_new_tokens=24",
            "pairs.require_chosen_essential=false", "rollout.truncated=keep",
            "model.lora.dropout=0.05", "eval.max_prompts=2", "run.report=false",
            "run.checkpoint=false"]

PRECISIONS = {
    "32-true": [],
    "bf16-mixed": [],
    "bf16-true": [],
    # with selective checkpointing: its kept/recomputed split under nf4 dequantisation + autocast
    "nf4+bf16-mixed": ["model.quantization=nf4", "model.dtype=bfloat16",
                       "model.gradient_checkpointing=selective"],
    # full fine-tuning: the frozen reference copy follows the policy the plugin converted to bf16
    "full+bf16-true": ["model.finetune=full"],
}


def step_rows(run_dir) -> list[dict]:
    rows = csv.DictReader((run_dir / "logs/metrics.csv").open())
    return [r for r in rows if r.get("train/dpo_loss_step")]


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_round_start_loss_is_ln2_in_every_precision(small_toy, tmp_path, name):
    precision = name.split("+")[-1]
    cfg = load_config(QUICKSTART, [*small_toy.overrides, *ONE_STEP, f"run.dir={tmp_path}",
                                   f"run.precision={precision}", *PRECISIONS[name]])
    result = fit(cfg)
    assert result.rounds[0]["pairs"] >= 8  # a real batch, not one lucky pair
    (row,) = step_rows(tmp_path)
    # The same computation on both sides: exact in every precision (the float32 ln 2).
    assert float(row["train/dpo_loss_step"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(row["train/dpo_loss_step"]) == float(torch.tensor(math.log(2)))
    assert float(row["train/rewards/chosen_step"]) == 0.0
    assert float(row["train/rewards/rejected_step"]) == 0.0
    assert float(row["train/rewards/accuracy_step"]) == 0.0


@pytest.fixture(scope="module")
def recipe_run(small_toy, tmp_path_factory):
    """Two rounds in the real recipe's precision (nf4 base in bf16, bf16-mixed, LoRA dropout),
    short answers so that many are cut; the batches the steps trained on are recorded."""
    trained: list[dict] = []
    original = RubricDPOModule.training_step

    def recording(self, batch, batch_idx):
        if not batch.get("empty"):
            trained.append({k: v.clone() for k, v in batch["packed"].items()
                            if k in ("input_ids", "segments")})
        return original(self, batch, batch_idx)

    run_dir = tmp_path_factory.mktemp("recipe-invariants")
    cfg = load_config(QUICKSTART, [
        *small_toy.overrides, f"run.dir={run_dir}", "run.precision=bf16-mixed",
        "model.quantization=nf4", "model.dtype=bfloat16", "model.lora.dropout=0.05",
        "rollout.max_new_tokens=10", "rollout.samples_per_prompt=6", "dpo.max_steps=4",
        "rollout.every_n_steps=2", "pairs.require_chosen_essential=false",
        "eval.max_prompts=2", "run.report=false"])
    RubricDPOModule.training_step = recording
    try:
        result = fit(cfg)
    finally:
        RubricDPOModule.training_step = original
    return result, trained


def _round(run_dir, index):
    rollouts = [json.loads(x) for x in (run_dir / f"rounds/{index:04d}/rollouts.jsonl").open()]
    lines = [json.loads(x) for x in (run_dir / f"rounds/{index:04d}/pairs.jsonl").open()]
    return {(r["prompt_id"], r["sample"]): r for r in rollouts}, lines[:-1], lines[-1]["summary"]


def test_trained_tokens_are_sampled_tokens(recipe_run):
    result, trained = recipe_run
    sampled_pairs = set()
    for index in range(len(result.rounds)):
        samples, pairs, _ = _round(result.run_dir, index)
        for p in pairs:
            chosen = samples[(p["prompt_id"], p["chosen_index"])]
            rejected = samples[(p["prompt_id"], p["rejected_index"])]
            assert (chosen["response"], rejected["response"]) == (p["chosen"], p["rejected"])
            sampled_pairs.add((tuple(chosen["token_ids"]), tuple(rejected["token_ids"])))
    assert sampled_pairs and trained
    for batch in trained:
        for ids, seg in zip(batch["input_ids"], batch["segments"], strict=True):
            pair = (tuple(ids[seg == CHOSEN].tolist()), tuple(ids[seg == REJECTED].tolist()))
            assert pair in sampled_pairs  # exactly the sampled ids: nothing re-tokenized or added


def test_truncated_answers_are_marked_counted_and_never_paired(recipe_run):
    result, _ = recipe_run
    total = 0
    for index, row in enumerate(result.rounds):
        samples, pairs, summary = _round(result.run_dir, index)
        cut = [s for s in samples.values() if s["finish_reason"] == "length"]
        total += len(cut)
        assert row["truncated"] == summary["truncated_responses"] == len(cut)
        for s in cut:  # cut at the limit: exactly max_new_tokens ids, no end of turn
            assert len(s["token_ids"]) == 10
        for s in samples.values():
            if s["finish_reason"] == "stop":
                assert len(s["token_ids"]) <= 10
        for p in pairs:
            for i in (p["chosen_index"], p["rejected_index"]):
                assert samples[(p["prompt_id"], i)]["finish_reason"] == "stop"
        assert len(pairs) + sum(summary["dropped"].values()) == summary["prompts"]
    assert total > 0  # the setting does cut answers, so the test shows something
    metrics = list(csv.DictReader((result.run_dir / "logs/metrics.csv").open()))
    assert [float(r["round/truncated"]) for r in metrics if r.get("round/truncated")] == \
        [float(r["truncated"]) for r in result.rounds]


def test_heldout_evaluation_reports_judging_and_truncation(recipe_run):
    result, _ = recipe_run
    data = json.loads((result.run_dir / "eval.json").read_text())
    for when in ("before", "after"):
        r = data[when]
        assert r["responses"] == 2 * r["samples_per_prompt"]  # eval.max_prompts=2
        assert r["fully_judged"] == r["responses"]  # the rule judge checks every criterion
        assert 0 <= r["truncated"] <= r["responses"]
    assert data["gain"] == pytest.approx(data["after"]["rubric_score"]
                                         - data["before"]["rubric_score"])


def test_pair_usage_is_logged_per_round(recipe_run):
    result, _ = recipe_run
    for row in result.rounds:
        # 2 steps x batch 4 = 8 items a round, from the pairs the round kept
        if row["pairs"]:
            assert row["pair_uses_min"] >= 1 if row["pairs"] <= 8 else row["pairs_unused"] > 0
            assert row["pair_uses_max"] == -(-8 // row["pairs"])
            assert row["pairs_unused"] == max(0, row["pairs"] - 8)
