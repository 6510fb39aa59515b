"""Export a finished run as a checkpoint other tools load.

    python -m rdpo.export RUN_DIR --out DIR [--merge] [--dtype bfloat16]

LoRA runs: ``--merge`` folds the adapter into the base weights (PEFT ``merge_and_unload``) and
writes a plain transformers checkpoint (config.json, model.safetensors, generation_config.json,
the processor's files), which ``AutoModelForImageTextToText.from_pretrained(DIR)``, vLLM
(``vllm serve DIR``), lmms-eval and VLMEvalKit load like any other. Without ``--merge`` the
adapter alone is written (adapter_config.json naming the base, adapter_model.safetensors, the
processor): transformers loads it onto its base through PEFT, and a vLLM server started with
``--enable-lora`` serves it as ``--lora-modules name=DIR``. Full fine-tuning runs
(model.finetune=full) saved the whole model; it is written as is, in `--dtype`.

Every export gets a README.md model card: base, method, rounds, held-out scores (eval.json).
The base is loaded without quantisation: a QLoRA adapter is merged into the full-precision
base weights, so the merged model is close to, not bit-equal with, the 4-bit policy trained.

``--out`` must be new or empty (``--force`` empties it first), and never the run directory or
the base model's folder, nor inside them. A run's adapter records its base (``rdpo_adapter.json``
beside adapter_config.json: the base's path and a fingerprint of its weights, written when the
run saves the adapter); ``--merge`` and `rdpo.tools.try_policy` refuse a base whose weights differ
(a model.path that now holds another model), unless ``--allow-base-mismatch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from rdpo import console
from rdpo.config import Config, ConfigError, load_config
from rdpo.model import ADAPTER_INFO, NamedWeights, base_weights

log = logging.getLogger("rdpo")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ALLOW_MISMATCH = "--allow-base-mismatch"


class ExportError(ValueError):
    """RUN_DIR cannot be exported (not a run, or a run that saved no weights yet)."""


class BaseMismatch(ExportError):
    """The base loaded is not the model the adapter was trained on."""


@dataclass(frozen=True)
class RunWeights:
    """What a finished run saved: its config, and the adapter (LoRA) or model (full) folder."""

    run_dir: Path
    cfg: Config
    weights: Path
    kind: str
    """``adapter`` (LoRA: adapter/) or ``model`` (full fine-tuning: model/)."""


def find_weights(run_dir: str | Path) -> RunWeights:
    """The run's saved weights, or an `ExportError` saying what is missing and why."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.yaml; run.dir of "
                          f"python -m rdpo.fit is one)")
    try:
        cfg = load_config(config)
    except ConfigError as err:
        raise ExportError(f"{config}: {err}") from None
    kind = "adapter" if cfg.model.finetune == "lora" else "model"
    weights = run_dir / kind
    needed = ADAPTER_FILES if kind == "adapter" else ("config.json",)
    missing = [name for name in needed if not (weights / name).is_file()]
    if missing:
        what = "LoRA adapter" if kind == "adapter" else "fine-tuned model"
        ckpt = run_dir / "checkpoints"
        hint = (f"; it has checkpoints: finish it with python -m rdpo.fit --config {config} "
                f"run.resume=auto" if ckpt.is_dir() and any(ckpt.iterdir()) else "")
        raise ExportError(f"{run_dir}: no {what} ({weights}/{missing[0]} is missing): the run "
                          f"has not finished (a run saves {kind}/ at its end){hint}")
    return RunWeights(run_dir, cfg, weights, kind)


