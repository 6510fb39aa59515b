"""One image and prompt encoding per DPO pair: ``[prompt, chosen, rejected]`` as one sequence.

Chosen and rejected share the image and the prompt. Instead of two sequences that each carry the
image's patch tokens (and run the vision tower twice), a pair is packed into one row; an
attention mask lets the rejected tokens see the prompt and themselves but not the chosen tokens,
and the rejected tokens get the position ids they would have right after the prompt: the
model's own multimodal rotary ids (Qwen's ``get_rope_index``) or plain 1-D positions, as the
family says (`rdpo.families`). The first rejected token is predicted from the prompt's last
hidden state, like the first chosen token. The log-probs equal two separate forwards.

The mask follows the model's own: image tokens that attend to their whole image (Gemma 3) see
it in the packed row too, and sliding-window layers get their window, measured in positions.
Mllama reads the image through cross-attention layers gated per token by
``cross_attention_mask``; those rows are independent of each other, so chosen and rejected
tokens get the prompt's last row, as in a plain sequence. Packing needs the custom mask to
reach the attention kernel, which transformers does for ``eager`` and ``sdpa``; other kernels
(flash-attention) and unknown families fall back to the plain batch of 2B sequences, with a
logged notice.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch

from rdpo.engine.encode import (
    TOKEN_FIELDS,
    Completion,
    completion_ids,
    extend_token_field,
    stack_field,
)
from rdpo.engine.image_slots import isolate_image_slots
from rdpo.engine.logps import sequence_logps, token_logps, unwrap
from rdpo.engine.vision_cache import trunk_inputs
from rdpo.families import PLAIN, ROPE_INDEX, family_of

log = logging.getLogger(__name__)

# Segment ids of a packed row.
PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3
PACKABLE_ATTENTION = ("eager", "sdpa")
SLIDING = "sliding_attention"
# Per-token fields a packed batch builds itself (ids, the 4-D mask) or never has.
_OWN_FIELDS = ("input_ids", "attention_mask", "completion_mask")


def _sliding_window(base) -> int | None:
    """The language model's sliding window when some of its layers use one, else None."""
    text = base.config.get_text_config()
    if SLIDING in (getattr(text, "layer_types", None) or ()):
        return text.sliding_window
    return None


def packing_support(model) -> str | None:
    """None when `model` can run packed pairs, else the reason it cannot."""
    base = unwrap(model)
    family = family_of(base)
    if family is None:
        return (f"{type(base).__name__} (model_type {getattr(base.config, 'model_type', None)!r}) "
                "is not a known family (rdpo.families)")
    if family.positions is None:
        return f"{family.name}: {family.no_packing}"
    trunk = getattr(base, "model", None)
    if family.positions == ROPE_INDEX and not hasattr(trunk, "get_rope_index"):
        return f"{type(base).__name__} has no get_rope_index (multimodal rotary ids)"
    if family.positions == ROPE_INDEX and _sliding_window(base):
        return f"{family.name}: sliding-window layers with multimodal rotary ids"
    attn = getattr(base.config, "_attn_implementation", None) or "eager"
    if attn not in PACKABLE_ATTENTION:
        return f"attention implementation {attn!r} takes no custom 4-D mask"
    return None


