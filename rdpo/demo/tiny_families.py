"""Tiny random-init VLMs of the non-Qwen families, built offline with their real processors.

Like ``rdpo.demo.tiny`` for Qwen: a BPE tokenizer trained on a small corpus plus the family's
special tokens, a 2-layer model from the family's transformers config, the family's real
processor and image processor (configured for tens of image tokens per 112×56 toy image, no
tiling), and its real chat template (``rdpo.demo.tiny_templates``). The saved directory loads
through ``AutoProcessor`` and ``AutoModelForImageTextToText`` like a hub checkpoint.

Facts the family layer needs (transformers 5.24; checked on these builds by
tests/test_tiny_families.py). Token ids are those of every build (specials take the first
ids). "eot" is the end-of-turn token, saved as the tokenizer's eos and generation eos.
"LM / vision / projector" are module paths under the ...ForConditionalGeneration (the LoRA
regex anchors on the LM path; the quantisation skip list holds vision, projector, lm_head).
"Packs" means a custom 4-D bool mask [B, 1, T, T] plus 1-D position_ids [B, T] reproduce
separate forwards (chosen and rejected behind one prompt+image encoding); every family uses
1-D rope, none Qwen's 3-D mrope.

llava_onevision  LlavaOnevisionProcessor, LlavaOnevisionImageProcessor, Qwen2Tokenizer.
    eot <|im_end|> 2, pad <|endoftext|> 0, no bos. Template: "<image>\n" per image, all
    images first in the turn. Text: <image> (3) ×26 in a one-image prompt (16 base + 8
    anyres tile + 2 row newlines), ×17 per image in a multi-image prompt (base + 1 newline).
    LM model.language_model (Qwen2) / vision model.vision_tower (SigLIP) / projector
    model.multi_modal_projector (+ the parameter model.image_newline). Inputs: pixel_values
    [n_images, 2 or 1 patches, 3, 56, 56], image_sizes, batch_num_images. Packs: yes.
idefics3  Idefics3Processor, Idefics3ImageProcessor, GPT2Tokenizer (SmolVLM-Instruct).
    eot <end_of_utterance> 5, bos <|im_start|> 1 (written by the template only), pad
    <|im_end|> 2. Template: "User:<image>...<end_of_utterance>\nAssistant:". Text per image:
    <fake_token_around_image> (3) <global-img> (6) <image> (4) ×16 <fake_token_around_image>.
    LM model.text_model (Llama) / vision model.vision_model / projector model.connector.
    Inputs: pixel_values [B, max_images, 3, 112, 112] + pixel_attention_mask (padded per
    sample: batch images per row). Packs: yes.
gemma3  Gemma3Processor, Gemma3ImageProcessor, GemmaTokenizer. eot <end_of_turn> 6, bos
    <bos> 2, pad <pad> 0. Template writes <bos> and the tokenizer adds one too: tokenize
    rendered text with add_special_tokens=False. Template: "<start_of_image>" per image,
    expanded to "\n\n<start_of_image> (7) <image_soft_token> (9) ×16 <end_of_image> (8)\n\n".
    LM model.language_model / vision model.vision_tower (SigLIP) / projector
    model.multi_modal_projector (a bare weight mm_input_projection_weight + norm, no Linear).
    Inputs: pixel_values [n_images, 3, 64, 64], token_type_ids (1 on image soft tokens): the
    model makes each image's tokens attend to each other bidirectionally. A custom 4-D mask
    replaces that: packs only when the mask carries the image blocks (then exact); a plain
    causal 4-D mask (or no token_type_ids) changes the logits. The mask may also be a dict
    {"full_attention": m, "sliding_attention": m}. Layers: sliding (window 512) + global.
internvl  InternVLProcessor, GotOcr2ImageProcessor, Qwen2Tokenizer (InternVL3-hf). eot
    <|im_end|> 2, pad <|endoftext|> 0, no bos. Template: "<IMG_CONTEXT>\n" per image, expanded
    to <img> (3) <IMG_CONTEXT> (5) ×16 </img> (4). LM model.language_model (Qwen2) / vision
    model.vision_tower (its attention also has q_proj/k_proj/v_proj) / projector
    model.multi_modal_projector. Inputs: pixel_values [n_tiles, 3, 64, 64] (one tile per
    image here). Packs: yes.
mllama  MllamaProcessor, MllamaImageProcessor, PreTrainedTokenizerFast (Llama 3). eot
    <|eot_id|> 6, bos <|begin_of_text|> 0 (template writes it, tokenizer adds one too), pad
    <|finetune_right_pad_id|> 2. Template: "<|image|>" (8) per image, ONE text token per
    image; a prompt without images gets a system header with today's date. The image enters
    through cross-attention layers (model.language_model.layers.N.cross_attn, gated), fed by
    pixel_values [B, n_images, tiles, 3, 56, 56], aspect_ratio_ids [B, n_images],
    aspect_ratio_mask [B, n_images, tiles] and cross_attention_mask [B, T, n_images, tiles]
    (1 from each image's <|image|> token on; extend its last row over completion tokens).
    LM model.language_model (self_attn and cross_attn layers) / vision model.vision_model /
    projector model.multi_modal_projector (a single Linear: keep it out of quantisation).
    Packs: yes (4-D self-attention mask + position_ids; cross_attention_mask per token).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rdpo.demo.tiny_templates import TEMPLATES
from rdpo.demo.tiny_tokenizers import train_tokenizer


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
    tokenizer_vocab: int = 512,
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
    tokenizer = train_tokenizer(corpus, family, vocab_size=tokenizer_vocab)
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
