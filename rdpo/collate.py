"""Turning prompt records and responses into model inputs through the VLM's processor.

A prompt is encoded by the processor (which expands each image placeholder into the image's
patch tokens); a completion is appended as token ids. A sampled completion is the ids the policy
sampled, as they are (its end-of-turn id included when it stopped, none when it was cut at
``max_new_tokens``); a text completion (warm start, tests, preference data) is tokenized on its
own and given the end-of-turn token. Appending ids, instead of re-tokenizing prompt + completion
as one string, keeps the prompt/completion boundary exact.
"""

from __future__ import annotations

from collections import OrderedDict
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


Completion = str | Sequence[int]
"""A completion: token ids as sampled, or a text to tokenize and end with the end-of-turn token."""


def completion_ids(processor, completion: Completion) -> list[int]:
    """The token ids a completion is trained on (see `Completion`)."""
    if isinstance(completion, str):
        ids = processor.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return [*ids, end_of_turn_id(processor)]
    return [int(i) for i in completion]


class PromptCache:
    """Encoded prompts (processor output, image patches included) by record id, least recently
    used dropped first once they hold more than `max_mb` MB (0: nothing is kept).

    One cache serves the rollout and the pair collation, so a prompt a round samples from and
    then trains on for several steps is encoded once, and memory stays bounded however large
    the pool is.
    """

    def __init__(self, processor, max_mb: float = 512):
        self.processor = processor
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[str, tuple[dict, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, record: PromptRecord) -> dict[str, torch.Tensor]:
        if record.id in self._items:
            self.hits += 1
            self._items.move_to_end(record.id)
            return self._items[record.id][0]
        self.misses += 1
        encoded = encode_prompt(self.processor, record)
        size = sum(v.numel() * v.element_size() for v in encoded.values())
        if size <= self.max_bytes:
            self._items[record.id] = (encoded, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
        return encoded


def append_completion(processor, prompt: dict[str, torch.Tensor], completion: Completion) -> dict:
    """`prompt` (one sequence) followed by `completion`'s ids, with a completion mask."""
    ids = torch.tensor(completion_ids(processor, completion), dtype=torch.long)[None]
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


def collate_sequences(processor, prompts: Sequence[dict], completions: Sequence[Completion]) -> dict:
    """A right-padded batch of prompt + completion sequences, with ``completion_mask``."""
    items = [append_completion(processor, p, c) for p, c in zip(prompts, completions, strict=True)]
    return pad_batch(items, processor.tokenizer.pad_token_id, side="right")
