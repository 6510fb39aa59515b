"""Tiny random-init VLMs of the non-Qwen families, built offline with their real processors.

Like ``rdpo.demo.tiny`` for Qwen: a BPE tokenizer trained on a small corpus plus the family's
special tokens, a 2-layer model from the family's transformers config, the family's real
processor and image processor (configured for tens of image tokens per 112×56 toy image, no
tiling), and its real chat template (``rdpo.demo.tiny_templates``). The saved directory loads
through ``AutoProcessor`` and ``AutoModelForImageTextToText`` like a hub checkpoint.

Facts the family layer needs (transformers 5.24; measured on these builds by
tests/test_tiny_families.py; "eot" is the end-of-turn token, saved as the tokenizer's eos):

FAMILY_FACTS_TABLE
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rdpo.demo.tiny_templates import TEMPLATES

# Byte-level pre-tokenizer split (Qwen2 / Llama 3 style), so the trained BPE works in the
# byte-level tokenizer classes these families ship (Qwen2Tokenizer, GPT2Tokenizer, Llama 3's).
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# family -> the tokenizer: class, special tokens (in id order, first ids), bos, eos (= the
# end-of-turn token), pad, unk, and the named tokens the processor reads from the tokenizer.
TOKENS = {
    "llava_onevision": dict(
        cls="Qwen2Tokenizer", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                                        "<video>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<|endoftext|>",
        named={"image_token": "<image>", "video_token": "<video>"}),
    "idefics3": dict(
        # SmolVLM's SmolLM2 tokenizer: <|im_start|> is its bos (the template writes it).
        cls="GPT2Tokenizer", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                       "<fake_token_around_image>", "<image>",
                                       "<end_of_utterance>", "<global-img>",
                                       *(f"<row_{r}_col_{c}>" for r in range(1, 7)
                                         for c in range(1, 7))),
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>", unk="<|endoftext|>",
        named={}),
    "gemma3": dict(
        cls="GemmaTokenizer", specials=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
                                        "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                                        "<end_of_image>", "<image_soft_token>"),
        bos="<bos>", eos="<end_of_turn>", pad="<pad>", unk="<unk>",
        named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
               "eoi_token": "<end_of_image>"}),
    "internvl": dict(
        cls="Qwen2Tokenizer", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>",
                                        "</img>", "<IMG_CONTEXT>", "<video>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<|endoftext|>",
        named={"start_image_token": "<img>", "end_image_token": "</img>",
               "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}),
    "mllama": dict(
        cls="PreTrainedTokenizerFast",
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        unk=None, named={}),
}


def train_tokenizer(corpus: list[str], family: str, vocab_size: int = 512):
    """The family's tokenizer class, trained as a BPE on `corpus` with its special tokens."""
    from tokenizers import AddedToken

    spec = TOKENS[family]
    # The chat templates' role words and newlines, often enough to become whole tokens (a
    # prompt's scaffold is a few tokens, as with a real vocabulary, not one per letter).
    scaffold = ["user\n", "assistant\n", "model\n", "system\n", "User:", "Assistant:"] * 20
    tokenizer = _train([*corpus, *scaffold], spec, vocab_size)
    # Every chat/vision marker is one special token (never split by the BPE, skipped when
    # decoding with skip_special_tokens), as in the family's real tokenizer.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]],
                         special_tokens=True)
    return tokenizer


