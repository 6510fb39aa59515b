"""What differs between VLM families, written down once per family.

Generic code reads what transformers exposes (the processor's image and video tokens, the
tokenizer's end of sequence, the generation config's end ids); what it cannot read is here, one
`Family` per architecture: the chat template's end-of-turn token, the vision special tokens a
sampled answer must never contain, where the language model lives (the LoRA target regex and
the modules kept out of 4-bit quantisation), and how a packed pair ``[prompt, chosen,
rejected]`` gets its positions, or why it cannot be packed.

A checkpoint's family is found from its config's ``model_type`` (`family_of`), a processor's
from its class name (`processor_family`); an unknown one gets generic answers and no packing.
This module imports no torch and no transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Projections of a decoder layer (attention and gated MLP), the usual LoRA targets.
_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"

# Position schemes of a packed pair (`rdpo.engine.packing`).
ROPE_INDEX = "rope_index"
"""Multimodal rotary ids from the model's own ``get_rope_index`` (Qwen's 3-D M-RoPE)."""
PLAIN = "plain"
"""1-D positions: prompt and chosen count on from 0, rejected restarts right after the prompt."""


@dataclass(frozen=True)
class Family:
    """One VLM architecture, as far as rdpo needs to know it."""

    name: str
    model_types: tuple[str, ...]
    """``config.model_type`` of checkpoints of this family."""
    processors: tuple[str, ...]
    """Processor class names of this family."""
    end_of_turn: str
    """The token the chat template closes an assistant turn with."""
    vision_tokens: tuple[str, ...]
    """Special tokens that open, fill or close an image or video; suppressed while sampling
    (besides those the processor names), since a sampled one would be read as an image."""
    language_model: str
    """Name of the language model's module (a path component), for the LoRA regex."""
    vision_modules: tuple[str, ...]
    """Module name prefixes of the vision tower and projector: never quantised to 4 bits
    (small, and accuracy-sensitive), never LoRA targets."""
    positions: str | None
    """How a packed pair gets its position ids: `ROPE_INDEX`, `PLAIN`, or None (no packing)."""
    no_packing: str | None = None
    """Why a pair of this family cannot be packed (positions None)."""
    image_blocks: str | None = None
    """Token field whose runs of 1 are image blocks that attend bidirectionally (Gemma 3's
    ``token_type_ids``); the packed mask opens those blocks as the model's own mask does."""
    video: bool = False
    """The processor takes videos (a record's ``video`` frames)."""
    pixel_bounds: bool = False
    """The image processor's size is a pixel budget (``shortest_edge``/``longest_edge`` = min/max
    pixels, Qwen's smart resize), which evaluators pass as ``min_pixels``/``max_pixels``."""
    lmms_eval: str | None = None
    """lmms-eval's model class (``--model``) for a transformers folder of this family
    (`rdpo.tools.handoff`)."""
    vlmevalkit: str | None = None
    """VLMEvalKit's model class (``vlmeval.vlm``) for such a folder."""

    @property
    def lora_target(self) -> str:
        """Regex (PEFT, full match) over module names: the language model's projections only."""
        return rf".*{re.escape(self.language_model)}.*\.({_PROJECTIONS})"

    @property
    def nf4_skip(self) -> list[str]:
        """bitsandbytes' ``llm_int8_skip_modules``: a list replaces the default skip list, so
        lm_head is named again."""
        return [*self.vision_modules, "lm_head"]


