"""Turning prompt records and responses into model inputs through the VLM's processor.

A prompt is encoded by the processor (which expands each image placeholder into the image's
patch tokens); a completion is tokenized on its own and appended, followed by the end-of-turn
token. Appending ids, instead of re-tokenizing prompt + completion as one string, keeps the
prompt/completion boundary exact, so the completion mask covers exactly the response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rdpo.pool import PromptRecord, load_images

# Per-token fields of Qwen-VL processor outputs; everything else (pixel_values,
# image_grid_thw, ...) is per-image and concatenated along dim 0.
TOKEN_FIELDS = ("input_ids", "attention_mask", "mm_token_type_ids", "completion_mask")


def chat_text(processor, record: PromptRecord) -> str:
    """The prompt text for `record` in the processor's chat template, ready for generation."""
    content = [{"type": "image"} for _ in record.images]
    content.append({"type": "text", "text": record.instruction})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(processor, record: PromptRecord, images=None) -> dict[str, torch.Tensor]:
    """Processor output for one prompt (batch dimension 1), every field kept."""
    images = load_images(record) if images is None else images
    return dict(processor(text=[chat_text(processor, record)], images=images or None,
                          return_tensors="pt"))


def end_of_turn_id(processor) -> int:
    tok = processor.tokenizer
    return tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id


def append_completion(processor, prompt: dict[str, torch.Tensor], completion: str) -> dict:
    """`prompt` (one sequence) followed by `completion` and end-of-turn, with a completion mask."""
    ids = processor.tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([*ids, end_of_turn_id(processor)], dtype=torch.long)[None]
    n = ids.shape[1]
    out = dict(prompt)
    out["input_ids"] = torch.cat([prompt["input_ids"], ids], 1)
    out["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones_like(ids)], 1)
    if "mm_token_type_ids" in prompt:
        out["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    mask = torch.zeros_like(out["input_ids"])
    mask[:, -n:] = 1
    out["completion_mask"] = mask
    return out


def pad_batch(items: Sequence[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Stack single-sequence encodings into one batch, padding token fields on `side`."""
    length = max(item["input_ids"].shape[1] for item in items)
    batch: dict[str, torch.Tensor] = {}
    for key in items[0]:
        if key in TOKEN_FIELDS:
            rows = []
            for item in items:
                value = item[key]
                pad = value.new_full((1, length - value.shape[1]), pad_id if key == "input_ids" else 0)
                rows.append(torch.cat([pad, value] if side == "left" else [value, pad], 1))
            batch[key] = torch.cat(rows, 0)
        else:
            batch[key] = torch.cat([item[key] for item in items], 0)
    return batch


def collate_sequences(processor, prompts: Sequence[dict], completions: Sequence[str]) -> dict:
    """A right-padded batch of prompt + completion sequences, with ``completion_mask``."""
    items = [append_completion(processor, p, c) for p, c in zip(prompts, completions, strict=True)]
    return pad_batch(items, processor.tokenizer.pad_token_id, side="right")
