"""The vision cache on every VLM family's tiny build: with prompts of two images and of one,
packed and plain, cached image features give the log-probs and LoRA gradients of running the
vision tower in the step, and a cached step never runs the tower."""

import pytest
import torch
from test_vision_cache import CHOSEN, REJECTED, logps_and_grads, lora_model, visual

from rdpo.batches import PairCollator, TrainPair
from rdpo.demo.tiny import FAMILIES, TOY_IMAGE_PIXELS
from rdpo.packing import pair_logps
from rdpo.pool import load_pool
from rdpo.vision_cache import VisionCache, vision_cache_support


@pytest.fixture(scope="module")
def mixed_records(toy_pools, tmp_path_factory):
    """Toy records 0, 1, 3 as two images, one image, one image (and the one-image pool's)."""
    from family_pools import reshape_pool

    path = reshape_pool(toy_pools.train, tmp_path_factory.mktemp("vc_mixed") / "pool.jsonl",
                        multi_image=True)
    records = [load_pool(path)[i] for i in (0, 1, 3)]
    assert [len(r.images) for r in records] == [2, 1, 1]
    return records


@pytest.fixture(scope="module", params=FAMILIES)
def family_lora(request, tmp_path_factory):
    family = request.param
    model, processor = lora_model(family, tmp_path_factory.mktemp(f"vc_{family}"),
                                  pixels=TOY_IMAGE_PIXELS.get(family, 112 * 56))
    return family, model, processor


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_cached_features_equal_the_tower_on_every_family(family_lora, mixed_records, packed):
    family, model, processor = family_lora
    assert vision_cache_support(model) is None, family
    records = mixed_records
    pairs = [TrainPair(r, c, j, 0.0, 0.0) for r, c, j in zip(records, CHOSEN, REJECTED, strict=True)]
    want, want_grads = logps_and_grads(model, PairCollator(processor, packed=packed)(pairs))

    cache = VisionCache(max_mb=64)
    collator = PairCollator(processor, packed=packed, vision=cache)
    with torch.no_grad():  # the round's reference pass: encodes each prompt's images once
        ref = torch.cat(pair_logps(model, collator(pairs)))
    assert (len(cache), cache.misses, cache.hits) == (3, 3, 0 if packed else 3)
    calls = []
    hook = visual(model).register_forward_hook(lambda *a: calls.append(1))
    try:
        got, got_grads = logps_and_grads(model, collator(pairs))
    finally:
        hook.remove()
    assert calls == []  # the step never ran the vision tower
    if family == "mllama":  # the one-image prompts' second slot: the tower's empty-slot block
        assert len(cache._empty) == 1
    assert cache.hits == (3 if packed else 9)
    assert (want[:3] - want[3:]).abs().max() > 1.0  # chosen and rejected really differ
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 0
    assert max(g.abs().max() for g in want_grads.values()) > 0
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
