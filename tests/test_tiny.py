"""The offline tiny Qwen-VL builder: each family loads back through the Auto classes and runs."""

import pytest
import torch
from PIL import Image

from rdpo.demo import toy
from rdpo.demo.tiny import FAMILIES, QWEN_FAMILIES, build_tiny_vlm

# family -> (processor class, model class, image size (w, h), pixel budget)
EXPECTED = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLForConditionalGeneration", (112, 56), 112 * 56),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration", (112, 56), 112 * 56),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLForConditionalGeneration", (128, 64), 128 * 64),
}


@pytest.fixture(scope="module")
def corpus():
    return toy.corpus()


def test_every_family_is_covered():
    from rdpo.families import FAMILIES as KNOWN

    assert set(QWEN_FAMILIES) == set(EXPECTED)
    assert set(FAMILIES) == set(KNOWN)  # the other families: tests/test_tiny_families.py


def test_unknown_family_raises(tmp_path, corpus):
    with pytest.raises(ValueError, match="llava"):
        build_tiny_vlm(tmp_path, corpus, family="llava")


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_build_load_and_forward(family, tmp_path, corpus):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc_cls, model_cls, size, pixels = EXPECTED[family]
    out = build_tiny_vlm(tmp_path / family, corpus, family=family, image_pixels=pixels)
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert type(processor).__name__ == proc_cls
    assert type(model).__name__ == model_cls
    text_cfg = model.config.text_config
    assert text_cfg.num_hidden_layers == 2 and text_cfg.hidden_size == 64
    vocab = len(processor.tokenizer)
    assert text_cfg.vocab_size == vocab
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What color is the circle?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", size, (220, 30, 30))],
                       return_tensors="pt")
    grid = inputs["image_grid_thw"]
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == int(grid.prod()) // 4 == 8  # 2×2 spatial merge of the patch grid
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], vocab)
    assert torch.isfinite(logits).all()
    # the image reaches the language model: another image changes the logits
    other = processor(text=[text], images=[Image.new("RGB", size, (30, 60, 220))],
                      return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, logits)


def test_model_vocabulary_is_the_shape_s_not_the_tokenizer_s(tmp_path, corpus):
    """`vocab_size` sizes the model's embedding and output layer (the benchmark's real Qwen
    vocabulary); the tokenizer trained on the small corpus stays small."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    out = build_tiny_vlm(tmp_path / "m", corpus, vocab_size=3000)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.text_config.vocab_size == 3000
    assert model.get_output_embeddings().weight.shape[0] == 3000
    assert len(AutoTokenizer.from_pretrained(out)) <= 512