_QWEN = dict(end_of_turn="<|im_end|>", language_model="language_model",
             vision_tokens=("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
             vision_modules=("model.visual", "visual"), positions=ROPE_INDEX, video=True,
             pixel_bounds=True)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2_vl", ("qwen2_vl",), ("Qwen2VLProcessor",), lmms_eval="qwen2_vl",
           vlmevalkit="Qwen2VLChat", **_QWEN),
    Family("qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLProcessor",), lmms_eval="qwen2_5_vl",
           vlmevalkit="Qwen2VLChat", **_QWEN),
    Family("qwen3_vl", ("qwen3_vl",), ("Qwen3VLProcessor",), lmms_eval="qwen3_vl",
           vlmevalkit="Qwen3VLChat", **_QWEN),
    # LLaVA-OneVision: a Qwen2 language model (1-D rotary positions) after a SigLIP tower.
    Family("llava_onevision", ("llava_onevision",), ("LlavaOnevisionProcessor",),
           end_of_turn="<|im_end|>", vision_tokens=("<image>", "<video>"),
           language_model="language_model",
           vision_modules=("model.vision_tower", "model.multi_modal_projector"), positions=PLAIN,
           lmms_eval="llava_hf", vlmevalkit="LLaVA_OneVision_HF"),
    # Idefics3 (SmolVLM's architecture): a Llama language model called text_model.
    Family("idefics3", ("idefics3", "smolvlm"), ("Idefics3Processor", "SmolVLMProcessor"),
           end_of_turn="<end_of_utterance>",
           vision_tokens=("<image>", "<fake_token_around_image>", "<global-img>"),
           language_model="text_model", vision_modules=("model.vision_model", "model.connector"),
           positions=PLAIN, vlmevalkit="SmolVLM"),  # lmms-eval: idefics2 loads Idefics2 only
    # Gemma 3: image tokens attend to their whole image (both directions); sliding-window layers.
    Family("gemma3", ("gemma3",), ("Gemma3Processor",), end_of_turn="<end_of_turn>",
           vision_tokens=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
           language_model="language_model",
           vision_modules=("model.vision_tower", "model.multi_modal_projector"), positions=PLAIN,
           image_blocks="token_type_ids", lmms_eval="gemma3", vlmevalkit="Gemma3"),
    # InternVL (transformers-native): a Qwen2 language model after InternViT.
    Family("internvl", ("internvl",), ("InternVLProcessor",), end_of_turn="<|im_end|>",
           vision_tokens=("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
           language_model="language_model",
           vision_modules=("model.vision_tower", "model.multi_modal_projector"), positions=PLAIN,
           lmms_eval="internvl_hf"),  # VLMEvalKit's InternVLChat loads the remote-code format
    # Llama 3.2 Vision: text tokens read the image through cross-attention layers, gated by a
    # per-token cross_attention_mask whose rows are independent: a packed pair's answer tokens
    # get the prompt's last row (rdpo.engine.packing), its self-attention layers the 4-D mask. Rows
    # blind to every image attend to their own prompt's image slots only (rdpo.engine.image_slots).
    Family("mllama", ("mllama",), ("MllamaProcessor",), end_of_turn="<|eot_id|>",
           vision_tokens=("<|image|>",), language_model="language_model",
           vision_modules=("model.vision_model", "model.multi_modal_projector"), positions=PLAIN,
           lmms_eval="llama_vision", vlmevalkit="llama_vision"),
)}

# Processor and tokenizer attributes that name image/video special tokens, read generically.
_TOKEN_ATTRS = ("image_token", "video_token", "boi_token", "eoi_token", "fake_image_token",
                "global_image_tag", "start_image_token", "end_image_token", "vision_bos_token",
                "vision_eos_token")


def unwrap(model):
    """The transformers ``...ForConditionalGeneration`` under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(model_or_config) -> Family | None:
    """The family of a model (PEFT-wrapped or not) or config, by ``model_type``; None if unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def processor_family(processor) -> Family | None:
    """The family of a processor, by class name; None if unknown."""
    name = type(processor).__name__
    return next((f for f in FAMILIES.values() if name in f.processors), None)


def end_of_turn_id(processor) -> int:
    """Id of the token that ends an assistant turn: the family's, else end of sequence."""
    tok = processor.tokenizer
    family = processor_family(processor)
    if family is not None and family.end_of_turn in tok.get_vocab():
        return tok.convert_tokens_to_ids(family.end_of_turn)
    return tok.eos_token_id


def vision_token_ids(processor) -> list[int]:
    """Ids of every image/video special token: the ones processor and tokenizer name, and the
    family's list. Sampling one would start an image inside an answer."""
    tok = processor.tokenizer
    names = {getattr(obj, a, None) for obj in (processor, tok) for a in _TOKEN_ATTRS}
    family = processor_family(processor)
    names |= set(family.vision_tokens if family else ())
    vocab = tok.get_vocab()
    return sorted({vocab[n] for n in names if isinstance(n, str) and n in vocab})


def lora_target(model_or_config) -> str:
    """The LoRA target regex of a model's family (the language model's projections)."""
    family = family_of(model_or_config)
    if family is None:
        raise ValueError(f"model_type {_model_type(model_or_config)!r} is not a known family "
                         f"({', '.join(FAMILIES)}); set model.lora.target_modules to a regex")
    return family.lora_target


def nf4_skip(config) -> list[str]:
    """bitsandbytes skip list of a checkpoint's family (unknown: no skip list but lm_head)."""
    family = family_of(config)
    return family.nf4_skip if family else ["lm_head"]


def _model_type(model_or_config) -> str | None:
    return getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