def export(run_dir: str | Path, out: str | Path, *, merge: bool = False,
           dtype: str | None = None, force: bool = False,
           allow_base_mismatch: bool = False) -> Path:
    """Write RUN_DIR's policy to `out` (see the module docstring); returns `out`.
    `dtype`: float32, bfloat16 or float16 (default: the run's model.dtype). `force`: empty a
    non-empty `out` first. `allow_base_mismatch`: merge onto a base other than the adapter's."""
    from transformers import AutoModelForImageTextToText

    from rdpo.model import DTYPES, load_processor

    run = find_weights(run_dir)
    dtype = dtype or run.cfg.model.dtype
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    out = check_out(Path(out), run, force=force)
    processor = load_processor(str(run.weights))
    model = None
    if run.kind == "model":
        if merge:
            log.info("full fine-tuning run: the saved model is the whole policy, nothing to merge")
        model = AutoModelForImageTextToText.from_pretrained(run.weights, dtype=DTYPES[dtype])
    elif merge:
        from peft import PeftModel

        base = AutoModelForImageTextToText.from_pretrained(run.cfg.model.path,
                                                           dtype=DTYPES[dtype])
        check_base(run.weights, base, run.cfg.model.path, allow=allow_base_mismatch)
        model = PeftModel.from_pretrained(base, run.weights).merge_and_unload()
    _empty(out)  # only now: a refused export leaves the folder as it was
    if model is not None:
        model.save_pretrained(out)
    else:
        _copy_adapter(run.weights, out, DTYPES[dtype] if dtype != run.cfg.model.dtype else None)
    processor.save_pretrained(out)
    (out / "README.md").write_text(model_card(run, merged=merge or run.kind == "model",
                                              dtype=dtype))
    if model is not None:  # a plain checkpoint: how lmms-eval and VLMEvalKit load it as trained
        from rdpo.tools.handoff import make_handoff, write_handoff

        write_handoff(make_handoff(run.run_dir, out, processor, run.cfg, dtype), out)
    return out


def check_out(out: Path, run: RunWeights, *, force: bool) -> Path:
    """`out` resolved, if an export may write there: a new or empty folder (any folder with
    `force`), never the run directory or the base model's folder, nor inside them."""
    target = out.resolve()
    guarded = [(run.run_dir.resolve(), "the run directory")]
    base = Path(run.cfg.model.path)
    if base.exists():
        guarded.append((base.resolve(), "the base model's folder (model.path)"))
    for path, what in guarded:
        if target == path or path in target.parents:
            raise ExportError(f"--out {out}: inside {what} {path}; choose a folder outside the "
                              "run directory and the base model's folder")
        if force and target in path.parents:
            raise ExportError(f"--out {out} --force: emptying it would delete {what} {path}; "
                              "choose another folder")
    if target.exists() and not target.is_dir():
        raise ExportError(f"--out {out}: a file, not a folder; choose a new or empty folder")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if entries and not force:
        raise ExportError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0]}): "
                          "export into a new or empty folder, or pass --force to empty it first")
    return target


def _empty(out: Path) -> None:
    """Make `out` an empty folder (`check_out` has allowed it)."""
    out.mkdir(parents=True, exist_ok=True)
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_base(adapter_dir: str | Path, model, base_path: str, *, allow: bool = False) -> None:
    """Refuse (`BaseMismatch`) `model` as the base of the adapter in `adapter_dir` when its
    weights are not those the adapter was trained on (``rdpo_adapter.json``); `allow`: warn."""
    from rdpo.callbacks.checkpoint import base_fingerprint

    info_file = Path(adapter_dir) / ADAPTER_INFO
    if not info_file.is_file():
        log.warning("%s: no %s (saved before rdpo recorded bases): the base %s is not checked",
                    adapter_dir, ADAPTER_INFO, base_path)
        return
    info = json.loads(info_file.read_text())
    weights = base_weights(model)
    missing = [n for n in info["base_weights"] if n not in weights]
    if missing:
        detail = f"it has no weight {missing[0]}"
    else:
        now = base_fingerprint(NamedWeights(weights, info["base_weights"]))
        if now == info["base_fingerprint"]:
            return
        detail = f"base fingerprint {now}, the adapter's is {info['base_fingerprint']}"
    what = (f"{adapter_dir} was trained on the base {info['base']}, but the base loaded from "
            f"{base_path} is another model ({detail})")
    if not allow:
        raise BaseMismatch(f"{what}: put the adapter's base back at {base_path}, or pass "
                           f"{ALLOW_MISMATCH} to use this base anyway")
    log.warning("%s; used anyway (%s)", what, ALLOW_MISMATCH)


