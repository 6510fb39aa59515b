"""The vision cache on every VLM family's tiny build: with prompts of two images and of one,
packed and plain, cached image features give the log-probs and LoRA gradients of running the
vision tower in the step, and a cached step never runs the tower. Also with each family's
image splitting on (Idefics3's tiles, InternVL's patches, LLaVA-OneVision's anyres grid,
Gemma 3's pan-and-scan crops) and Mllama with several tiles per image."""

import copy
import dataclasses

import pytest
import torch
from test_families import slot_hook_off
from test_vision_cache import CHOSEN, REJECTED, logps_and_grads, lora_model, visual

from rdpo.demo.tiny import FAMILIES, TOY_IMAGE_PIXELS
from rdpo.engine.collate import PairCollator
from rdpo.engine.encode import encode_prompt
from rdpo.engine.packing import pair_logps
from rdpo.engine.vision_cache import VisionCache, vision_cache_support
from rdpo.pairs import TrainPair
from rdpo.pool import load_pool


@pytest.fixture(scope="module")
def mixed_records(toy_pools, tmp_path_factory):
    """Toy records 0, 1, 3 as two images, one image, one image."""
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


def assert_cache_exact(model, processor, records, packed: bool) -> VisionCache:
    """Log-probs and LoRA gradients of a cached step equal the tower's; the step never runs it."""
    assert vision_cache_support(model) is None
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
    assert cache.hits == (3 if packed else 9)
    assert (want[:3] - want[3:]).abs().max() > 1.0  # chosen and rejected really differ
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 0
    assert max(g.abs().max() for g in want_grads.values()) > 0
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    return cache


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_cached_features_equal_the_tower_on_every_family(family_lora, mixed_records, packed):
    family, model, processor = family_lora
    cache = assert_cache_exact(model, processor, mixed_records, packed)
    if family == "mllama":  # the one-image prompts' second slot: the tower's empty-slot block
        assert len(cache._empty) == 1


@pytest.mark.parametrize("family_lora", ["mllama"], indirect=True)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_mllama_one_image_count(family_lora, toy_pools, packed):
    """A Mllama pool of one-image prompts: no empty slot to fill."""
    _, model, processor = family_lora
    cache = assert_cache_exact(model, processor, load_pool(toy_pools.train)[:3], packed)
    assert len(cache._empty) == 0


def split_images(family, model, processor):
    """(a copy of `processor` that splits each 2:1 toy image in 3 tiles, patches or crops,
    undo): the shared model's config is matched where it reads the layout, and undo restores it."""
    processor = copy.deepcopy(processor)
    images = processor.image_processor
    undo = lambda: None  # noqa: E731
    if family == "idefics3":  # resized to 224 px, 2 tiles of 112 px + the whole image
        images.do_image_splitting = True
        images.size, images.max_image_size = {"longest_edge": 224}, {"longest_edge": 112}
    elif family == "internvl":  # 2 patches + a thumbnail
        images.crop_to_patches, images.max_patches = True, 4
    elif family == "gemma3":  # the image + 2 pan-and-scan crops, 16 tokens each
        processor.images_kwargs = dict(processor.images_kwargs, do_pan_and_scan=True,
                                       pan_and_scan_min_crop_size=16)
    elif family == "llava_onevision":  # anyres: the base image + a 1×2 grid of 56 px tiles
        config, was = model.get_base_model().config, model.get_base_model().config.image_grid_pinpoints
        pins = [[56, 56], [56, 112], [112, 56], [112, 112]]
        images.image_grid_pinpoints = config.image_grid_pinpoints = pins

        def undo():
            config.image_grid_pinpoints = was
    else:
        raise AssertionError(f"{family}: no image splitting option here")
    return processor, undo


