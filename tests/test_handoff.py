"""rdpo.tools.handoff and rdpo.tools.lmms_task: the lmms-eval / VLMEvalKit hand-off of an exported policy,
and (slow) lmms-eval itself scoring the exported toy policy as rdpo does.

lmms-eval runs from .venv-eval (scripts/eval_env.sh: lmms-eval layered over the project venv;
without network to build it the slow test skips and says why), offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from small_toy import QUICKSTART, ROOT, build_small_toy

from rdpo.config import RolloutConfig, load_config
from rdpo.pool import load_pool
from rdpo.rundir import save_config
from rdpo.tools.evaluate import main as evaluate_main
from rdpo.tools.handoff import make_handoff, template_system_prompt
from rdpo.tools.lmms_task import Scorer, task_scorer, write_task

# Real Qwen2-VL's template: a default system turn when the prompt has none.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Gemma 3's way: a system message is merged into the first user turn, none is added.
MERGED_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'][0]['text'] "
    "+ '\n\n' %}{% set rest = messages[1:] %}{% else %}{% set first = '' %}"
    "{% set rest = messages %}{% endif %}{% for m in rest %}<start_of_turn>{{ m['role'] }}\n"
    "{% if loop.first %}{{ first }}{% endif %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}<end_of_turn>\n{% endfor %}<start_of_turn>model\n")


@pytest.fixture
def processor(tiny_dir):
    from rdpo.model import load_processor

    return load_processor(str(tiny_dir))


def test_template_system_prompt_reads_what_the_template_writes(processor):
    assert template_system_prompt(processor) is None  # the tiny build writes no system turn
    processor.chat_template = QWEN_TEMPLATE
    assert template_system_prompt(processor) == "You are a helpful assistant."
    processor.chat_template = MERGED_TEMPLATE
    assert template_system_prompt(processor) is None


def _cfg(tmp_path, tiny_dir, toy_pools):
    return load_config(QUICKSTART, [f"run.dir={tmp_path / 'run'}", "toy.enabled=false",
                                    f"model.path={tiny_dir}", f"data.train_pool={toy_pools.train}",
                                    f"data.heldout_pool={toy_pools.heldout}"])


def test_handoff_passes_the_training_pixel_bounds_and_system_prompt(processor, tiny_dir,
                                                                    toy_pools, tmp_path):
    cfg = _cfg(tmp_path, tiny_dir, toy_pools)
    h = make_handoff(tmp_path / "run", tmp_path / "out", processor, cfg)
    out = str((tmp_path / "out").resolve())
    assert (h.family, h.lmms_eval_model, h.vlmevalkit_class) == ("qwen2_vl", "qwen2_vl",
                                                                 "Qwen2VLChat")
    # The tiny processor's pixel budget, not lmms-eval's defaults (3,136 to 602,112).
    assert (h.min_pixels, h.max_pixels) == (112 * 56, 112 * 56)
    assert h.lmms_eval_model_args == f"pretrained={out},min_pixels=6272,max_pixels=6272"
    assert h.vlmevalkit_config["model"]["run"] == {"class": "Qwen2VLChat", "model_path": out,
                                                   "min_pixels": 6272, "max_pixels": 6272}
    # lmms-eval's qwen2_vl writes a system turn and JPEG-encodes the images: said, not hidden.
    assert not h.lmms_eval_exact and h.system_prompt is None
    assert any("writes a system turn" in n for n in h.notes)
    assert any("JPEG" in n for n in h.notes)
    assert f"--model qwen2_vl --model_args pretrained={out},min_pixels=6272" in \
        h.commands["lmms_eval_hf"]
    assert h.commands["vllm_serve"].startswith(f"vllm serve {out} --served-model-name run")
    assert "--model openai --model_args model_version=run,base_url=http://localhost:8000/v1" in \
        h.commands["lmms_eval_openai"]
    # A template with a default system prompt: lmms-eval gets that prompt, the prompts match.
    processor.chat_template = QWEN_TEMPLATE
    h = make_handoff(tmp_path / "run", tmp_path / "out", processor, cfg)
    assert h.lmms_eval_model_args.endswith(",system_prompt=You are a helpful assistant.")
    assert not any("system turn" in n for n in h.notes)


# Per family: lmms-eval's class, the image settings it must be given, what stays different
# (measured on the tiny builds against rdpo's greedy answers, lmms-eval 0.7.3: llava_hf,
# internvl_hf with these args, llama_vision and qwen2_5_vl answer as rdpo does).
FAMILY_ARGS = {
    "qwen3_vl": ("qwen3_vl", ",min_pixels=6272,max_pixels=6272", False),  # its system turn
    "internvl": ("internvl_hf", ",min_patches=1,max_patches=1", True),  # its default: 1 to 12
    "gemma3": ("gemma3", "", False),  # system turn, JPEG
    "idefics3": (None, "", False),  # lmms-eval's idefics2 loads Idefics2 only
}


@pytest.mark.parametrize("family", FAMILY_ARGS)
def test_handoff_per_family(family, toy_pools, tmp_path):
    from rdpo.demo import toy
    from rdpo.demo.tiny import build_tiny_vlm
    from rdpo.model import load_processor

    model_dir = build_tiny_vlm(tmp_path / family, toy.corpus(), family=family, hidden=32,
                               layers=1)
    cfg = _cfg(tmp_path, model_dir, toy_pools)
    h = make_handoff(tmp_path / "run", model_dir, load_processor(str(model_dir)), cfg)
    model, args, exact = FAMILY_ARGS[family]
    assert (h.family, h.lmms_eval_model, h.lmms_eval_exact) == (family, model, exact)
    assert h.lmms_eval_model_args == f"pretrained={model_dir.resolve()}{args}"
    assert ("lmms_eval_hf" in h.commands) == (model is not None)
    assert exact or h.notes


def test_evaluate_handoff_prints_the_commands_of_a_run_still_training(tiny_dir, toy_pools,
                                                                     tmp_path, capsys):
    cfg = _cfg(tmp_path, tiny_dir, toy_pools)
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")  # no adapter yet: still training
    assert evaluate_main(["handoff", str(tmp_path / "run"), "--out", str(tmp_path / "m"),
                          "--lmms-task", str(tmp_path / "task")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Evaluating run") and "| family | qwen2_vl |" in text
    assert "| image size | 6,272 to 6,272 pixels per image" in text
    assert "--model qwen2_vl --model_args" in text and "vllm serve" in text
    assert not (tmp_path / "m").exists()  # printed, nothing exported
    yaml = (tmp_path / "task" / "rdpo_heldout.yaml").read_text()
    assert "dataset_path: json" in yaml and "max_new_tokens: 24" in yaml
    assert "metric: rubric_score" in yaml and "truth_score" not in yaml  # not the toy's pool
    assert evaluate_main(["handoff", str(tmp_path / "run"), "--json"]) == 0
    h = json.loads(capsys.readouterr().out)
    assert h["model_dir"] == str((tmp_path / "run" / "export").resolve())
    assert evaluate_main(["handoff", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_task_scores_answers_as_rdpo_does(toy_pools, tmp_path):
    from rdpo.config import ToyConfig
    from rdpo.demo.truth import GroundTruth

    toy = ToyConfig(enabled=True, n_train=16, n_heldout=8)
    write_task(tmp_path, toy_pools.heldout, name="t", max_new_tokens=12, toy=toy)
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    records = load_pool(toy_pools.heldout)
    assert [d["id"] for d in docs] == [r.id for r in records]
    assert all(os.path.isabs(p) for d in docs for p in d["images"])
    process = task_scorer(tmp_path / "task.json")
    truth = GroundTruth.for_toy(toy)
    for rec in records[:3]:
        answer = rec.reference
        got = process({"id": rec.id}, [f"  {answer}\n"])
        assert got["truth_score"] == truth.check(rec.id, answer).score == 1.0
        assert got["rubric_score"] == Scorer(toy_pools.heldout).score(rec.id, answer)[
            "rubric_score"]
    with pytest.raises(ValueError, match="not the toy draw"):
        write_task(tmp_path / "x", toy_pools.heldout, name="t", max_new_tokens=12,
                   toy=ToyConfig(enabled=True, n_train=16, n_heldout=8, task_seed=1))


# -- lmms-eval itself (slow) --------------------------------------------------------------------

LIMIT = 4


def eval_python():
    """.venv-eval's python (scripts/eval_env.sh builds it if missing), or skip saying why."""
    try:
        out = subprocess.run([str(ROOT / "scripts/eval_env.sh")], capture_output=True, text=True,
                             timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/eval_env.sh took over 30 min")
    if out.returncode != 0:
        pytest.skip(f"scripts/eval_env.sh failed (no network to PyPI?): {out.stderr[-400:]}")
    return ROOT / out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def exported(small_toy_cache, tmp_path_factory):
    """The quickstart's tiny Qwen2.5-VL policy after two DPO steps, exported merged (bfloat16:
    the dtype lmms-eval's qwen2_5_vl loads)."""
    from rdpo.fit import fit
    from rdpo.tools.export import export

    toy = build_small_toy(small_toy_cache, "toy.family=qwen2_5_vl")
    root = tmp_path_factory.mktemp("handoff")
    cfg = load_config(QUICKSTART, [*toy.overrides, "toy.family=qwen2_5_vl",
                                   f"run.dir={root / 'run'}", "dpo.max_steps=2",
                                   "rollout.every_n_steps=2", "data.heldout_pool=null"])
    fit(cfg)
    return cfg, toy, export(cfg.run.dir, root / "qwen2_5_vl-policy", merge=True,
                            dtype="bfloat16")


@pytest.mark.slow
def test_lmms_eval_scores_the_export_as_rdpo_does(exported, tmp_path):
    """lmms-eval (its qwen2_5_vl class, the hand-off's model args, offline) answers the toy's
    held-out prompts token for token as rdpo's own greedy evaluation of the exported folder,
    so the scores it reports are rdpo's."""
    from transformers import AutoModelForImageTextToText

    from rdpo.model import load_processor
    from rdpo.rollout import generate

    python = eval_python()
    cfg, toy, out = exported
    h = json.loads((out / "handoff.json").read_text())
    assert (h["lmms_eval_model"], h["min_pixels"], h["max_pixels"]) == ("qwen2_5_vl", 6272, 6272)
    assert h["lmms_eval_exact"] and h["notes"] == []
    write_task(tmp_path / "task", toy.paths.heldout_pool, name="rdpo_toy",
               max_new_tokens=cfg.rollout.max_new_tokens, toy=cfg.toy)
    # Offline, and any connection attempt would fail at once (a dead proxy).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "", "WANDB_MODE": "disabled"}
    run = subprocess.run(
        [str(python), "-m", "lmms_eval", "--model", h["lmms_eval_model"], "--model_args",
         h["lmms_eval_model_args"] + ",device=cpu,device_map=cpu", "--include_path",
         str(tmp_path / "task"), "--tasks", "rdpo_toy", "--batch_size", "1", "--limit",
         str(LIMIT), "--log_samples", "--output_path", str(tmp_path / "lmms")],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next((tmp_path / "lmms").rglob("*_results.json")).read_text())
    samples = [json.loads(line) for line in
               next((tmp_path / "lmms").rglob("*_samples_rdpo_toy.jsonl")).read_text().splitlines()]
    theirs = {s["doc_id"]: s["filtered_resps"] for s in samples}
    # rdpo: the same folder, rdpo's processor, chat template and generation settings, greedy.
    records = load_pool(toy.paths.heldout_pool)[:LIMIT]
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16).eval()
    greedy = RolloutConfig(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                           samples_per_prompt=1, batch_size=1)
    ours = [(r.record.id, r.responses[0]) for r in generate(model, load_processor(str(out)),
                                                              records, greedy)]
    assert [theirs[i] for i in range(LIMIT)] == [a for _, a in ours]
    rdpo_scores = Scorer(toy.paths.heldout_pool, cfg.toy).mean(ours)
    reported = {k: results["results"]["rdpo_toy"][f"{k},none"] for k in rdpo_scores}
    print(f"\nlmms-eval {reported}\nrdpo      {rdpo_scores}", file=sys.stderr)
    assert reported == pytest.approx(rdpo_scores, abs=1e-9)