def _copy_adapter(src: Path, out: Path, dtype) -> None:
    shutil.copy2(src / "adapter_config.json", out / "adapter_config.json")
    if (src / ADAPTER_INFO).is_file():
        shutil.copy2(src / ADAPTER_INFO, out / ADAPTER_INFO)
    if dtype is None:
        shutil.copy2(src / "adapter_model.safetensors", out / "adapter_model.safetensors")
        return
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(dtype) for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})


def _rounds(run_dir: Path) -> int:
    folder = run_dir / "rounds"
    return sum(1 for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else 0


def model_card(run: RunWeights, *, merged: bool, dtype: str) -> str:
    """A short README.md: base, method, rounds, held-out scores."""
    cfg = run.cfg
    lines = [f"# {run.run_dir.name}", "",
             "A vision-language policy trained with rubric-based DPO (rDPO, arXiv 2604.13029) "
             "by rdpo. Loads with "
             "`AutoModelForImageTextToText.from_pretrained(this_folder)`.", "",
             "| | |", "|---|---|",
             f"| base | `{cfg.model.path}` |",
             f"| weights | {_weights_line(run, merged)}, {dtype} |",
             f"| method | on-policy DPO, {cfg.pairs.strategy} pairs ({cfg.pairs.aggregation} "
             f"score), loss {cfg.dpo.loss_type}, beta {cfg.dpo.beta}, lr {cfg.dpo.lr}"
             + (f", SFT weight {cfg.dpo.sft_weight}" if cfg.dpo.sft_weight else "") + " |",
             f"| rounds | {_rounds(run.run_dir)} rounds of {cfg.rollout.every_n_steps} steps, "
             f"{cfg.rollout.samples_per_prompt} samples per prompt, {cfg.dpo.max_steps} steps |",
             f"| judge | {cfg.judge.kind}" + (f" (`{cfg.judge.model}`)" if cfg.judge.model else "")
             + " |",
             f"| data | `{cfg.data.train_pool}` |"]
    eval_file = run.run_dir / "eval.json"
    if eval_file.is_file():
        ev = json.loads(eval_file.read_text())
        b, a = ev.get("before", {}), ev.get("after", {})
        lines += ["", "## Held-out rubric score", "",
                  "| | before | after |", "|---|---|---|",
                  f"| rubric score | {b.get('rubric_score', float('nan')):.3f} | "
                  f"{a.get('rubric_score', float('nan')):.3f} |",
                  f"| essential pass rate | {b.get('essential_pass_rate', float('nan')):.1%} | "
                  f"{a.get('essential_pass_rate', float('nan')):.1%} |", "",
                  f"{a.get('prompts', '?')} prompts of `{cfg.data.heldout_pool}`, "
                  f"{a.get('samples_per_prompt', '?')} samples each at temperature "
                  f"{a.get('temperature', '?')}."]
    return "\n".join(lines) + "\n"


def _weights_line(run: RunWeights, merged: bool) -> str:
    if run.kind == "model":
        return "full fine-tuning (language model; vision tower frozen)"
    lora = run.cfg.model.lora
    quant = " on a 4-bit (nf4) base" if run.cfg.model.quantization == "nf4" else ""
    what = f"LoRA r={lora.r}, alpha={lora.alpha}{quant}"
    return f"{what}, merged into the base" if merged else f"{what} (adapter only, PEFT)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdpo.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's run.dir")
    parser.add_argument("--out", required=True,
                        help="folder to write: new or empty (made if needed); never the run "
                             "directory or the base model's folder")
    parser.add_argument("--force", action="store_true",
                        help="empty --out first when it holds files")
    parser.add_argument(ALLOW_MISMATCH, action="store_true",
                        help="--merge onto model.path even if its weights are not the base the "
                             "adapter was trained on (rdpo_adapter.json)")
    parser.add_argument("--merge", action="store_true",
                        help="merge the LoRA adapter into the base (a plain checkpoint)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="weights dtype (default: the run's model.dtype)")
    console.add_arguments(parser)
    args = parser.parse_args(argv)
    console.setup(console.verbosity(args))
    try:
        out = export(args.run_dir, args.out, merge=args.merge, dtype=args.dtype,
                     force=args.force, allow_base_mismatch=args.allow_base_mismatch)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("exported %s to %s", args.run_dir, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
