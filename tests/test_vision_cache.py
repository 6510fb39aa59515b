"""Image features encoded once and reused: the bound, the fallback. Equality with the vision
tower on every family (log-probs, gradients, a cached step never running the tower):
tests/test_vision_cache_families.py."""

import logging

import pytest
import torch

from rdpo.demo import toy
from rdpo.demo.tiny import build_tiny_vlm
from rdpo.engine.collate import PairCollator
from rdpo.engine.packing import pair_logps
from rdpo.engine.vision_cache import VisionCache, trunk_inputs, vision_cache_support
from rdpo.families import family_of
from rdpo.pairs import TrainPair
from rdpo.pool import load_pool

CHOSEN = ["There is a red circle on the left.", "Blue.", "Two shapes: a green square."]
REJECTED = ["A purple triangle and a dog and a blue square on the right side.", "Red red red.", "No."]


def lora_model(family: str, root, target: str | None = None, pixels: int | None = None,
               edit=None):
    """The family's tiny build with a LoRA adapter; `edit(path)` may rewrite its config files
    first (weights of a changed shape are then initialised afresh)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    pixels = pixels or (128 * 64 if family == "qwen3_vl" else 112 * 56)
    path = build_tiny_vlm(root, toy.corpus(), family=family, image_pixels=pixels)
    if edit is not None:
        edit(path)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, ignore_mismatched_sizes=edit is not None).eval()
    model.requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # log-probs that differ clearly between positions
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=target or family_of(model).lora_target)
    model = get_peft_model(model, lora)
    with torch.no_grad():  # B = 0 at init would leave the adapter out of the forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, processor


def visual(model):
    """The vision tower, by each family's attribute name."""
    trunk = model.get_base_model().model
    for name in ("visual", "vision_tower", "vision_model"):
        if getattr(trunk, name, None) is not None:
            return getattr(trunk, name)
    raise AssertionError(f"{type(trunk).__name__} has no vision tower attribute")


def logps_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    chosen, rejected = pair_logps(model, batch)
    (chosen - 2 * rejected).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([chosen, rejected]).detach(), grads


def test_beyond_the_bound_features_are_encoded_without_gradient(tiny_lora, toy_pools):
    model, processor = tiny_lora
    records = load_pool(toy_pools.train)[:2]
    pairs = [TrainPair(r, c, j, 0.0, 0.0) for r, c, j in zip(records, CHOSEN, REJECTED, strict=False)]
    want, _ = logps_and_grads(model, PairCollator(processor)(pairs))
    cache = VisionCache(max_mb=0)
    outputs = []
    hook = visual(model).register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        got, _ = logps_and_grads(model, PairCollator(processor, vision=cache)(pairs))
    finally:
        hook.remove()
    assert len(cache) == 0 and cache.misses == 2
    assert len(outputs) == 2 and not any(o.last_hidden_state.requires_grad for o in outputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_least_recently_used_features_go_first(tiny_lora, toy_pools):
    model, processor = tiny_lora
    records = load_pool(toy_pools.train)[:3]
    cache = VisionCache()
    collator = PairCollator(processor, vision=cache)
    with torch.no_grad():
        pair_logps(model, collator([TrainPair(records[0], "a", "b", 0.0, 0.0)]))
    one = cache.bytes
    assert one > 0
    cache.max_bytes = 2 * one
    with torch.no_grad():
        for r in (records[1], records[0], records[2]):  # record 1 is now the oldest
            pair_logps(model, collator([TrainPair(r, "a", "b", 0.0, 0.0)]))
    assert cache.bytes == 2 * one and len(cache) == 2
    assert list(cache._items) == [records[0].content_key, records[2].content_key]


def test_a_trainable_vision_tower_falls_back_with_a_reason(tmp_path, toy_pools, caplog):
    # LoRA on every linear named like the language model's projections, the vision tower's
    # MLP included (Qwen2.5-VL's vision blocks have gate/up/down projections).
    model, processor = lora_model("qwen2_5_vl", tmp_path, target=["q_proj", "gate_proj", "down_proj"])
    reason = vision_cache_support(model)
    assert reason is not None and "visual" in reason and "outside the language model" in reason
    records = load_pool(toy_pools.train)[:2]
    pairs = [TrainPair(r, c, j, 0.0, 0.0) for r, c, j in zip(records, CHOSEN, REJECTED, strict=False)]
    cache = VisionCache()
    batch = PairCollator(processor, vision=cache)(pairs)
    with caplog.at_level(logging.WARNING, logger="rdpo.engine.vision_cache"):
        inputs = trunk_inputs(model, dict(batch["packed"]))
    assert "pixel_values" in inputs and "mm_encoder_outputs" not in inputs and len(cache) == 0
    assert "vision cache off" in caplog.text
    want = torch.cat(pair_logps(model, PairCollator(processor)(pairs)))
    got = torch.cat(pair_logps(model, batch))
    torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    return lora_model("qwen2_vl", tmp_path_factory.mktemp("tiny_lora"))
