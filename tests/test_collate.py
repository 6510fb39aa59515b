"""Prompt + completion encoding through the tiny VLM's real processor."""

import pytest
import torch

from rdpo.engine.encode import (
    append_completion,
    chat_text,
    collate_sequences,
    encode_prompt,
    end_of_turn_id,
    pad_batch,
)
from rdpo.pool import load_images, load_pool

RESPONSE = "There is a red circle on the left."


@pytest.fixture(scope="module")
def processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


@pytest.fixture(scope="module")
def records(toy_pools):
    return load_pool(toy_pools.train)


def image_token_id(processor):
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_chat_text_is_the_qwen_template(processor, records):
    rec = records[0]
    assert chat_text(processor, rec) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{rec.instruction}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_part_equals_processor_encoding(processor, records):
    rec = records[0]
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            f"{rec.instruction}<|im_end|>\n<|im_start|>assistant\n")
    expected = processor(text=[text], images=load_images(rec), return_tensors="pt")
    seq = append_completion(processor, encode_prompt(processor, rec), RESPONSE)
    n = expected["input_ids"].shape[1]
    assert torch.equal(seq["input_ids"][:, :n], expected["input_ids"])
    assert torch.equal(seq["pixel_values"], expected["pixel_values"])
    assert torch.equal(seq["image_grid_thw"], expected["image_grid_thw"])
    assert seq["completion_mask"][:, :n].sum() == 0


def test_completion_mask_covers_response_and_end_of_turn(processor, records):
    seq = append_completion(processor, encode_prompt(processor, records[0]), RESPONSE)
    ids, mask = seq["input_ids"][0], seq["completion_mask"][0].bool()
    masked = processor.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)
    assert masked == RESPONSE + "<|im_end|>"
    # the mask is one contiguous run ending at the last token
    n = int(mask.sum())
    assert mask[-n:].all() and not mask[:-n].any()
    assert ids[-1].item() == end_of_turn_id(processor)
    assert seq["attention_mask"].sum() == ids.numel()
    # the whole sequence decodes to prompt text + response + end of turn
    full = processor.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert full.endswith("<|im_start|>assistant\n" + RESPONSE + "<|im_end|>")


def test_image_placeholder_expanded_to_merged_patches(processor, records):
    enc = encode_prompt(processor, records[0])
    grid = enc["image_grid_thw"]
    assert grid.shape == (1, 3)
    # 112×56 toy image, 14-pixel patches, 2 temporal: grid (1, 4, 8); 2×2 merge → 8 tokens
    assert grid.tolist() == [[1, 4, 8]]
    n_image = int((enc["input_ids"] == image_token_id(processor)).sum())
    assert n_image == int(grid.prod()) // 4 == 8
    assert enc["pixel_values"].shape[0] == int(grid.prod())


def test_right_padding(processor, records):
    prompts = [encode_prompt(processor, r) for r in records[:2]]
    completions = ["Blue.", RESPONSE + " I hope this helps."]
    singles = [append_completion(processor, p, c) for p, c in zip(prompts, completions, strict=True)]
    lengths = [s["input_ids"].shape[1] for s in singles]
    assert lengths[0] < lengths[1]
    batch = collate_sequences(processor, prompts, completions)
    pad_id = processor.tokenizer.pad_token_id
    assert batch["input_ids"].shape == (2, max(lengths))
    short, k = singles[0], lengths[0]
    assert torch.equal(batch["input_ids"][0, :k], short["input_ids"][0])
    assert (batch["input_ids"][0, k:] == pad_id).all()
    for key in ("attention_mask", "completion_mask", "mm_token_type_ids"):
        assert torch.equal(batch[key][0, :k], short[key][0])
        assert (batch[key][0, k:] == 0).all(), key
    assert torch.equal(batch["input_ids"][1], singles[1]["input_ids"][0])
    assert batch["attention_mask"].sum(1).tolist() == lengths
    # per-image fields are concatenated, not padded
    assert torch.equal(batch["pixel_values"],
                       torch.cat([p["pixel_values"] for p in prompts]))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 8], [1, 4, 8]]


def test_left_padding_for_generation(processor, records):
    prompts = [encode_prompt(processor, r) for r in records[:4]]
    lengths = [p["input_ids"].shape[1] for p in prompts]
    assert len(set(lengths)) > 1
    batch = pad_batch(prompts, processor.tokenizer.pad_token_id, side="left")
    width = max(lengths)
    assert batch["input_ids"].shape == (4, width)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        # real tokens end every row, so generation continues right after them
        assert torch.equal(batch["input_ids"][i, width - n:], p["input_ids"][0])
        assert (batch["input_ids"][i, :width - n] == processor.tokenizer.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
    assert "completion_mask" not in batch
    assert batch["image_grid_thw"].shape == (4, 3)