def _train(corpus, spec, vocab_size):
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if spec["cls"] == "GemmaTokenizer":
        return _gemma_tokenizer(corpus, spec, vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(spec["specials"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    kw = dict(eos_token=spec["eos"], pad_token=spec["pad"], bos_token=spec["bos"],
              extra_special_tokens=spec["named"])
    if spec["unk"]:
        kw["unk_token"] = spec["unk"]
    if spec["cls"] == "PreTrainedTokenizerFast":
        # Llama 3's tokenizer prepends <|begin_of_text|> itself, and its template writes it too:
        # a second one unless the caller tokenizes with add_special_tokens=False.
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, add_bos_token=True, **kw)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return getattr(transformers, spec["cls"])(vocab=state["vocab"], merges=merges, **kw)


def _gemma_tokenizer(corpus, spec, vocab_size):
    """A SentencePiece-style BPE ("▁" for spaces, byte fallback) in `GemmaTokenizer`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # pieces never span words during training ("▁the", not "e▁the▁"), as SentencePiece's
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(spec["specials"]),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = dict(state["vocab"])
    for b in range(256):  # byte-fallback pieces, so an unseen character is never <unk>
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, bos_token=spec["bos"], eos_token=spec["eos"],
                          pad_token=spec["pad"], unk_token=spec["unk"], mask_token="<mask>",
                          extra_special_tokens=spec["named"], add_bos_token=True)


def _text_config(tokenizer, hidden, layers, *, head_dim=16, intermediate=None, vocab_size=None,
                 kv_heads=None, **_):
    """The language model's shape: `hidden`/`head_dim` heads, 2 kv heads, untied embeddings."""
    return dict(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=kv_heads or 2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _vision(hidden, layers, shape):
    """Width and depth of the vision tower (`vision_hidden`, `vision_layers` in `shape`)."""
    return dict(hidden_size=shape.get("vision_hidden") or hidden,
                intermediate_size=2 * (shape.get("vision_hidden") or hidden),
                num_hidden_layers=shape.get("vision_layers") or layers)


def _llava_onevision(tokenizer, hidden, layers, shape):
    """SigLIP 56×56 / patch 14 (16 base tokens) + one 56×56 anyres tile, unpadded to the
    image's 2:1 aspect with a newline per row: 16 + 2×4 + 2 = 26 `<image>` tokens per image."""
    import transformers

    side, patch = 56, 14
    config = transformers.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text_config(tokenizer, hidden, layers, **shape)),
        vision_config=dict(model_type="siglip_vision_model", image_size=side, patch_size=patch,
                           num_attention_heads=4, vision_use_head=False,
                           **_vision(hidden, layers, shape)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[side, side]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    image_processor = transformers.LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_grid_pinpoints=[[side, side]])
    video_processor = transformers.LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=TEMPLATES["llava_onevision"])
    return config, processor


def _idefics3(tokenizer, hidden, layers, shape):
    """SmolVLM's architecture: a SigLIP-style tower on the whole image (no splitting) resized to
    112 px on its longest edge, patch 14 → 8×8 patches, pixel-shuffled by 2 → 16 `<image>`
    tokens, written as <fake_token_around_image><global-img><image>*16<fake_token_around_image>."""
    import transformers

    side, patch, scale = 112, 14, 2
    config = transformers.Idefics3Config(
        text_config=dict(model_type="llama", **_text_config(tokenizer, hidden, layers, **shape)),
        vision_config=dict(image_size=side, patch_size=patch, num_attention_heads=4,
                           **_vision(hidden, layers, shape)),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    image_processor = transformers.Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side})
    processor = transformers.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer,
        image_seq_len=(side // patch) ** 2 // scale**2, chat_template=TEMPLATES["idefics3"])
    return config, processor


def _gemma3(tokenizer, hidden, layers, shape):
    """SigLIP 64×64 / patch 8 (8×8 patches) average-pooled 2×2 → 16 `<image_soft_token>` per
    image, written as "\n\n<start_of_image><image_soft_token>*16<end_of_image>\n\n"; no
    pan-and-scan. One sliding-window and one global layer, as Gemma 3 interleaves them."""
    import transformers

    side, patch, tokens = 64, 8, 16
    text = _text_config(tokenizer, hidden, layers, **shape)
    text.update(query_pre_attn_scalar=text["head_dim"], sliding_window=512,
                layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                + ["sliding_attention"] * (layers % 2))
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", image_size=side, patch_size=patch,
                           num_attention_heads=4, vision_use_head=False,
                           **_vision(hidden, layers, shape)),
        mm_tokens_per_image=tokens,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        tie_word_embeddings=False,
    )
    image_processor = transformers.Gemma3ImageProcessor(
        size={"height": side, "width": side}, do_pan_and_scan=False)
    processor = transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens,
        chat_template=TEMPLATES["gemma3"])
    return config, processor


