"""Packed pairs ``[prompt, chosen, rejected]`` give the log-probs of two separate forwards."""

import pytest
import torch

from rdpo.demo import toy
from rdpo.demo.tiny import build_tiny_vlm
from rdpo.engine.encode import collate_sequences, encode_prompt
from rdpo.engine.logps import sequence_logps
from rdpo.engine.packing import (
    CHOSEN,
    PROMPT,
    REJECTED,
    pack_pairs,
    packed_logps,
    packing_support,
    pair_attention_mask,
)
from rdpo.pool import load_pool

CHOSEN_TEXT = ["There is a red circle on the left.", "Blue.", "Two shapes: a green square."]
REJECTED_TEXT = ["A purple triangle and a dog and a blue square on the right side.", "Red red red.", "No."]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def family_model(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    pixels = 128 * 64 if request.param == "qwen3_vl" else 112 * 56
    path = build_tiny_vlm(tmp_path_factory.mktemp(request.param), toy.corpus(),
                          family=request.param, image_pixels=pixels)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    # Random init gives near-uniform predictions; scale the output layer so log-probs differ
    # clearly between positions and a wrong position shows.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model, processor


def separate(model, processor, prompts):
    seqs = collate_sequences(processor, prompts * 2, CHOSEN_TEXT + REJECTED_TEXT)
    return sequence_logps(model, seqs).chunk(2)


def test_packed_equals_separate_forwards(family_model, toy_pools):
    model, processor = family_model
    assert packing_support(model) is None
    prompts = [encode_prompt(processor, r) for r in load_pool(toy_pools.train)[:3]]
    with torch.no_grad():
        want_c, want_r = separate(model, processor, prompts)
        got_c, got_r = packed_logps(model, pack_pairs(processor, prompts, CHOSEN_TEXT, REJECTED_TEXT))
    assert (want_c - want_r).abs().max() > 1.0  # chosen and rejected really differ
    torch.testing.assert_close(got_c, want_c, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_r, want_r, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        avg_c, avg_r = packed_logps(model, pack_pairs(processor, prompts, CHOSEN_TEXT, REJECTED_TEXT),
                                    average=True)
        seqs = collate_sequences(processor, prompts * 2, CHOSEN_TEXT + REJECTED_TEXT)
        want_avg = sequence_logps(model, seqs, average=True)
    torch.testing.assert_close(torch.cat([avg_c, avg_r]), want_avg, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_separate(tiny_model_and_processor, toy_pools):
    model, processor = tiny_model_and_processor
    prompts = [encode_prompt(processor, r) for r in load_pool(toy_pools.train)[:2]]
    weight = model.model.language_model.layers[0].mlp.down_proj.weight
    grads = []
    for packed in (False, True):
        weight.requires_grad_(True)
        weight.grad = None
        if packed:
            c, r = packed_logps(model, pack_pairs(processor, prompts, CHOSEN_TEXT[:2], REJECTED_TEXT[:2]))
        else:
            seqs = collate_sequences(processor, prompts * 2, CHOSEN_TEXT[:2] + REJECTED_TEXT[:2])
            c, r = sequence_logps(model, seqs).chunk(2)
        (c - 2 * r).sum().backward()
        grads.append(weight.grad.clone())
        weight.requires_grad_(False)
        weight.grad = None
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_one_image_encoding_per_pair(tiny_model_and_processor, toy_pools):
    _, processor = tiny_model_and_processor
    prompts = [encode_prompt(processor, r) for r in load_pool(toy_pools.train)[:3]]
    packed = pack_pairs(processor, prompts, CHOSEN_TEXT, REJECTED_TEXT)
    plain = collate_sequences(processor, prompts * 2, CHOSEN_TEXT + REJECTED_TEXT)
    assert packed["pixel_values"].shape[0] * 2 == plain["pixel_values"].shape[0]
    assert packed["input_ids"].shape[0] == 3 and plain["input_ids"].shape[0] == 6
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (packed["input_ids"] == image_id).sum() * 2 == (plain["input_ids"] == image_id).sum()


def test_attention_mask_hides_chosen_from_rejected():
    seg = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, REJECTED, 0]])
    allowed = pair_attention_mask(seg, torch.float32)[0, 0] == 0
    assert allowed[4].tolist() == [True, True, False, False, True, False, False]
    assert allowed[5].tolist() == [True, True, False, False, True, True, False]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]
    assert not allowed[6].any() and not allowed[:, 6].any()
