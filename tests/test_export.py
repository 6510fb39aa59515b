"""rdpo.tools.export and rdpo.tools.try_policy on a made-up finished run: the tiny Qwen2-VL with a LoRA
adapter whose weights are random (a fresh adapter is the identity and would hide a bad merge)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from small_toy import QUICKSTART

from rdpo.config import RolloutConfig, load_config
from rdpo.judging.judges import RuleJudge
from rdpo.model import ADAPTER_INFO, base_record, write_adapter_info
from rdpo.pool import load_pool
from rdpo.rollout import generate
from rdpo.rundir import save_config
from rdpo.tools.export import BaseMismatch, ExportError, check_base, export, find_weights
from rdpo.tools.export import main as export_main
from rdpo.tools.try_policy import main as generate_main

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
    write_adapter_info(run_dir / "adapter", base_record(model, cfg.model.path))  # as fit does
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


def test_export_writes_only_into_a_new_or_empty_folder(lora_run, tiny_dir, tmp_path, capsys):
    """--out holding files is refused (--force empties it first); the run directory and the base
    model's folder are refused whatever the flags, and so is a folder --force would empty them
    with."""
    run_dir, _, _ = lora_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(run_dir), "--out", str(out), "-q"]) == 2
    assert (f"--out {out} is not empty (1 entries, e.g. notes.txt): export into a new or empty "
            "folder, or pass --force to empty it first") in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched
    assert export_main([str(run_dir), "--out", str(out), "--force", "-q"]) == 0
    assert "notes.txt" not in {p.name for p in out.iterdir()}
    assert (out / "adapter_model.safetensors").is_file() and (out / ADAPTER_INFO).is_file()
    export(run_dir, tmp_path / "empty")  # new: made
    (tmp_path / "empty2").mkdir()
    export(run_dir, tmp_path / "empty2")  # empty: fine
    for bad, force, why in [
            (tiny_dir, True, "inside the base model's folder"),
            (tiny_dir / "sub", False, "inside the base model's folder"),
            (run_dir, True, "inside the run directory"),
            (run_dir / "export", False, "inside the run directory"),
            (tiny_dir.parent, True, "emptying it would delete the (run directory|base model)"),
            (run_dir.parent, True, "emptying it would delete the run directory"),
            (out / "README.md", True, "a file, not a folder")]:
        with pytest.raises(ExportError, match=why):
            export(run_dir, bad, force=force)
    assert (tiny_dir / "config.json").is_file() and (run_dir / "adapter").is_dir()


@pytest.fixture
def other_base(tiny_dir, tmp_path):
    """A folder like tiny_dir whose weights are another model's (every weight moved a little:
    a re-downloaded or replaced model.path)."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_base"
    shutil.copytree(tiny_dir, other)
    torch.manual_seed(1)
    for file in other.glob("*.safetensors"):
        tensors = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    return other


def test_export_and_generate_refuse_another_base(lora_run, tiny_dir, toy_pools, other_base,
                                                 tmp_path, capsys):
    """The run's model.path now holds another model: --merge and generate refuse it, naming
    both paths and the flag; the same base in another dtype passes."""
    run_dir, _, _ = lora_run
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    save_config(_config(moved, other_base, toy_pools), moved / "config.yaml")
    with pytest.raises(BaseMismatch, match=rf"{moved}/adapter was trained on the base {tiny_dir}, "
                                           rf"but the base loaded from {other_base} is another "
                                           r"model \(base fingerprint [0-9a-f]{16}, the "
                                           r"adapter's is [0-9a-f]{16}\): put the adapter's "
                                           rf"base back at {other_base}, or pass "
                                           "--allow-base-mismatch"):
        export(moved, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists()
    assert export_main([str(moved), "--out", str(tmp_path / "merged"), "--merge",
                        "--allow-base-mismatch", "-q"]) == 0
    record = load_pool(toy_pools.heldout)[0]
    args = ["--rubric", str(toy_pools.heldout), "--id", record.id, "--samples", "1", "-q"]
    assert generate_main(["--run", str(moved), *args]) == 2
    assert "is another model" in capsys.readouterr().err
    assert generate_main(["--run", str(moved), *args, "--allow-base-mismatch"]) == 0
    # An exported adapter carries the record: transformers loads it onto the base its
    # adapter_config.json names, and generate checks that base.
    adapter = export(run_dir, tmp_path / "adapter")
    assert generate_main(["--model", str(adapter), *args]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other_base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert generate_main(["--model", str(adapter), *args]) == 2
    assert f"the base loaded from {other_base} is another model" in capsys.readouterr().err


def test_base_record_holds_across_quantisation_and_dtype(tiny_dir, tmp_path):
    """Recorded on the 4-bit policy in training, the base checks out against the full-precision
    base export merges onto, in float32 and bfloat16: the record names the weights it hashed
    (none of them 4-bit)."""
    from transformers import AutoModelForImageTextToText

    from rdpo.config import ModelConfig
    from rdpo.model import load_policy

    pytest.importorskip("bitsandbytes")
    nf4, _ = load_policy(ModelConfig(path=str(tiny_dir), quantization="nf4"))
    fp32, _ = load_policy(ModelConfig(path=str(tiny_dir)))
    record = base_record(nf4, str(tiny_dir))
    assert record["base_weights"] != base_record(fp32, str(tiny_dir))["base_weights"]
    assert not any("lora_" in n or "base_layer" in n for n in record["base_weights"])
    write_adapter_info(tmp_path, record)
    for dtype in (torch.float32, torch.bfloat16):
        plain = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=dtype)
        check_base(tmp_path, plain, str(tiny_dir))
    check_base(tmp_path, fp32, str(tiny_dir))  # and the PEFT-wrapped policy


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
    from rdpo.tools.try_policy import load_run_policy, sample

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
