"""Loading a VLM policy: transformers checkpoint + processor, optional 4-bit base, LoRA adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rdpo import families
from rdpo.config import ModelConfig
from rdpo.preflight import hub_errors

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

AUTO = "auto"
"""model.lora.target_modules value: the family's language-model projections (`rdpo.families`)."""


def load_processor(path: str):
    from transformers import AutoProcessor

    with hub_errors("model.path", path):  # a Hub id that cannot be downloaded: one clear error
        processor = AutoProcessor.from_pretrained(path)
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_base(cfg: ModelConfig):
    """The transformers VLM (frozen), 4-bit when ``cfg.quantization == 'nf4'``."""
    from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

    kwargs = {"dtype": DTYPES[cfg.dtype]}
    if cfg.quantization == "nf4":
        with hub_errors("model.path", cfg.path):
            config = AutoConfig.from_pretrained(cfg.path)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[cfg.dtype],
            # Vision tower and projector stay unquantised: small, and accuracy-sensitive.
            llm_int8_skip_modules=families.nf4_skip(config),
            # DeepSpeed ZeRO-3 (and FSDP) partition parameters by dtype: 4-bit weights stored in
            # the compute dtype can be sharded with the rest; uint8 (the default) cannot.
            **({"bnb_4bit_quant_storage": DTYPES[cfg.dtype]} if cfg.dtype != "float32" else {}),
        )
    with hub_errors("model.path", cfg.path):
        model = AutoModelForImageTextToText.from_pretrained(cfg.path, **kwargs)
    model.requires_grad_(False)
    if cfg.quantization == "nf4":
        # On AVX512-BF16 CPUs, bitsandbytes (0.50) repacks a 4-bit weight into an inference-only
        # layout the first time it runs in eval mode, and never packs it back: the next training
        # step then fails inside matmul_4bit. Rounds alternate sampling (eval) and training, so
        # the repacking is switched off.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def lora_target(model, cfg: ModelConfig) -> str:
    """The LoRA target regex: ``cfg.lora.target_modules``, or the family's with ``auto``."""
    if cfg.lora.target_modules != AUTO:
        return cfg.lora.target_modules
    return families.lora_target(model)


