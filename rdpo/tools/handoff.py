"""Hand a trained policy to the evaluators people use: lmms-eval and VLMEvalKit.

Both load a merged Hugging Face folder (``python -m rdpo.export RUN --out DIR --merge``) from
one path, and both change what the policy sees unless told otherwise (lmms-eval 0.7.3, read and
measured on the tiny builds):

- image pixel bounds: lmms-eval's Qwen classes and VLMEvalKit's hand the processor their own
  ``min_pixels``/``max_pixels`` (lmms-eval ``qwen2_5_vl``: 200,704 to 1,605,632), which replace
  the exported processor's: the hand-off passes the bounds the run trained with;
- the system turn: some lmms-eval classes write one into every prompt (`ALWAYS_SYSTEM`, "You
  are a helpful assistant." unless ``system_prompt=`` says otherwise), whatever the chat
  template writes for a prompt without one, which is how rdpo trains. The hand-off passes the
  template's own default system prompt; when the template writes none, no ``system_prompt``
  can match, and it says so (the vLLM and OpenAI-server routes render the folder's template
  as it is);
- images: some classes re-encode every image as JPEG, quality 85 (`JPEG_IMAGES`): lossy;
- weights: some classes load bfloat16 whatever the folder holds (`BF16_ONLY`);
- generation: greedy up to the run's ``rollout.max_new_tokens`` is what the run's answers
  were trained within (benchmarks set their own limit).

`make_handoff` builds a `Handoff` from a run and the folder it is (or will be) exported to;
`write_handoff` writes ``handoff.json``, ``HANDOFF.md`` and ``vlmevalkit.json`` there;
``python -m rdpo.evaluate handoff RUN`` prints the same for a run still training.
The lmms-eval task that checks the hand-off on a pool is `rdpo.tools.lmms_task`.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rdpo.families import Family

ALWAYS_SYSTEM = frozenset({"qwen2_vl", "qwen3_vl", "gemma3"})
"""lmms-eval classes that write a system turn into every prompt (``system_prompt=``)."""
PIXEL_ARGS = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})
"""lmms-eval classes that pass min_pixels/max_pixels (with their own defaults) to the processor."""
PATCH_ARGS = frozenset({"internvl_hf"})
"""lmms-eval classes that pass min_patches/max_patches (tiles per image, default 1 to 12) to the
processor: the hand-off passes the processor's own."""
JPEG_IMAGES = frozenset({"qwen2_vl", "gemma3"})
"""lmms-eval classes that re-encode every image as JPEG (quality 85) before the processor."""
BF16_ONLY = frozenset({"qwen2_5_vl", "gemma3", "internvl_hf"})
"""lmms-eval classes that load the weights in bfloat16 whatever the folder's dtype."""
PORT = 8000


@dataclass(frozen=True)
class Handoff:
    """How to evaluate a run's exported policy as it was trained (see the module docstring)."""

    run_dir: str
    model_dir: str
    family: str | None
    dtype: str
    lmms_eval_model: str | None
    """lmms-eval's ``--model`` for this family's transformers folder (`Family.lmms_eval`)."""
    lmms_eval_model_args: str
    lmms_eval_exact: bool
    """That class shows the policy its training prompt and images as they are (`notes`: why not)."""
    vlmevalkit_class: str | None
    min_pixels: int | None
    max_pixels: int | None
    """The processor's pixel budget per image (Qwen families, `Family.pixel_bounds`)."""
    system_prompt: str | None
    """What the chat template writes as the system turn of a prompt without one; None: none."""
    max_new_tokens: int
    commands: dict[str, str] = field(default_factory=dict)
    vlmevalkit_config: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()


_PROBE = "\x00rdpo-system-probe\x00"


def template_system_prompt(processor) -> str | None:
    """The system turn's text the chat template writes for a prompt that has none (rdpo's
    prompts have none), or None when it writes no system turn: the template rendered with and
    without a system message whose text is a probe."""
    user = [{"role": "user", "content": [{"type": "text", "text": "Q"}]}]

    def render(messages):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    plain = render(user)
    for content in ([{"type": "text", "text": _PROBE}], _PROBE):
        try:
            probed = render([{"role": "system", "content": content}, *user])
        except Exception:  # noqa: BLE001 - a template that takes only one content form
            continue
        head, _, tail = probed.partition(_PROBE)
        if _PROBE in probed and len(plain) >= len(head) + len(tail) \
                and plain.startswith(head) and plain.endswith(tail):
            return plain[len(head):len(plain) - len(tail)]
        return None
    return None