def _internvl(tokenizer, hidden, layers, shape):
    """InternViT 64×64 / patch 8 (8×8 patches, CLS dropped), pixel-shuffled by 0.5 → 16
    `<IMG_CONTEXT>` per image, written as "<img><IMG_CONTEXT>*16</img>"; one tile, no thumbnail
    (max_patches=1)."""
    import transformers

    side, patch, ratio = 64, 8, 0.5
    tokens = int((side // patch) ** 2 * ratio**2)
    config = transformers.InternVLConfig(
        text_config=dict(model_type="qwen2", **_text_config(tokenizer, hidden, layers, **shape)),
        vision_config=dict(image_size=side, patch_size=patch, num_attention_heads=4,
                           **_vision(hidden, layers, shape)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens,
        downsample_ratio=ratio,
        tie_word_embeddings=False,
    )
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": side, "width": side}, crop_to_patches=False, min_patches=1, max_patches=1)
    video_processor = transformers.InternVLVideoProcessor(size={"height": side, "width": side})
    processor = transformers.InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        image_seq_length=tokens, chat_template=TEMPLATES["internvl"])
    return config, processor


def _mllama(tokenizer, hidden, layers, shape):
    """Llama 3.2 Vision: one `<|image|>` token per image in the text; the language model reads
    the image through gated cross-attention layers (one after the first self-attention layer,
    so `layers` self-attention layers + 1 cross-attention layer). Vision: one 56×56 tile
    (max_image_tiles=1), patch 14 → 16 patches + CLS, padded to 24 rows per tile."""
    import transformers

    side, patch = 56, 14
    vision = _vision(hidden, layers, shape)
    text = _text_config(tokenizer, hidden, layers, **shape)
    text.update(num_hidden_layers=layers + 1, cross_attention_layers=[1])
    del text["head_dim"]  # Mllama's text model derives it: hidden // heads
    config = transformers.MllamaConfig(
        text_config=text,
        vision_config=dict(image_size=side, patch_size=patch, attention_heads=4,
                           hidden_size=vision["hidden_size"],
                           intermediate_size=vision["intermediate_size"],
                           num_hidden_layers=vision["num_hidden_layers"], num_global_layers=1,
                           intermediate_layers_indices=[0],
                           vision_output_dim=2 * vision["hidden_size"], max_num_tiles=1,
                           supported_aspect_ratios=[[1, 1]]),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
        tie_word_embeddings=False,
    )
    image_processor = transformers.MllamaImageProcessor(
        size={"height": side, "width": side}, max_image_tiles=1)
    processor = transformers.MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATES["mllama"])
    return config, processor


_BUILDERS = {
    "llava_onevision": _llava_onevision,
    "idefics3": _idefics3,
    "gemma3": _gemma3,
    "internvl": _internvl,
    "mllama": _mllama,
}
FAMILIES = tuple(_BUILDERS)


def build_tiny_family(
    out_dir: str | Path,
    corpus: list[str],
    *,
    family: str,
    hidden: int = 64,
    layers: int = 2,
    image_pixels: int = 112 * 56,
    vocab_size: int = 512,
    seed: int = 0,
    head_dim: int = 16,
    **shape,
) -> Path:
    """Build a random-init tiny VLM of `family` with its real processor; save both in `out_dir`.

    `image_pixels` is accepted for `build_tiny_vlm`'s signature and unused: each family resizes
    every image to its own fixed tiny resolution (see the table above). `shape` passes through
    to the configs: intermediate, vocab_size (of the model), vision_hidden, vision_layers,
    kv_heads (default 2).
    """
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if family not in _BUILDERS:
        raise ValueError(f"model family {family!r} is not one of {tuple(_BUILDERS)}")
    del image_pixels
    tokenizer = train_tokenizer(corpus, family, vocab_size=vocab_size)
    config, processor = _BUILDERS[family](tokenizer, hidden, layers, {"head_dim": head_dim, **shape})
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    if family == "gemma3":
        # Gemma 3 initialises its image projection to zeros (a checkpoint overwrites it): at
        # random init every image would reach the language model as the same zero vector.
        projector = model.model.multi_modal_projector
        torch.nn.init.normal_(projector.mm_input_projection_weight, std=config.initializer_range)
    if family == "mllama":
        # Llama 3.2 Vision's cross-attention gates start at 0 (tanh(0) = 0: the image is shut
        # out until training opens them); a checkpoint's gates are open, so open these too.
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                torch.nn.init.constant_(param, 1.0)
    # generate() stops at the end-of-turn token and pads with the pad token.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
