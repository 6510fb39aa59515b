"""The offline tiny builds of the non-Qwen families: real classes, real templates, and a forward
of the processor's whole output through the model."""

import pytest
import torch
from PIL import Image

from rdpo.demo import toy
from rdpo.demo.tiny_families import FAMILIES, build_tiny_family
from rdpo.demo.tiny_templates import TEMPLATES

# family -> processor, image processor and model classes; the end-of-turn token; the
# placeholder the chat template writes per image; the image tokens the processor expands it
# to for a one-image prompt and for each image of a two-image prompt.
EXPECTED = {
    "llava_onevision": dict(
        processor="LlavaOnevisionProcessor", image_processor="LlavaOnevisionImageProcessor",
        model="LlavaOnevisionForConditionalGeneration", eot="<|im_end|>",
        placeholder="<image>\n", image_token="<image>", one=26, each_of_two=17),
    "idefics3": dict(
        processor="Idefics3Processor", image_processor="Idefics3ImageProcessor",
        model="Idefics3ForConditionalGeneration", eot="<end_of_utterance>",
        placeholder="<image>", image_token="<image>", one=16, each_of_two=16),
    "gemma3": dict(
        processor="Gemma3Processor", image_processor="Gemma3ImageProcessor",
        model="Gemma3ForConditionalGeneration", eot="<end_of_turn>",
        placeholder="<start_of_image>", image_token="<image_soft_token>", one=16, each_of_two=16),
    "internvl": dict(
        processor="InternVLProcessor", image_processor="GotOcr2ImageProcessor",
        model="InternVLForConditionalGeneration", eot="<|im_end|>",
        placeholder="<IMG_CONTEXT>\n", image_token="<IMG_CONTEXT>", one=16, each_of_two=16),
    "mllama": dict(
        processor="MllamaProcessor", image_processor="MllamaImageProcessor",
        model="MllamaForConditionalGeneration", eot="<|eot_id|>",
        placeholder="<|image|>", image_token="<|image|>", one=1, each_of_two=1),
}

RED, BLUE = (220, 30, 30), (30, 60, 220)


def _messages(n_images, text="What color is the circle?"):
    return [{"role": "user", "content": [*[{"type": "image"}] * n_images,
                                         {"type": "text", "text": text}]}]