def pack_pairs(processor, prompts: Sequence[dict], chosen: Sequence[Completion],
               rejected: Sequence[Completion]) -> dict[str, torch.Tensor]:
    """A right-padded batch of B packed rows ``[prompt, chosen, rejected]``.

    `prompts` are single-prompt processor outputs (batch dimension 1). Returns the processor's
    per-image fields once per pair, ``input_ids``, the other per-token fields the processor
    gives, extended over the answers as for a plain sequence (`extend_token_field`: token types
    0, Mllama's ``cross_attention_mask`` rows the prompt's last row, since each row only gates
    that token's view of the images), and ``segments`` [B, T] (PAD, PROMPT, CHOSEN, REJECTED).
    Completions are token ids as sampled, or texts given the end-of-turn token
    (`rdpo.engine.encode.completion_ids`).
    """
    tok = processor.tokenizer
    rows, segs = [], []
    fields: dict[str, list[torch.Tensor]] = {
        k: [] for k in TOKEN_FIELDS if k in prompts[0] and k not in _OWN_FIELDS}
    for prompt, c, r in zip(prompts, chosen, rejected, strict=True):
        p_ids = prompt["input_ids"][0]
        c_ids = torch.tensor(completion_ids(processor, c), dtype=torch.long)
        r_ids = torch.tensor(completion_ids(processor, r), dtype=torch.long)
        rows.append(torch.cat([p_ids, c_ids, r_ids]))
        segs.append(torch.cat([torch.full_like(p_ids, PROMPT), torch.full_like(c_ids, CHOSEN),
                               torch.full_like(r_ids, REJECTED)]))
        answers = torch.cat([c_ids, r_ids])[None]
        for key, field_rows in fields.items():
            field_rows.append(extend_token_field(key, prompt[key], answers))
    length = max(len(row) for row in rows)

    def pad(items: list[torch.Tensor], value: int) -> torch.Tensor:
        return torch.stack([torch.cat([x, x.new_full((length - len(x),), value)]) for x in items])

    batch = {"input_ids": pad(rows, tok.pad_token_id), "segments": pad(segs, PAD)}
    for key, field_rows in fields.items():
        # Padding tokens (and, for Mllama, missing images and tiles) get 0, as the processor pads.
        batch[key] = stack_field(field_rows)
    for key in dict.fromkeys(k for p in prompts for k in p):  # per-image fields, as pad_batch
        if key not in TOKEN_FIELDS:
            batch[key] = stack_field([p[key] for p in prompts if key in p])
    return batch


def image_blocks(kinds: torch.Tensor) -> torch.Tensor:
    """Block ids [B, T] of runs of image tokens (``kinds == 1``), -1 elsewhere: tokens of one
    image attend to each other in both directions (Gemma 3's ``token_type_ids`` mask)."""
    is_image = kinds == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


def pair_attention_mask(segments: torch.Tensor, dtype: torch.dtype, *,
                        blocks: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                        window: int | None = None) -> torch.Tensor:
    """Additive 4-D mask [B, 1, T, T]: causal, no padding, rejected tokens blind to chosen ones.

    `blocks` (`image_blocks`) opens each image block in both directions; `window` with 1-D
    `positions` [B, T] keeps only keys less than `window` positions behind the query (a
    sliding-window layer, measured in positions so the rejected tokens get the window they
    have right after the prompt). Masked entries hold the dtype's minimum rather than -inf, so
    a padding row (which sees nothing) gives a uniform softmax instead of NaN; padding rows are
    never read.
    """
    t = segments.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()[None]
    if blocks is not None:
        allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    valid = segments != PAD
    allowed = allowed & valid[:, None, :] & valid[:, :, None]
    allowed &= ~((segments[:, :, None] == REJECTED) & (segments[:, None, :] == CHOSEN))
    if window is not None:
        allowed &= positions[:, None, :] > positions[:, :, None] - window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _rope_index(trunk, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """The model's own position ids for the tokens selected by `keep` [B, T]."""
    params = inspect.signature(trunk.get_rope_index).parameters
    kwargs = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                                    "mm_token_type_ids") if k in batch and k in params}
    positions, _ = trunk.get_rope_index(batch["input_ids"], attention_mask=keep.long(), **kwargs)
    return positions


def _plain_positions(keep: torch.Tensor) -> torch.Tensor:
    """1-D positions [B, T] counting the tokens selected by `keep` from 0."""
    return (keep.long().cumsum(1) - 1).clamp(min=0)