# Qwen encodes each image as one native-resolution grid (nothing to split); Mllama's tiles:
# test_mllama_tiles.
@pytest.mark.parametrize("family_lora", ["llava_onevision", "idefics3", "gemma3", "internvl"],
                         indirect=True)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_cached_features_equal_the_tower_with_split_images(family_lora, mixed_records, packed):
    family, model, processor = family_lora
    split, undo = split_images(family, model, processor)
    try:
        one = encode_prompt(split, mixed_records[1])["pixel_values"]  # a one-image prompt
        assert one.numel() // one.shape[-3:].numel() == 3  # tiles, patches or crops
        assert_cache_exact(model, split, mixed_records, packed)
    finally:
        undo()


def two_tiles(path):
    """Mllama's tiny build with up to 2 tiles per image: a 2:1 toy image takes both."""
    import json

    config = json.loads((path / "config.json").read_text())
    config["vision_config"].update(max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    (path / "config.json").write_text(json.dumps(config))
    processor = json.loads((path / "processor_config.json").read_text())
    processor["image_processor"]["max_image_tiles"] = 2
    (path / "processor_config.json").write_text(json.dumps(processor))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_mllama_tiles(tmp_path, mixed_records, packed):
    model, processor = lora_model("mllama", tmp_path, edit=two_tiles)
    one = encode_prompt(processor, mixed_records[0])
    assert one["pixel_values"].shape[1:3] == (2, 2)  # 2 images × 2 tiles
    assert one["aspect_ratio_mask"].tolist() == [[[1, 1], [1, 1]]]
    cache = assert_cache_exact(model, processor, mixed_records, packed)
    assert len(cache._empty) == 1
    # A square image takes one tile of two: the prompt's blind rows attend to its padded tile
    # too (alone as batched), not to the batch's padded slot.
    from PIL import Image

    square = tmp_path / "square.png"
    with Image.open(mixed_records[1].images[0]) as im:
        im.convert("RGB").crop((0, 0, min(im.size), min(im.size))).save(square)
    records = [mixed_records[0], dataclasses.replace(mixed_records[1], id="square",
                                                     images=(square,)), mixed_records[2]]
    assert encode_prompt(processor, records[1])["aspect_ratio_mask"].tolist() == [[[1, 0]]]
    for cached in (VisionCache(max_mb=64), None):
        diff = assert_batched_equal_alone(model, processor, records, packed, cached)
        print(f"mllama 2 tiles packed={packed} cache={cached is not None}: batched vs alone {diff:.2e}")


def assert_batched_equal_alone(model, processor, records, packed: bool, cache) -> float:
    """Each pair's log-probs in one batch of `records` (image counts differ: padded slots) equal
    its own batch's, as a round's reference pass and its steps batch a prompt differently
    (`rdpo.engine.image_slots`); returns the largest difference."""
    pairs = [TrainPair(r, c, j, 0.0, 0.0) for r, c, j in zip(records, CHOSEN, REJECTED, strict=True)]
    collator = PairCollator(processor, packed=packed, vision=cache)
    with torch.no_grad():
        batched = torch.stack(pair_logps(model, collator(pairs)))  # [chosen/rejected, pairs]
        alone = torch.cat([torch.stack(pair_logps(model, collator([p]))) for p in pairs], 1)
        with slot_hook_off(model):  # alone, the hook changes nothing: Mllama's own numbers
            own = torch.cat([torch.stack(pair_logps(model, collator([p]))) for p in pairs], 1)
    torch.testing.assert_close(alone, own, atol=0, rtol=0)
    torch.testing.assert_close(batched, alone, atol=2e-5, rtol=0)
    return float((batched - alone).abs().max())


@pytest.mark.parametrize("family_lora", ["mllama"], indirect=True)
@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_mllama_batched_equal_alone(family_lora, mixed_records, packed, cached):
    """A Mllama pool mixing two- and one-image prompts: a pair's log-probs do not depend on its
    batch, with and without the vision cache, packed and plain."""
    _, model, processor = family_lora
    cache = VisionCache(max_mb=64) if cached else None
    diff = assert_batched_equal_alone(model, processor, mixed_records, packed, cache)
    print(f"mllama LoRA packed={packed} cache={cached}: batched vs alone {diff:.2e}")
    if cached:
        assert len(cache._empty) == 1  # the batch padded the one-image prompts' second slot
