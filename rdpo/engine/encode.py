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

from rdpo.families import end_of_turn_id, processor_family
from rdpo.pool import PromptRecord, load_images

# Per-token fields of processor outputs (dim 1 is the sequence); everything else (pixel_values,
# image_grid_thw, aspect_ratio_ids, ...) is per image or per prompt and concatenated along dim 0.
TOKEN_FIELDS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids",
                "cross_attention_mask", "completion_mask")


def chat_text(processor, record: PromptRecord) -> str:
    """The prompt text for `record` in the processor's chat template, ready for generation:
    the images, the video (if any), then the instruction."""
    content = [{"type": "image"} for _ in record.images]
    content += [{"type": "video"}] if record.video else []
    content.append({"type": "text", "text": record.instruction})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(processor, record: PromptRecord, images=None) -> dict[str, torch.Tensor]:
    """Processor output for one prompt (batch dimension 1), every field kept."""
    images = load_images(record) if images is None else images
    videos = {}
    if record.video:
        family = processor_family(processor)
        if family is None or not family.video:
            raise ValueError(f"{record.source}: video: {type(processor).__name__} takes no video "
                             "(rdpo.families); give the frames as images instead")
        # The record's frames are the video as sampled: the processor keeps every one.
        videos = {"videos": [load_images(record, record.video)], "do_sample_frames": False}
    # The chat template writes every special token itself (Gemma 3's and Llama 3.2's write
    # <bos>): the tokenizer adds none, as in transformers' own apply_chat_template(tokenize=True).
    return dict(processor(text=[chat_text(processor, record)], images=images or None,
                          return_tensors="pt", add_special_tokens=False, **videos))


Completion = str | Sequence[int]
"""A completion: token ids as sampled, or a text to tokenize and end with the end-of-turn token."""


def completion_ids(processor, completion: Completion) -> list[int]:
    """The token ids a completion is trained on (see `Completion`)."""
    if isinstance(completion, str):
        ids = processor.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return [*ids, end_of_turn_id(processor)]
    return [int(i) for i in completion]


class PromptCache:
    """Encoded prompts (processor output, image patches included) by the record's content
    (`PromptRecord.content_key`: instruction and image bytes, never the id alone, which a
    held-out pool may share with the training pool), least recently used dropped first once
    they hold more than `max_mb` MB (0: nothing is kept).

    One cache serves the rollout, the pair collation and the held-out evaluation, so a prompt a
    round samples from and then trains on for several steps is encoded once, and memory stays
    bounded however large the pool is.
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
        key = record.content_key
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key][0]
        self.misses += 1
        encoded = encode_prompt(self.processor, record)
        size = sum(v.numel() * v.element_size() for v in encoded.values())
        if size <= self.max_bytes:
            self._items[key] = (encoded, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
        return encoded


def extend_token_field(key: str, value: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token field `key` of a prompt extended over appended completion `ids` [1, n]."""
    n = ids.shape[1]
    if key == "input_ids":
        tail = ids
    elif key == "cross_attention_mask":
        # Mllama: each text token's view of the images; completion tokens see what the prompt's
        # last token sees, as generate extends it while sampling. Rows are independent (the
        # cross-attention layers read the image, not other tokens), so a packed pair gives its
        # chosen and rejected tokens that same row too.
        tail = value[:, -1:].expand(-1, n, *value.shape[2:])
    else:  # attention_mask 1; token types 0 (text)
        tail = value.new_full((1, n), 1 if key == "attention_mask" else 0)
    return torch.cat([value, tail], 1)


def append_completion(processor, prompt: dict[str, torch.Tensor], completion: Completion) -> dict:
    """`prompt` (one sequence) followed by `completion`'s ids, with a completion mask."""
    ids = torch.tensor(completion_ids(processor, completion), dtype=torch.long)[None]
    out = {k: extend_token_field(k, v, ids) if k in TOKEN_FIELDS else v for k, v in prompt.items()}
    mask = torch.zeros_like(out["input_ids"])
    mask[:, -ids.shape[1]:] = 1
    out["completion_mask"] = mask
    return out


def pad_to(value: torch.Tensor, shape: tuple[int, ...], fill: int = 0, left: bool = False) -> torch.Tensor:
    """`value` padded with `fill` at the end (dim 1 at the start with `left`) of each dim to `shape`.

    Per-prompt image fields of several families (Idefics3's [1, images, ...], Mllama's tiles)
    differ in size between prompts with different image counts; zero padding is what their
    processors use for a missing image or tile, and the models drop it.
    """
    if tuple(value.shape[1:]) == tuple(shape[1:]):
        return value
    out = value.new_full((value.shape[0], *shape[1:]), fill)
    index = [slice(None)] + [slice(0, s) for s in value.shape[1:]]
    if left:
        index[1] = slice(shape[1] - value.shape[1], shape[1])
    out[tuple(index)] = value
    return out


def stack_field(values: Sequence[torch.Tensor], fill: int = 0, left: bool = False) -> torch.Tensor:
    """One field of several encodings concatenated along dim 0, each padded to the largest
    (`pad_to`)."""
    shape = tuple(max(sizes) for sizes in zip(*(v.shape for v in values), strict=True))
    return torch.cat([pad_to(v, shape, fill, left) for v in values], 0)


def pad_batch(items: Sequence[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Stack single-sequence encodings into one batch, padding token fields on `side` and
    per-image fields at their ends (`pad_to`).

    Per-image fields are concatenated over the encodings that have them: a video prompt has
    ``pixel_values_videos`` where an image prompt has ``pixel_values``, and the model matches
    features to placeholder tokens in order.
    """
    keys = list(dict.fromkeys(k for item in items for k in item))
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [item[key] for item in items if key in item]
        if key in TOKEN_FIELDS and len(values) < len(items):
            raise ValueError(f"{key} missing from some prompts of the batch")
        batch[key] = stack_field(values, pad_id if key == "input_ids" else 0,
                                 key in TOKEN_FIELDS and side == "left")
    return batch


def collate_sequences(processor, prompts: Sequence[dict], completions: Sequence[Completion]) -> dict:
    """A right-padded batch of prompt + completion sequences, with ``completion_mask``."""
    items = [append_completion(processor, p, c) for p, c in zip(prompts, completions, strict=True)]
    return pad_batch(items, processor.tokenizer.pad_token_id, side="right")