def _images(n, colors=(RED, BLUE)):
    return [Image.new("RGB", (toy.WIDTH, toy.HEIGHT), colors[i % 2]) for i in range(n)]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """(family, processor, model): each family built once per module, loaded back as float32."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family = request.param
    out = build_tiny_family(tmp_path_factory.mktemp(family), toy.corpus(), family=family)
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    return family, processor, model


def _encode(processor, n_images, colors=(RED, BLUE)):
    text = processor.apply_chat_template(_messages(n_images), add_generation_prompt=True,
                                         tokenize=False)
    # the rendered text already holds the bos where the family has one (Gemma 3, Llama 3.2)
    return text, processor(text=[text], images=[_images(n_images, colors)], return_tensors="pt",
                           add_special_tokens=False)


def test_every_family_is_expected():
    assert set(FAMILIES) == set(EXPECTED) == set(TEMPLATES)


def test_unknown_family_raises(tmp_path):
    with pytest.raises(ValueError, match="qwen2_vl"):
        build_tiny_family(tmp_path, ["a b"], family="qwen2_vl")


def test_loads_back_with_the_real_classes(built):
    family, processor, model = built
    want = EXPECTED[family]
    assert type(processor).__name__ == want["processor"]
    assert type(processor.image_processor).__name__.removesuffix("Fast") == want["image_processor"]
    assert type(model).__name__ == want["model"]
    text_cfg = model.config.get_text_config()
    head_dim = getattr(text_cfg, "head_dim", None) or 64 // text_cfg.num_attention_heads
    assert (text_cfg.hidden_size, head_dim, text_cfg.num_key_value_heads) == (64, 16, 2)
    # mllama: 2 self-attention layers + 1 cross-attention layer
    cross = len(getattr(text_cfg, "cross_attention_layers", None) or [])
    assert (text_cfg.num_hidden_layers - cross, cross) == (2, int(family == "mllama"))
    assert text_cfg.vocab_size == len(processor.tokenizer)
    assert processor.chat_template == TEMPLATES[family]


def test_end_of_turn_is_one_token_and_the_eos(built):
    family, processor, model = built
    tok, eot = processor.tokenizer, EXPECTED[family]["eot"]
    assert tok.eos_token == eot
    assert tok(eot, add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    # an assistant turn ends with it
    chat = [*_messages(1), {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    rendered = processor.apply_chat_template(chat, tokenize=False)
    assert "Red." + eot in rendered


@pytest.mark.parametrize("n_images", [1, 2])
def test_template_placeholders_and_forward(built, n_images):
    family, processor, model = built
    want = EXPECTED[family]
    text, inputs = _encode(processor, n_images)
    assert text.count(want["placeholder"]) == n_images
    image_id = processor.tokenizer.convert_tokens_to_ids(want["image_token"])
    per_image = want["one"] if n_images == 1 else want["each_of_two"]
    assert int((inputs["input_ids"] == image_id).sum()) == n_images * per_image
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    # the image reaches the language model: other images change the logits
    _, other = _encode(processor, n_images, colors=(BLUE, RED))
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, logits)


def test_placeholder_count_is_what_the_model_expects(built):
    """One image token too few: the model refuses the batch (it counts its features). Llama 3.2
    Vision instead reads the image through cross_attention_mask: text from each <|image|> on
    sees that image (and every later token), text before it sees none."""
    family, processor, model = built
    if family == "mllama":
        _, inputs = _encode(processor, 2)
        marks = (inputs["input_ids"][0] == processor.image_token_id).nonzero().flatten().tolist()
        mask = inputs["cross_attention_mask"][0, :, :, 0]  # [tokens, images]
        assert len(marks) == mask.shape[1] == 2
        for image, at in enumerate(marks):
            assert mask[:at, image].sum() == 0 and mask[at:, image].all()
        return
    _, inputs = _encode(processor, 1)
    ids = inputs["input_ids"].clone()
    image_id = processor.tokenizer.convert_tokens_to_ids(EXPECTED[family]["image_token"])
    first = int((ids[0] == image_id).nonzero()[0])
    ids[0, first] = processor.tokenizer.pad_token_id
    with pytest.raises(ValueError), torch.no_grad():
        model(**{**inputs, "input_ids": ids})


def test_generate_runs(built):
    family, processor, model = built
    _, inputs = _encode(processor, 1)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :n], inputs["input_ids"])
    assert n < out.shape[1] <= n + 3  # fewer only when it sampled the end of turn


def test_bos_is_written_once_by_the_template(built):
    """Gemma 3 and Llama 3.2 templates write the bos and their tokenizers add one too: rendered
    prompts are tokenized with add_special_tokens=False (as apply_chat_template does)."""
    family, processor, _ = built
    tok = processor.tokenizer
    text = processor.apply_chat_template(_messages(0), add_generation_prompt=True, tokenize=False)
    plain = tok(text, add_special_tokens=False)["input_ids"]
    default = tok(text)["input_ids"]
    if family in ("gemma3", "mllama"):
        assert text.startswith(tok.bos_token) and plain[0] == tok.bos_token_id != plain[1]
        assert default == [tok.bos_token_id, *plain]
    else:
        assert default == plain


def _pack(inputs, prompt_len, a, b):
    """`inputs` extended by answers `a` then `b`; b sees the prompt, not a (rdpo's prefix
    sharing). Returns the packed inputs (4-D bool mask, 1-D positions) and two separate ones."""
    def extend(answers):
        ids = torch.cat([inputs["input_ids"], *answers], 1)
        out = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        extra = ids.shape[1] - prompt_len
        if "token_type_ids" in inputs:
            out["token_type_ids"] = torch.nn.functional.pad(inputs["token_type_ids"], (0, extra))
        if "cross_attention_mask" in inputs:  # later text sees every image, as the last prompt token
            cam = inputs["cross_attention_mask"]
            out["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, extra, -1, -1)], 1)
        return out

    la, lb = a.shape[1], b.shape[1]
    total = prompt_len + la + lb
    allow = torch.tril(torch.ones(total, total, dtype=torch.bool))
    allow[prompt_len + la:, prompt_len:prompt_len + la] = False
    packed = extend([a, b])
    packed["attention_mask"] = allow[None, None]
    packed["position_ids"] = torch.cat([torch.arange(prompt_len + la),
                                        torch.arange(prompt_len, prompt_len + lb)])[None]
    return packed, extend([a]), extend([b])


def _image_blocks(token_type_ids):
    """[T, T] True where both tokens lie in the same image (Gemma 3's bidirectional blocks)."""
    img = token_type_ids[0] == 1
    starts = img & ~torch.nn.functional.pad(img, (1, 0))[:-1]
    group = torch.where(img, torch.cumsum(starts.int(), 0), 0)
    return (group[:, None] == group[None, :]) & img[:, None]


def test_custom_4d_mask_and_positions_share_the_prefix(built):
    """Every family's forward takes a custom 4-D mask and 1-D position ids: chosen and rejected
    packed behind one prompt+image encoding give the logits of two separate forwards. Gemma 3's
    mask must carry its bidirectional image blocks (a plain causal 4-D mask drops them)."""
    family, processor, model = built
    _, inputs = _encode(processor, 2)
    tok, prompt_len = processor.tokenizer, inputs["input_ids"].shape[1]
    a, b = (tok(t + tok.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"]
            for t in ("The circle is red.", "It is blue."))
    packed, sep_a, sep_b = _pack(inputs, prompt_len, a, b)
    with torch.no_grad():
        logits_a, logits_b = model(**sep_a).logits[0], model(**sep_b).logits[0]
        if family == "gemma3":
            causal = model(**packed).logits[0]
            assert not torch.allclose(causal[:prompt_len], logits_a[:prompt_len], atol=1e-3)
            packed["attention_mask"][0, 0, :prompt_len, :prompt_len] |= _image_blocks(
                inputs["token_type_ids"])
        logits = model(**packed).logits[0]
    split = prompt_len + a.shape[1]
    torch.testing.assert_close(logits[:split], logits_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[split:], logits_b[prompt_len:], atol=1e-5, rtol=1e-5)
