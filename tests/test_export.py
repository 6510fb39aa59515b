"""rdpo.export and rdpo.generate on a made-up finished run: the tiny Qwen2-VL with a LoRA
adapter whose weights are random (a fresh adapter is the identity and would hide a bad merge)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from small_toy import QUICKSTART

from rdpo.config import RolloutConfig, load_config, save_config
from rdpo.export import ExportError, export, find_weights
from rdpo.generate import main as generate_main
from rdpo.judges import RuleJudge
from rdpo.pool import load_pool
from rdpo.rollout import generate

GREEDY = RolloutConfig(temperature=0.0, max_new_tokens=12, samples_per_prompt=1)
EVAL = {"before": {"rubric_score": 0.25, "essential_pass_rate": 0.125, "prompts": 8,
                   "samples_per_prompt": 2, "temperature": 1.0},
        "after": {"rubric_score": 0.5, "essential_pass_rate": 0.375, "prompts": 8,
                  "samples_per_prompt": 2, "temperature": 1.0}, "gain": 0.25}


def _config(run_dir, tiny_dir, toy_pools, *extra):
    return load_config(QUICKSTART, [f"run.dir={run_dir}", "toy.enabled=false",
                                    f"model.path={tiny_dir}", f"data.train_pool={toy_pools.train}",
                                    f"data.heldout_pool={toy_pools.heldout}", "model.lora.r=4",
                                    *extra])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dir, toy_pools):
    """A run directory as a finished LoRA run leaves it: config.yaml, adapter/, eval.json,
    rounds/ (three rounds)."""
    from rdpo.model import load_policy

    run_dir = tmp_path_factory.mktemp("lora_run")
    cfg = _config(run_dir, tiny_dir, toy_pools)
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    model, processor = load_policy(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(run_dir / "adapter")
    processor.save_pretrained(run_dir / "adapter")
    (run_dir / "eval.json").write_text(json.dumps(EVAL))
    for i in range(3):
        (run_dir / "rounds" / f"{i:04d}").mkdir(parents=True)
    return run_dir, model.eval(), processor


def _greedy(model, processor, records):
    return [r.token_ids for r in generate(model, processor, records, GREEDY)]


def test_merged_export_answers_as_the_adapter_does(lora_run, toy_pools, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run_dir, policy, processor = lora_run
    out = export(run_dir, tmp_path / "merged", merge=True)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
            "tokenizer.json", "processor_config.json", "chat_template.jinja"} <= names
    assert not any(n.startswith("adapter") for n in names)  # a plain checkpoint, no PEFT
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    loaded = AutoProcessor.from_pretrained(out)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    records = load_pool(toy_pools.heldout)[:4]
    expected = _greedy(policy, processor, records)
    assert _greedy(merged, loaded, records) == expected
    # The adapter changes the answers: equal outputs above are not the base's by accident.
    with policy.disable_adapter():
        assert _greedy(policy, processor, records) != expected


def test_adapter_export_loads_through_peft_and_keeps_the_dtype_asked(lora_run, toy_pools,
                                                                      tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    run_dir, policy, processor = lora_run
    out = export(run_dir, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    records = load_pool(toy_pools.heldout)[:2]
    assert _greedy(model, processor, records) == _greedy(policy, processor, records)
    half = export(run_dir, tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(half / "adapter_model.safetensors").values()} == {
        torch.bfloat16}


def test_model_card_names_base_method_rounds_and_heldout_scores(lora_run, tmp_path):
    run_dir, _, _ = lora_run
    card = (export(run_dir, tmp_path / "m", merge=True, dtype="bfloat16") / "README.md").read_text()
    cfg = find_weights(run_dir).cfg
    assert f"`{cfg.model.path}`" in card
    assert "LoRA r=4, alpha=32, merged into the base, bfloat16" in card
    assert "3 rounds of 40 steps" in card and "beta 0.5" in card and "rubric pairs" in card
    assert "| rubric score | 0.250 | 0.500 |" in card
    assert "| essential pass rate | 12.5% | 37.5% |" in card


def test_export_errors_name_what_is_missing(lora_run, tmp_path):
    run_dir, _, _ = lora_run
    with pytest.raises(ExportError, match="not a run directory"):
        export(tmp_path, tmp_path / "out")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.yaml", unfinished / "config.yaml")
    (unfinished / "checkpoints").mkdir()
    (unfinished / "checkpoints" / "last.ckpt").write_text("x")
    with pytest.raises(ExportError, match=r"no LoRA adapter .*adapter_config.json is missing.*"
                                          r"has not finished.*run.resume=auto"):
        export(unfinished, tmp_path / "out")
    with pytest.raises(ExportError, match="outside the run"):
        export(run_dir, run_dir / "adapter")


def test_full_finetune_run_exports_its_model(tiny_dir, toy_pools, tmp_path):
    """model.finetune=full runs save model/ (the whole policy): exported in the dtype asked,
    --merge has nothing to do."""
    from transformers import AutoModelForImageTextToText

    run_dir = tmp_path / "full"
    run_dir.mkdir()
    save_config(_config(run_dir, tiny_dir, toy_pools, "model.finetune=full"),
                run_dir / "config.yaml")
    with pytest.raises(ExportError, match="no fine-tuned model"):
        export(run_dir, tmp_path / "out")
    shutil.copytree(tiny_dir, run_dir / "model")
    out = export(run_dir, tmp_path / "out", merge=True, dtype="bfloat16")
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert "full fine-tuning" in (out / "README.md").read_text()


def test_generate_prints_answers_verdicts_and_scores(lora_run, toy_pools, capsys):
    from rdpo.generate import load_run_policy, sample

    run_dir, _, _ = lora_run
    record = load_pool(toy_pools.heldout)[0]
    assert generate_main(["--run", str(run_dir), "--rubric", str(toy_pools.heldout),
                          "--id", record.id, "--samples", "3", "--seed", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{record.id}: {record.instruction}")
    # The same draw again (the run's settings, seed 1), judged here by the rubric's checks.
    model, processor, cfg = load_run_policy(run_dir)
    rollout = sample(model, processor, record, cfg.rollout, 3, seed=1)
    verdicts = RuleJudge().judge(record, rollout.responses)
    words = {True: "met", False: "NOT", None: "unknown"}
    expected = [[c.id, words[v[c.id]]] for v in verdicts for c in record.rubric.criteria()]
    ids = {c.id for c in record.rubric.criteria()}
    printed = [line.split()[:2] for line in out.splitlines()
               if line.startswith("    ") and line.split()[0] in ids]
    assert printed == expected
    for response in rollout.responses:
        assert response.replace("\n", "\n    ") in out
    assert out.splitlines()[-1].startswith("mean score") and "over 3 answers" in out


def test_generate_from_an_exported_model_with_image_and_prompt(lora_run, toy_pools, tmp_path,
                                                              capsys):
    run_dir, policy, processor = lora_run
    out = export(run_dir, tmp_path / "merged", merge=True)
    record = load_pool(toy_pools.heldout)[1]
    assert generate_main(["--model", str(out), "--image", str(record.images[0]), "--prompt",
                          record.instruction, "--temperature", "0", "--max-new-tokens", "12",
                          "-q"]) == 0
    out = capsys.readouterr().out
    assert "[1] " in out and "[2] " not in out  # greedy: one answer
    expected = next(iter(generate(policy, processor, [record], GREEDY))).responses[0]
    assert "[1] " + expected.replace("\n", "\n    ") in out


def test_generate_errors(lora_run, toy_pools, tmp_path, capsys):
    run_dir, _, _ = lora_run
    assert generate_main(["--run", str(run_dir), "--rubric", str(toy_pools.heldout), "--id",
                          "nope", "-q"]) == 2
    assert "--id 'nope': no such record" in capsys.readouterr().err
    assert generate_main(["--run", str(tmp_path), "--image", "x.png", "--prompt", "hi"]) == 2
    assert "no such file" in capsys.readouterr().err
