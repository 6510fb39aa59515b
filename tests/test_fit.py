"""End to end: `fit()` on the toy default with two short rounds, and the CLI's config errors."""

import csv
import json
import math

import pytest
import torch

from rdpo.config import load_config
from rdpo.fit import fit, main

# The tests that take `run` train (slow); the CLI and config checks do not.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def run(small_toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    cfg = load_config("configs/quickstart.yaml", [  # two rounds of two steps
        *small_toy.overrides, f"run.dir={root / 'run'}", "dpo.max_steps=4",
        "rollout.every_n_steps=2"])
    return cfg, fit(cfg)


@slow
def test_run_directory(run):
    cfg, result = run
    d = result.run_dir
    for name in ("config.yaml", "eval.json", "logs/metrics.csv", "adapter/adapter_config.json",
                 "rounds/0000/rollouts.jsonl", "rounds/0000/pairs.jsonl",
                 "rounds/0001/rollouts.jsonl", "rounds/0001/pairs.jsonl"):
        assert (d / name).is_file(), name
    # 4 steps, a round every 2: rounds 0 and 1 only (the first before step 0)
    assert not (d / "rounds/0002").exists()
    assert [r["step"] for r in result.rounds] == [0, 2]
    # the saved config is the resolved one: the toy paths are filled in and load back
    again = load_config(d / "config.yaml")
    assert again.model.path == cfg.model.path and again.toy.enabled


@slow
def test_rollouts_and_pairs_files(run):
    cfg, result = run
    rollouts = [json.loads(x) for x in (result.run_dir / "rounds/0000/rollouts.jsonl").open()]
    assert len(rollouts) == 16 * 4  # every response of every prompt
    for r in rollouts:
        assert set(r) >= {"prompt_id", "sample", "response", "verdicts", "score", "essential_pass"}
        assert 0.0 <= r["score"] <= 1.0 and all(v in (True, False, None) for v in r["verdicts"].values())
    lines = [json.loads(x) for x in (result.run_dir / "rounds/0000/pairs.jsonl").open()]
    pairs, summary = lines[:-1], lines[-1]["summary"]
    assert summary["kept"] == len(pairs) == result.rounds[0]["pairs"]
    # every prompt is either kept as a pair or counted under a drop reason
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["prompts"] == 16
    by_key = {(r["prompt_id"], r["sample"]): r for r in rollouts}
    for p in pairs:
        chosen = by_key[(p["prompt_id"], p["chosen_index"])]
        rejected = by_key[(p["prompt_id"], p["rejected_index"])]
        assert chosen["response"] == p["chosen"] and rejected["response"] == p["rejected"]
        assert p["chosen_score"] - p["rejected_score"] >= cfg.pairs.min_margin
        assert chosen["essential_pass"] is True
        assert math.isfinite(p["ref_chosen_logp"]) and p["ref_chosen_logp"] < 0


@slow
def test_loss_starts_at_ln2_and_lora_trains(run):
    cfg, result = run
    rows = list(csv.DictReader((result.run_dir / "logs/metrics.csv").open()))
    losses = [float(r["train/dpo_loss_step"]) for r in rows if r.get("train/dpo_loss_step")]
    assert len(losses) == 4
    # policy == reference at step 0 (LoRA B starts at zero): the sigmoid DPO loss is ln 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(cfg.model.path)
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapter moved from its init
    assert all("language_model" in n for n, _ in model.named_parameters() if "lora_" in n)


@slow
def test_eval_json(run):
    _, result = run
    ev = json.loads((result.run_dir / "eval.json").read_text())
    for side in ("before", "after"):
        assert 0.0 <= ev[side]["rubric_score"] <= 1.0
        assert 0.0 <= ev[side]["essential_pass_rate"] <= 1.0
        assert ev[side]["prompts"] == 8 and ev[side]["responses"] == 16
    assert ev["gain"] == pytest.approx(ev["after"]["rubric_score"] - ev["before"]["rubric_score"])


def test_cli_reports_every_bad_key(capsys):
    rc = main(["--config", "configs/quickstart.yaml", "dpo.betta=1", "rollout.every_n_steps=0",
               "data.batch_size=abc"])
    err = capsys.readouterr().err
    assert rc == 2
    for key in ("dpo.betta", "rollout.every_n_steps", "data.batch_size"):
        assert key in err


@slow
def test_seeded_runs_repeat(run, tmp_path):
    """Same seed, same numbers: the round's first scores come out identical."""
    cfg, result = run
    torch.manual_seed(123)  # a different global state must not matter
    cfg2 = load_config(result.run_dir / "config.yaml", [f"run.dir={tmp_path}", "dpo.max_steps=2",
                                                        "data.heldout_pool=null"])
    again = fit(cfg2)
    assert again.rounds[0]["mean_score"] == pytest.approx(result.rounds[0]["mean_score"])
    assert again.rounds[0]["pairs"] == result.rounds[0]["pairs"]


@slow
def test_full_finetuning_uses_a_frozen_reference(run, tmp_path):
    """model.finetune=full: every language-model weight trains, the vision tower does not, the
    reference is a frozen copy (loss ln 2 at step 0), and the whole model is saved."""
    from transformers import AutoModelForImageTextToText

    cfg, result = run
    cfg2 = load_config(result.run_dir / "config.yaml", [
        f"run.dir={tmp_path}", "dpo.max_steps=2", "data.heldout_pool=null", "model.finetune=full",
        "dpo.lr=1e-3"])
    out = fit(cfg2)
    rows = list(csv.DictReader((out.run_dir / "logs/metrics.csv").open()))
    losses = [float(r["train/dpo_loss_step"]) for r in rows if r.get("train/dpo_loss_step")]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert out.adapter_dir.name == "model"
    before = AutoModelForImageTextToText.from_pretrained(cfg.model.path)
    after = AutoModelForImageTextToText.from_pretrained(out.adapter_dir)
    start = dict(before.named_parameters())
    moved = {n for n, p in after.named_parameters() if not torch.equal(p, start[n])}
    assert any("language_model" in n for n in moved)
    assert not any("visual" in n for n in moved)


def test_full_finetuning_refuses_4bit():
    with pytest.raises(Exception, match="model.finetune"):
        load_config("configs/quickstart.yaml", ["model.finetune=full", "model.quantization=nf4"])