def checkpoint_language_model(model, mode: bool | str = True) -> None:
    """Gradient checkpointing of the language model's layers only (non-reentrant: no input needs
    to require grad), every layer's activations recomputed (``True``) or only the cheap ones
    (``"selective"``, `rdpo.engine.recompute`). The vision tower is frozen and builds no graph; with the
    vision cache the steps do not even run it, so checkpointing it would only cost."""
    trunk = getattr(model, "model", None)
    target = trunk.get_decoder() if hasattr(trunk, "get_decoder") else model
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        from rdpo.engine.recompute import selective_checkpoint_kwargs

        kwargs.update(selective_checkpoint_kwargs())
    target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def add_lora(model, cfg: ModelConfig):
    """Wrap `model` in a PEFT LoRA adapter on the modules matching ``cfg.lora.target_modules``
    (``auto``: the family's language model, `rdpo.families`)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target(model, cfg),
        bias="none",
    )
    peft_model = get_peft_model(model, lora)
    # After wrapping: PEFT, seeing a checkpointed model, would make every embedding output of
    # the whole VLM require grad, the vision tower's patch embedding included, and the steps
    # would back-propagate through the frozen tower.
    if cfg.gradient_checkpointing:
        checkpoint_language_model(model, cfg.gradient_checkpointing)
    return peft_model


def unfreeze_language_model(model):
    """Full fine-tuning: every weight of the language model and output layer trains; the
    vision tower stays frozen."""
    family = families.family_of(model)
    part = f".{family.language_model if family else 'language_model'}."
    for name, p in model.named_parameters():
        p.requires_grad_(part in f".{name}" or name.startswith("lm_head"))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__}: no {part.strip('.')} parameters to train")
    return model


# Attributes that hold a dropout probability used functionally (e.g. an attention kernel's
# dropout_p) rather than through an nn.Dropout module.
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "hidden_dropout",
                  "activation_dropout", "dropout_rate")


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn every dropout of `model` off (nn.Dropout modules, LoRA's included, and the
    probabilities attention layers read as attributes); returns how many were on.

    DPO compares the policy's log-probs with reference log-probs computed in eval mode, and
    rollouts sample in eval mode: with dropout on in the training step, the step trains a
    different function than the one that sampled and the one it is compared with.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p:
            module.p = 0.0
            changed += 1
        for attr in _DROPOUT_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, float) and value > 0:
                setattr(module, attr, 0.0)
                changed += 1
    return changed


def load_policy(cfg: ModelConfig):
    """(policy, processor) for a model config: PEFT-wrapped for LoRA, the plain model for full
    fine-tuning."""
    processor = load_processor(cfg.path)
    if cfg.finetune == "full":
        model = unfreeze_language_model(load_base(cfg))
        if cfg.gradient_checkpointing:
            checkpoint_language_model(model, cfg.gradient_checkpointing)
        _ready_to_train(model, cfg)
        log.info("policy %s: %d trainable parameters (full fine-tuning)", cfg.path,
                 sum(p.numel() for p in model.parameters() if p.requires_grad))
        return model, processor
    base = load_base(cfg)
    target = lora_target(base, cfg)
    model = add_lora(base, cfg)
    _ready_to_train(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"model.lora.target_modules={cfg.lora.target_modules!r} ({target!r}) "
                         f"matches no module of {cfg.path}")
    log.info("policy %s: %d trainable LoRA parameters", cfg.path, trainable)
    return model, processor


def _ready_to_train(model, cfg: ModelConfig) -> None:
    """Train mode, and dropout as model.disable_dropout says."""
    # The policy is built to train: train mode throughout (from_pretrained leaves eval mode,
    # which Lightning warns about); sampling and the reference pass switch to eval themselves.
    model.train()
    if cfg.disable_dropout:
        n = disable_dropout(model)
        if n:
            log.info("dropout off in %d places (model.disable_dropout=true)", n)
    elif any(isinstance(m, torch.nn.Dropout) and m.p for m in model.modules()):
        log.warning("model.disable_dropout=false: the training steps run with dropout, the "
                    "reference pass and the rollouts without; a round's first step is not at ln 2")


# -- the base an adapter belongs to (rdpo_adapter.json; checked by rdpo.tools.export.check_base) --

ADAPTER_INFO = "rdpo_adapter.json"
"""Beside a LoRA adapter's files: the base it was trained on (`base_record`)."""


def base_weights(model) -> dict:
    """The base's own floating-point weights, by their name in the base checkpoint: PEFT's
    wrapper names undone, LoRA weights and 4-bit (bitsandbytes) weights left out, so a policy
    in training, a PEFT model loaded for inference and the plain base name them alike."""
    weights = {}
    for name, p in model.named_parameters():
        if "lora_" in name or not p.is_floating_point() or hasattr(p, "quant_state"):
            continue
        weights[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = p
    return weights


class NamedWeights:
    """Named tensors as `base_fingerprint` reads a model (``named_parameters``); detached, so
    it takes them all as frozen."""

    def __init__(self, weights: dict, names: list[str]):
        self.pairs = [(n, weights[n].detach()) for n in names]

    def named_parameters(self):
        return iter(self.pairs)


def base_record(model, base_path: str) -> dict:
    """What ``rdpo_adapter.json`` says of `model`'s base: its path and
    `rdpo.callbacks.checkpoint.base_fingerprint` of up to 8 of its weights, first and last by
    name, with their names. A check hashes the same weights, so the record holds whatever the
    check loads the base as (4-bit in training, full precision for a merge, another dtype)."""
    from rdpo.callbacks.checkpoint import base_fingerprint

    weights = base_weights(model)
    names = sorted(weights)
    picked = names[:4] + names[-4:] if len(names) > 8 else names
    return {"base": str(base_path), "base_fingerprint": base_fingerprint(NamedWeights(weights, picked)),
            "base_weights": picked}


def write_adapter_info(adapter_dir: str | Path, record: dict) -> None:
    """Write `record` (`base_record`) beside a saved adapter."""
    (Path(adapter_dir) / ADAPTER_INFO).write_text(json.dumps(record, indent=2) + "\n")
