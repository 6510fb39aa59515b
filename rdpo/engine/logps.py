"""Completion log-probabilities without materialising ``[batch, seq, vocab]`` logits.

The policy's trunk runs once to hidden states; only the positions that predict completion
tokens are projected through the output layer, a chunk of rows at a time, so peak memory is
``chunk_size × vocab`` instead of ``completion_tokens × vocab``. Under autograd:

- a frozen output layer (LoRA, QLoRA): each chunk's gradient with respect to its hidden rows,
  ``W[target] - softmax(logits) @ W``, is computed in the forward pass while the logits are at
  hand (`_FrozenHeadLogps`), and only that ``[rows, hidden]`` tensor is kept: the backward pass
  neither recomputes nor stores logits, and the ``[rows, vocab]`` work is one projection, one
  softmax and one product instead of the checkpointed path's two projections, two softmaxes and
  a product;
- a trainable one (full fine-tuning): each chunk is checkpointed, the backward pass recomputing
  one chunk's logits at a time.

The log-probs themselves are computed by the same operations on every path (`_chunk_logps`), so
the reference pass (no gradient) and a training step agree exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rdpo.engine.image_slots import isolate_image_slots
from rdpo.engine.vision_cache import trunk_inputs
from rdpo.families import unwrap  # noqa: F401  (public here: callers import it from rdpo.engine.logps)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor) -> torch.Tensor:
    logits = nn.functional.linear(hidden, weight, bias).float()
    # gather - logsumexp instead of log_softmax: no second [rows, vocab] tensor.
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """`_chunk_logps` for an output layer that does not train, its input gradient precomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        logits = nn.functional.linear(hidden, weight, bias)
        compute = logits.dtype
        logits = logits.float()
        lse = logits.logsumexp(-1)
        logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        # d logp / d hidden = W[target] - softmax(logits) @ W; the softmax overwrites the logits.
        probs = logits.sub_(lse[:, None]).exp_().to(compute)
        grad = weight[targets].to(compute) - probs @ weight.to(compute)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad_out[:, None].to(grad.dtype) * grad).to(ctx.hidden_dtype), None, None, None


def _frozen(lm_head: nn.Module) -> bool:
    return not lm_head.weight.requires_grad and (lm_head.bias is None or not lm_head.bias.requires_grad)


# Elements of one chunk's logits: 2^24 float32 values are 64 MiB, so with Qwen's 152k vocabulary
# a chunk is ~110 rows, and its log-softmax and gradient stay within a few hundred MiB.
CHUNK_ELEMENTS = 2**24


def token_logps(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor,
                chunk_size: int | None = None) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for rows hidden [N, H] and targets [N]; returns [N] float32.

    `chunk_size` rows are projected at a time (default: as many as fit `CHUNK_ELEMENTS` logits).
    """
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // lm_head.weight.shape[0])
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad and _frozen(lm_head):
            out.append(_FrozenHeadLogps.apply(h, lm_head.weight, lm_head.bias, t))
        elif torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_chunk_logps, h, lm_head.weight, lm_head.bias, t,
                                  use_reentrant=False))
        else:
            out.append(_chunk_logps(h, lm_head.weight, lm_head.bias, t))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def completion_logps(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    average: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Summed (or, with ``average``, mean) log-prob of the completion tokens of each sequence.

    hidden: [B, T, H] last hidden states; input_ids: [B, T]; completion_mask: [B, T], 1 where the
    token is part of the completion (the response and its end-of-turn token). Position t - 1
    predicts token t, so hidden states are shifted one step against the targets. Returns [B].
    """
    mask = completion_mask[:, 1:].bool()
    rows, cols = mask.nonzero(as_tuple=True)
    targets = input_ids[:, 1:][rows, cols]
    logps = token_logps(hidden[:, :-1][rows, cols], lm_head, targets, chunk_size)
    per_seq = torch.zeros(input_ids.shape[0], dtype=logps.dtype, device=logps.device)
    per_seq = per_seq.index_add(0, rows, logps)
    if average:
        per_seq = per_seq / mask.sum(1).clamp(min=1)
    return per_seq


def sequence_logps(model: nn.Module, batch: dict, *, average: bool = False,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Completion log-probs [B] of a collated batch (processor outputs + ``completion_mask``).

    Runs the multimodal trunk (``model.model`` of a transformers VLM, LoRA layers included) and
    projects only the completion positions, never the full logits. A batch that says which
    prompts it shows (``images``, `rdpo.engine.vision_cache.BatchImages`) gets their cached image
    features instead of running the vision tower. Mllama's log-probs do not depend on the image
    slots the batch pads (`rdpo.engine.image_slots`).
    """
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask",)}
    base = unwrap(model)
    isolate_image_slots(model)
    hidden = base.model(**trunk_inputs(model, inputs), use_cache=False).last_hidden_state
    return completion_logps(hidden, base.get_output_embeddings(), batch["input_ids"],
                            batch["completion_mask"], average=average, chunk_size=chunk_size)
