"""Activation memory of a training step: the bytes autograd holds for the backward pass.

Peak resident memory mixes the weights, the libraries and the allocator's cache; what a
trainer's design decides is how much the forward pass leaves behind for the backward. This
meter counts exactly that, the same way for any trainer: every tensor autograd saves during the
metered forward passes through a ``torch.autograd.graph.saved_tensors_hooks`` pack hook; its
storage is counted once however many views of it are saved, for as long as the graph holds it,
and weights (the model's parameters and buffers) are not counted. ``peak`` is the largest total
held at any moment, normally reached when the forward pass ends.

Gradient checkpointing shows as it should: a checkpointed region saves only its inputs (its
own hooks take over inside it, and what it recomputes during the backward lives one region at
a time, outside this count). Selective checkpointing (`rdpo.engine.recompute`) also keeps the outputs
of the ops it does not recompute, outside autograd's saved tensors; it reports them to the
active meter (`active`, `hold`), so they are counted too.
"""

from __future__ import annotations

import torch


class _Held:
    """What the graph keeps instead of the tensor: releases the storage's count when freed."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: SavedTensorMeter, key: int, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """``with meter:`` around a forward pass; `peak` bytes saved for backward, `by_shape` the
    largest contributors at the peak (``shape, dtype -> bytes``) to see what dominates.

    `exclude`: modules whose parameters and buffers are weights, not activations.
    """

    def __init__(self, *exclude: torch.nn.Module):
        self.weights = {t.untyped_storage().data_ptr() for m in exclude
                        for t in (*m.parameters(), *m.buffers())}
        self.live: dict[int, list] = {}  # storage pointer -> [count, bytes, description]
        self.bytes = 0
        self.peak = 0
        self.by_shape: dict[str, int] = {}
        self._hooks = None

    def _pack(self, tensor: torch.Tensor):
        if tensor.device.type == "meta":
            return tensor
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.weights or storage.nbytes() == 0:
            return tensor
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [0, storage.nbytes(), f"{tuple(tensor.shape)} {tensor.dtype}"]
            self.bytes += entry[1]
            if self.bytes > self.peak:
                self.peak = self.bytes
                self.by_shape = self._shapes()
        entry[0] += 1
        return _Held(self, key, tensor)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[key]

    def _shapes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, size, what in self.live.values():
            out[what] = out.get(what, 0) + size
        return out

    def top(self, n: int = 8) -> list[tuple[str, int]]:
        """The `n` largest (shape and dtype, bytes) groups held at the peak."""
        return sorted(self.by_shape.items(), key=lambda kv: -kv[1])[:n]

    def hold(self, tensor: torch.Tensor):
        """Count `tensor` as held for backward until the returned object is freed."""
        return self._pack(tensor)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        self._hooks.__exit__(*exc)


_active: list[SavedTensorMeter] = []


def active() -> SavedTensorMeter | None:
    """The innermost meter now metering a forward pass, if any."""
    return _active[-1] if _active else None
