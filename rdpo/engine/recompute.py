"""Selective activation checkpointing of the language model (``model.gradient_checkpointing:
selective``).

Without checkpointing, a decoder layer keeps for its backward pass the inputs of every op that
needs them: each projection's input, the MLP's gate, activation and up outputs, the norms'
inputs, the rotated queries and keys, LoRA's inputs and low-rank outputs. Full checkpointing
(``true``) keeps only the layer's input and runs the whole layer forward again in the backward
pass. Selective checkpointing sits between: each layer is checkpointed, but during its forward
the outputs of the ops that are expensive to recompute are kept, so the backward pass's
recomputation re-runs only the cheap ones:

- kept: the attention kernel's outputs and every matrix product whose contraction is at least a
  quarter of its output width (the projections of the base weights, LoRA's down-projection to
  rank r): recomputing one of their elements would cost a dot product of hundreds or thousands
  of terms;
- recomputed: everything else, i.e. element-wise work (activation, gating product, norms,
  rotary embedding, residual adds, dtype casts, dequantisation) and LoRA's up-projection from
  rank r (r terms per element, and an output as wide as the base projection's).

The recomputation re-runs the layer's operations on the same inputs, so log-probs and gradients
equal those without checkpointing (dropout's random state is restored by torch's checkpoint).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from rdpo.engine import saved_memory

_aten = torch.ops.aten
_ATTENTION = {getattr(_aten, name) for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward") if hasattr(_aten, name)}


def _matmul_operands(op, args) -> tuple[torch.Tensor, torch.Tensor] | None:
    if op in (_aten.mm.default, _aten.bmm.default):
        return args[0], args[1]
    if op in (_aten.addmm.default, _aten.baddbmm.default):
        return args[1], args[2]
    return None


def keep(op, *args, **kwargs) -> bool:
    """Whether the output of `op` on `args` is kept for the backward pass (else recomputed)."""
    if op.overloadpacket in _ATTENTION:
        return True
    operands = _matmul_operands(op, args)
    if operands is None:
        return False
    a, b = operands
    return 4 * a.shape[-1] >= b.shape[-1]


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if keep(op, *args, **kwargs) else CheckpointPolicy.PREFER_RECOMPUTE


class _MeterKept(TorchDispatchMode):
    """Reports the outputs selective checkpointing keeps to a `rdpo.engine.saved_memory` meter, held
    until the region's recomputation has used them."""

    def __init__(self, meter: saved_memory.SavedTensorMeter):
        super().__init__()
        self.meter, self.held = meter, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if keep(func, *args, **kwargs):
            self.held += [self.meter.hold(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@contextlib.contextmanager
def _within(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


@contextlib.contextmanager
def _then_release(context, metered: _MeterKept):
    with context:
        yield
    metered.held.clear()


def selective_contexts():
    """The ``context_fn`` of `torch.utils.checkpoint.checkpoint` for selective checkpointing: a
    context for the forward pass (which keeps what `keep` says) and one for the recomputation."""
    forward, recompute = create_selective_checkpoint_contexts(_policy)
    meter = saved_memory.active()
    if meter is None:
        return forward, recompute
    # The meter's mode is entered first, so it runs under the caching mode and sees each output.
    # checkpoint() cannot see the caching mode inside the wrapper to pass its
    # respect_saved_tensors_hooks on: set here as `selective_checkpoint_kwargs` says.
    if hasattr(forward, "respect_saved_tensors_hooks"):
        forward.respect_saved_tensors_hooks = False
    metered = _MeterKept(meter)
    return _within(metered, forward), _then_release(recompute, metered)


def selective_checkpoint_kwargs() -> dict:
    """Keyword arguments of `torch.utils.checkpoint.checkpoint` for selective checkpointing."""
    kwargs: dict = {"context_fn": selective_contexts}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters:
        # What it keeps stays outside autograd's saved-tensor hooks, as on older torch (which
        # has no choice): `rdpo.engine.saved_memory` meters it through `_MeterKept`.
        kwargs["respect_saved_tensors_hooks"] = False
    return kwargs
