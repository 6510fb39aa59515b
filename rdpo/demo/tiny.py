"""Tiny VLMs built offline from transformers configs, with a real processor.

The quickstart and the tests need a VLM of a real architecture without a hub download: this
module trains a byte-level BPE tokenizer on a small corpus (plus the Qwen special tokens),
builds a 2-layer model from a Qwen2-VL / Qwen2.5-VL / Qwen3-VL config and saves model,
tokenizer and processor with ``save_pretrained``, so they load back through ``AutoProcessor``
and ``AutoModelForImageTextToText`` exactly as a real checkpoint does. The other families
(LLaVA-OneVision, Idefics3, Gemma 3, InternVL, Mllama) are built by `rdpo.demo.tiny_families`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen's chat and vision special tokens; the processor looks them up by text.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template without the default system prompt (it would only lengthen every
# sequence of the tiny model). Images become <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split, so the trained BPE is a drop-in `Qwen2Tokenizer`.
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES = QWEN_FAMILIES + ("llava_onevision", "idefics3", "gemma3", "internvl", "mllama")
"""Every toy.family; the non-Qwen ones come from `rdpo.demo.tiny_families`."""
# Pixel budget of the toy's images per family: Qwen3-VL's 16-px patches need 128×64 for the
# same 8 image tokens that 112×56 gives with 14-px patches. tiny_families resizes on its own.
TOY_IMAGE_PIXELS = {"qwen3_vl": 128 * 64}
_PROCESSORS = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}


def train_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE `Qwen2Tokenizer` trained on `corpus`, with Qwen's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def _model_config(family: str, tokenizer, hidden: int, layers: int, *, head_dim: int = 32,
                  intermediate: int | None = None, vocab_size: int | None = None,
                  vision_hidden: int | None = None, vision_layers: int | None = None,
                  kv_heads: int | None = None):
    from transformers import AutoConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # head_dim 32 by default: vLLM's CPU attention backend serves head sizes 32, 64, 80, ...
    # only, and the tests serve these models. The quickstart's toy passes toy.head_dim (16).
    heads = hidden // head_dim
    text = dict(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    # mrope sections split head_dim/2 rotary frequencies over (temporal, height, width).
    # (Qwen's own split is 2:3:3 of head_dim/2: [16, 24, 24] for head_dim 128.)
    quarter = head_dim // 8
    mrope = {"rope_type": "default", "mrope_section": [quarter, 3 * quarter // 2, 3 * quarter // 2],
             "rope_theta": 10000.0}
    vision = dict(depth=vision_layers or layers, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_hidden or hidden, hidden_size=hidden, mlp_ratio=2)
        text["rope_parameters"] = mrope
    elif family == "qwen2_5_vl":
        vision.update(hidden_size=hidden, out_hidden_size=hidden, intermediate_size=2 * hidden,
                      fullatt_block_indexes=[layers - 1], window_size=56)
        text["rope_parameters"] = mrope
    elif family == "qwen3_vl":
        # One deepstack layer, as every real Qwen3-VL has: generate() with K samples per prompt
        # (transformers 5.24) indexes the deepstack features and fails on an empty list.
        vision.update(hidden_size=hidden, out_hidden_size=hidden, intermediate_size=2 * hidden,
                      patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        text.update(head_dim=head_dim,
                    rope_parameters={**mrope, "mrope_interleaved": True})
    else:
        raise ValueError(f"model family {family!r} is not one of {QWEN_FAMILIES}")
    return AutoConfig.for_model(
        family,
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_vlm(
    out_dir: str | Path,
    corpus: list[str],
    *,
    family: str = "qwen2_vl",
    hidden: int = 64,
    layers: int = 2,
    image_pixels: int = 112 * 56,
    tokenizer_vocab: int = 512,
    seed: int = 0,
    **shape,
) -> Path:
    """Build a random-init tiny VLM with its processor and save both under `out_dir`.

    `image_pixels` pins the image processor's min and max pixel budget, so every toy image keeps
    its size (112×56 → 8 patches wide × 4 high → 8 image tokens after the 2×2 merge).
    `tokenizer_vocab` caps the BPE tokenizer trained on `corpus` (a small corpus stops short of
    it). `shape` passes through to the config (head_dim, intermediate, vocab_size of the model,
    vision_hidden, vision_layers, kv_heads), for realistic shapes such as the benchmark's.
    """
    import transformers
    from transformers import AutoModelForImageTextToText

    if family in FAMILIES and family not in QWEN_FAMILIES:
        from rdpo.demo.tiny_families import build_tiny_family

        return build_tiny_family(out_dir, corpus, family=family, hidden=hidden, layers=layers,
                                 image_pixels=image_pixels, tokenizer_vocab=tokenizer_vocab, seed=seed, **shape)
    tokenizer = train_tokenizer(corpus, vocab_size=tokenizer_vocab)
    config = _model_config(family, tokenizer, hidden, layers, **shape)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    proc_cls, video_cls = _PROCESSORS[family]
    patch = config.vision_config.patch_size
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": image_pixels, "longest_edge": image_pixels},
    )
    # Video frames get the images' pixel budget: a 4-frame toy video is 2 × 8 tokens.
    video_processor = getattr(transformers, video_cls)(
        patch_size=patch, merge_size=2,
        size={"shortest_edge": image_pixels, "longest_edge": image_pixels})
    processor = getattr(transformers, proc_cls)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