def pair_position_ids(model, batch: dict) -> torch.Tensor:
    """Position ids ([3, B, T] multimodal rotary, or [B, T]): prompt and chosen as in
    ``[prompt, chosen]``, rejected as in ``[prompt, rejected]``."""
    base = unwrap(model)
    seg = batch["segments"]
    keeps = ((seg == PROMPT) | (seg == CHOSEN), (seg == PROMPT) | (seg == REJECTED))
    if family_of(base).positions == PLAIN:
        with_chosen, with_rejected = (_plain_positions(k) for k in keeps)
        return torch.where(seg == REJECTED, with_rejected, with_chosen)
    with_chosen, with_rejected = (_rope_index(base.model, batch, k) for k in keeps)
    return torch.where(seg[None] == REJECTED, with_rejected, with_chosen)


def pair_mask(model, batch: dict, positions: torch.Tensor, dtype: torch.dtype):
    """The packed attention mask in the form the model takes: one 4-D mask, or one per layer
    type (``{"full_attention": ..., "sliding_attention": ...}``) when some layers slide."""
    base = unwrap(model)
    family = family_of(base)
    seg = batch["segments"]
    blocks = image_blocks(batch[family.image_blocks]) if family.image_blocks in batch else None
    full = pair_attention_mask(seg, dtype, blocks=blocks)
    window = _sliding_window(base)
    if window is None:
        return full
    return {"full_attention": full,
            SLIDING: pair_attention_mask(seg, dtype, blocks=blocks, positions=positions,
                                         window=window)}


def packed_logps(model, batch: dict, *, average: bool = False,
                 chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) completion log-probs, each [B], from one forward of packed pairs.

    `batch` comes from `pack_pairs`. Only completion positions are projected through the
    output layer (in chunks, as in `rdpo.engine.logps`); with ``average`` the sums are divided by the
    completion lengths.
    """
    base = unwrap(model)
    seg = batch["segments"]
    dtype = base.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    inputs = {k: v for k, v in batch.items() if k != "segments"}
    inputs["position_ids"] = pair_position_ids(model, batch)
    inputs["attention_mask"] = pair_mask(model, batch, inputs["position_ids"], dtype)
    isolate_image_slots(model)  # Mllama: batch-invariant blind rows, as in sequence_logps
    hidden = base.model(**trunk_inputs(model, inputs), use_cache=False).last_hidden_state

    # Token t is predicted from position t - 1, except the first rejected token: its context is
    # the prompt, so it is predicted from the prompt's last position.
    b, t = seg.shape
    index = torch.arange(t, device=seg.device).expand(b, t)
    predictor = index - 1
    first_rejected = (seg == REJECTED) & (torch.roll(seg, 1, 1) != REJECTED)
    last_prompt = (seg == PROMPT).sum(1, keepdim=True) - 1
    predictor = torch.where(first_rejected, last_prompt.expand(b, t), predictor)
    target = (seg == CHOSEN) | (seg == REJECTED)
    rows, cols = target.nonzero(as_tuple=True)
    logps = token_logps(hidden[rows, predictor[rows, cols]], base.get_output_embeddings(),
                        batch["input_ids"][rows, cols], chunk_size)
    is_chosen = (seg[rows, cols] == CHOSEN).to(logps.dtype)
    chosen = torch.zeros(b, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps * is_chosen)
    rejected = torch.zeros_like(chosen).index_add(0, rows, logps * (1 - is_chosen))
    if average:
        chosen = chosen / (seg == CHOSEN).sum(1).clamp(min=1)
        rejected = rejected / (seg == REJECTED).sum(1).clamp(min=1)
    return chosen, rejected


def pair_logps(model, batch: dict, *, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs [B] of a `PairCollator` batch, packed or plain."""
    if "packed" in batch:
        return packed_logps(model, batch["packed"], average=average)
    return sequence_logps(model, batch["sequences"], average=average).chunk(2)


def completion_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) completion token counts [B] of a `PairCollator` batch."""
    if "packed" in batch:
        seg = batch["packed"]["segments"]
        return (seg == CHOSEN).sum(1), (seg == REJECTED).sum(1)
    return batch["sequences"]["completion_mask"][:, 1:].sum(1).chunk(2)