def pixel_bounds(processor, family: Family | None) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) of a Qwen-style processor (its size is a pixel budget)."""
    if family is None or not family.pixel_bounds:
        return None, None
    size = processor.image_processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    return get("shortest_edge"), get("longest_edge")


def _lmms_notes(model: str | None, family: Family | None, system: str | None,
                dtype: str) -> list[str]:
    """Why lmms-eval's class `model` would not show the policy what it trained on."""
    if model is None:
        return [f"lmms-eval has no class for {family.name if family else 'this model'} that "
                f"loads a transformers folder: use the vLLM or OpenAI-server route"]
    notes = []
    if model in ALWAYS_SYSTEM and system is not None and "," in system:
        notes.append(f"the template's system prompt has a comma, which lmms-eval's --model_args "
                     f"cannot carry: {model}'s prompts differ from training")
    if model in ALWAYS_SYSTEM and system is None:
        notes.append(f"lmms-eval's {model} writes a system turn into every prompt and this chat "
                     f"template writes none (rdpo trained without one): its prompts differ from "
                     f"training; the vLLM and OpenAI-server routes render the template as it is")
    if model in JPEG_IMAGES:
        notes.append(f"lmms-eval's {model} re-encodes every image as JPEG (quality 85): lossy; "
                     f"the vLLM and OpenAI-server routes send the image as it is (PNG)")
    if model in BF16_ONLY and dtype != "bfloat16":
        notes.append(f"lmms-eval's {model} loads the weights in bfloat16 (this export: {dtype}; "
                     f"export with --dtype bfloat16 to score the weights it loads)")
    return notes


def make_handoff(run_dir: str | Path, model_dir: str | Path, processor, cfg,
                 dtype: str | None = None) -> Handoff:
    """The hand-off of run `run_dir` (its `Config` `cfg` and the `processor` it trained with)
    exported to `model_dir` in `dtype` (default: the run's)."""
    from rdpo.families import processor_family

    family = processor_family(processor)
    dtype = dtype or cfg.model.dtype
    system = template_system_prompt(processor)
    lo, hi = pixel_bounds(processor, family)
    model = family.lmms_eval if family else None
    notes = _lmms_notes(model, family, system, dtype)
    model_dir = str(Path(model_dir).resolve())
    args = [f"pretrained={model_dir}"]
    if model in PIXEL_ARGS and lo is not None:
        args += [f"min_pixels={lo}", f"max_pixels={hi}"]
    ip = getattr(processor, "image_processor", None)
    if model in PATCH_ARGS and getattr(ip, "max_patches", None) is not None:
        args += [f"min_patches={ip.min_patches}", f"max_patches={ip.max_patches}"]
    if model in ALWAYS_SYSTEM and system is not None and "," not in system:
        args.append(f"system_prompt={system}")
    model_args = ",".join(args)
    vlmeval = family.vlmevalkit if family else None
    vcfg = {}
    if vlmeval:
        entry = {"class": vlmeval, "model_path": model_dir}
        if lo is not None:
            entry |= {"min_pixels": lo, "max_pixels": hi}
        vcfg = {"model": {Path(run_dir).name: entry},
                "data": {"MMBench_DEV_EN": {"class": "ImageMCQDataset",
                                            "dataset": "MMBench_DEV_EN"}}}
        notes += _vlmevalkit_notes(family, model_dir)
    exact = model is not None and model not in JPEG_IMAGES and not (
        model in ALWAYS_SYSTEM and (system is None or "," in system))
    h = Handoff(str(Path(run_dir).resolve()), model_dir, family.name if family else None, dtype,
                model, model_args, exact, vlmeval, lo, hi, system, cfg.rollout.max_new_tokens,
                notes=tuple(notes), vlmevalkit_config=vcfg)
    return _with_commands(h, Path(run_dir).name)


def _vlmevalkit_notes(family: Family, model_dir: str) -> list[str]:
    # VLMEvalKit's Qwen2VLChat picks Qwen2.5-VL's class when the path names it, Qwen2-VL's else.
    if family.vlmevalkit != "Qwen2VLChat":
        return []
    named = any(s in model_dir.lower() for s in ("2.5", "2_5", "qwen25"))
    if named != (family.name == "qwen2_5_vl"):
        want = "contain" if family.name == "qwen2_5_vl" else "not contain"
        return [f"VLMEvalKit's Qwen2VLChat picks the model class from the path: it must {want} "
                f"'2.5', '2_5' or 'qwen25' for a {family.name} folder (rename {model_dir})"]
    return []


def _with_commands(h: Handoff, name: str) -> Handoff:
    q, d = shlex.quote, h.model_dir
    lmms = (f"python -m lmms_eval --tasks mme --batch_size 1 --log_samples "
            f"--output_path {q(d + '/lmms-eval')}")
    commands = {"hf": f"python -m rdpo.generate --model {q(d)} --image IMAGE --prompt PROMPT "
                      f"--temperature 0 --max-new-tokens {h.max_new_tokens}"}
    if h.lmms_eval_model:
        commands["lmms_eval_hf"] = (f"{lmms} --model {h.lmms_eval_model} "
                                    f"--model_args {q(h.lmms_eval_model_args)}")
    # vLLM reads the pixel bounds and the chat template from the folder itself.
    commands |= {
        "lmms_eval_vllm": f"{lmms} --model vllm --model_args {q(f'model={d},dtype={h.dtype}')}",
        "vllm_serve": f"vllm serve {q(d)} --served-model-name {q(name)} --dtype {h.dtype} "
                      f"--port {PORT}",
        "lmms_eval_openai": f"OPENAI_API_KEY=EMPTY {lmms} --model openai --model_args "
                            f"{q(f'model_version={name},base_url=http://localhost:{PORT}/v1')}"}
    if h.vlmevalkit_class:
        commands["vlmevalkit"] = f"python run.py --config {q(d + '/vlmevalkit.json')}"
    return replace(h, commands=commands)


def markdown(h: Handoff) -> str:
    """HANDOFF.md: the facts and the commands, short."""
    px = (f"{h.min_pixels:,} to {h.max_pixels:,} pixels per image (passed as min_pixels / "
          f"max_pixels)" if h.min_pixels is not None else "as saved in processor_config.json")
    system = (f"`{h.system_prompt}` (the chat template's default)" if h.system_prompt is not None
              else "none (the chat template writes no system turn; rdpo trained without one)")
    lines = [f"# Evaluating {Path(h.run_dir).name}", "",
             "Generated by rdpo from the run: this folder loads as the policy was trained.", "",
             "| | |", "|---|---|",
             f"| family | {h.family or 'unknown'} |",
             f"| weights | {h.dtype} |",
             "| lmms-eval model | " + (f"`{h.lmms_eval_model}`" if h.lmms_eval_model else "none")
             + (" (prompts and images as trained) |" if h.lmms_eval_exact else " (see below) |"),
             f"| VLMEvalKit class | `{h.vlmevalkit_class or 'none'}` |",
             f"| image size | {px} |",
             f"| system turn | {system} |",
             f"| trained answers | up to {h.max_new_tokens} new tokens, greedy for scores |", ""]
    lines += [f"- {n}" for n in h.notes] + ([""] if h.notes else [])
    titles = {"hf": "transformers (rdpo's own loader)", "lmms_eval_hf": "lmms-eval, transformers",
              "lmms_eval_vllm": "lmms-eval, vLLM in-process",
              "vllm_serve": "OpenAI-compatible server (vLLM)",
              "lmms_eval_openai": "lmms-eval against that server",
              "vlmevalkit": "VLMEvalKit (from its checkout; vlmevalkit.json beside this file)"}
    for key, cmd in h.commands.items():
        lines += [f"{titles[key]}:", "", "```bash", cmd, "```", ""]
    lines.append("Replace `mme` (and MMBench_DEV_EN in vlmevalkit.json) by your benchmarks. "
                 "The same, as data: handoff.json.")
    return "\n".join(lines) + "\n"


def write_handoff(h: Handoff, out: str | Path) -> None:
    """handoff.json, HANDOFF.md and (when VLMEvalKit has a class) vlmevalkit.json in `out`."""
    out = Path(out)
    (out / "handoff.json").write_text(json.dumps(asdict(h), indent=2) + "\n")
    (out / "HANDOFF.md").write_text(markdown(h))
    if h.vlmevalkit_config:
        (out / "vlmevalkit.json").write_text(json.dumps(h.vlmevalkit_config, indent=2) + "\n")


def run_handoff(run_dir: str | Path, model_dir: str | Path | None = None,
                dtype: str | None = None) -> Handoff:
    """The hand-off of a run, finished or still training (the processor of its model.path);
    `model_dir` defaults to RUN_DIR/export, where ``python -m rdpo.export`` would write."""
    from rdpo.config import load_config
    from rdpo.model import load_processor

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.yaml; run.dir of "
                         f"python -m rdpo.fit is one)")
    cfg = load_config(config)
    saved = run_dir / ("adapter" if cfg.model.finetune == "lora" else "model")
    processor = load_processor(str(saved if (saved / "config.json").is_file()
                                   or (saved / "adapter_config.json").is_file()
                                   else cfg.model.path))
    return make_handoff(run_dir, model_dir or run_dir / "export", processor, cfg, dtype)


