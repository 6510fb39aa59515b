"""Image features encoded once per prompt and reused by every DPO step that trains on it.

The vision tower (and its projector) is frozen, so a prompt's image features are the same at
every step of every round. The round's reference pass is the first to need them: it encodes
each prompt's images once, the features are kept (in CPU memory, bounded, least recently used
dropped first) and the steps hand them to the model through transformers' own kwarg for
precomputed encoder outputs, ``mm_encoder_outputs={"image": ...}`` (what
``get_image_features(..., return_dict=True)`` returns). A step whose features are all kept
never runs nor back-propagates through the vision tower; a prompt beyond the bound is encoded
again, without gradient, in the step's precision context.

The reference pass and the steps read the *same* stored tensors, computed in the training
step's precision context (`rdpo.rounds.with_reference_logps` runs in it), so a round's first
step still starts at loss ln 2 in every precision. Features are per process: under DDP and
DeepSpeed each rank keeps those of its own pairs.

Mllama reads its images through cross-attention layers, not placeholder tokens: its trunk takes
the projected vision output precomputed as ``cross_attention_states`` ([rows × images × tiles,
patches, hidden]). The cache keeps each prompt's [images, tiles, patches, hidden] block and a
step lays the blocks out as the batch's pixels are. An image slot a prompt lacks (a batch of
prompts with different image counts) gets what the tower computes for an empty slot (zero
pixels, aspect ratio id 0), encoded once, so a cached batch holds what the uncached one does.
No token reads that block: the processor's mask closes the slot to the tokens that see an image,
and `rdpo.engine.image_slots` closes it to the tokens blind to every image (which transformers would
let average over every slot of their row, empty ones included).

A model that cannot use precomputed features (no ``get_image_features``, a forward without
``mm_encoder_outputs`` or Mllama's ``cross_attention_states``, or a trainable weight outside the
language model: a LoRA target in the vision tower) runs the vision tower in every step as
before; `vision_cache_support` gives the reason and it is logged once.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from rdpo.families import unwrap

log = logging.getLogger(__name__)



# Fields of a vision output no language model reads back from precomputed features here (the
# tower's per-layer states and its pre-projection output): not kept.
_DROPPED = ("last_hidden_state", "hidden_states", "attentions")
# Families whose forward reads the vision tower's last hidden state from precomputed outputs.
_NEEDS_LAST_HIDDEN = ("blip-2", "instructblip", "fuyu", "llama4")


def _cross_attention(trunk) -> bool:
    """Whether `trunk` (Mllama's) reads its images as precomputable ``cross_attention_states``."""
    return ("cross_attention_states" in inspect.signature(trunk.forward).parameters
            and hasattr(trunk, "vision_model") and hasattr(trunk, "multi_modal_projector"))


def vision_cache_support(model) -> str | None:
    """None when `model` can take precomputed image features, else the reason it cannot."""
    base = unwrap(model)
    trunk = getattr(base, "model", None)
    if trunk is None:
        return f"{type(base).__name__} has no model trunk"
    if not _cross_attention(trunk):
        if not hasattr(trunk, "get_image_features"):
            return f"{type(base).__name__} has no model.get_image_features"
        if "mm_encoder_outputs" not in inspect.signature(trunk.forward).parameters:
            return f"{type(trunk).__name__}.forward takes no mm_encoder_outputs"
    if getattr(base.config, "model_type", None) in _NEEDS_LAST_HIDDEN:
        return f"{base.config.model_type} reads the vision tower's hidden states back"
    # Everything outside the language model (vision tower, projector) must be frozen and carry
    # no adapter, or its features would change while the steps reuse them.
    decoder = trunk.get_decoder() if hasattr(trunk, "get_decoder") else None
    inside = {id(m) for m in decoder.modules()} if decoder is not None else set()
    for name, module in trunk.named_modules():
        if id(module) in inside:
            continue
        if hasattr(module, "lora_A"):
            return f"LoRA layer {name} is outside the language model"
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                return f"{name}.{pname} trains, outside the language model"
    return None


class BatchImages:
    """Which prompt each row of a collated batch shows (its cache key and its own processor
    encoding), so the step can look its image features up.

    A plain object with a no-op ``to``: Lightning's device transfer and precision conversion
    leave it as it is; the features move to the device when they are used.
    """

    def __init__(self, cache: VisionCache, keys: Sequence[str], encodings: Sequence[dict]):
        self.cache = cache
        self.keys = list(keys)
        self.encodings = list(encodings)

    def to(self, *args, **kwargs) -> BatchImages:
        return self


class VisionCache:
    """Image features by prompt content (`rdpo.pool.PromptRecord.content_key`: never a record id
    alone, which two pools may share), least recently used dropped first beyond `max_mb` MB
    (0: nothing kept, every step encodes its images, without gradient)."""

    def __init__(self, max_mb: float = 1024):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[str, tuple[dict, int]] = OrderedDict()
        self._support: dict[int, str | None] = {}
        self._empty: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def supports(self, model) -> bool:
        """Whether `model` can take cached features (checked once per model, fallback logged)."""
        if id(model) not in self._support:
            reason = vision_cache_support(model)
            if reason:
                log.warning("vision cache off (%s): every step runs the vision tower", reason)
            self._support[id(model)] = reason
        return self._support[id(model)] is None

    def _put(self, key: str, fields: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in _tensors(fields))
        if size > self.max_bytes:
            return
        self._items[key] = (fields, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def features(self, trunk, images: BatchImages, like: torch.Tensor | None,
                 device: torch.device) -> tuple[type, list[dict]]:
        """(output class, per-row feature fields on `device`), encoding the prompts not kept.

        `like`: the batch's own ``pixel_values`` (device and dtype after the precision plugin's
        conversion), so an image encoded here sees the input the uncached step would."""
        rows, out_type = [], None
        for key, encoding in zip(images.keys, images.encodings, strict=True):
            if "pixel_values" not in encoding:
                continue  # a prompt without images
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                fields, _ = self._items[key]
            else:
                self.misses += 1
                fields = self._encode(trunk, encoding, like, device)
                self._put(key, fields)
            out_type = fields["__class__"]
            rows.append({k: _move(v, device) for k, v in fields.items() if k != "__class__"})
        return out_type, rows

    def empty_slot(self, trunk, like: torch.Tensor) -> torch.Tensor:
        """Mllama: the [tiles, patches, hidden] block the tower gives an empty image slot of a
        batch whose pixels are `like` (kept, one per pixel shape and dtype)."""
        key = (tuple(like.shape[2:]), like.dtype, like.device)
        if key not in self._empty:
            tiles = like.shape[2]
            encoding = {"pixel_values": like.new_zeros((1, 1, *like.shape[2:])),
                        "aspect_ratio_ids": torch.zeros((1, 1), dtype=torch.long),
                        "aspect_ratio_mask": torch.zeros((1, 1, tiles), dtype=torch.long)}
            block = self._encode(trunk, encoding, like, like.device)["cross_attention_states"]
            self._empty[key] = block[0].to(like.device)
        return self._empty[key]

    @torch.no_grad()
    def _encode(self, trunk, encoding: dict, like: torch.Tensor | None, device) -> dict:
        cross = _cross_attention(trunk)
        encoder = trunk.vision_model if cross else trunk.get_image_features
        params = inspect.signature(encoder.forward if cross else encoder).parameters
        kwargs = {}
        for k, v in encoding.items():
            if k in params and isinstance(v, torch.Tensor):
                v = v.to(device)
                if v.is_floating_point() and like is not None:
                    v = v.to(like.dtype)
                kwargs[k] = v
        if cross:
            # MllamaModel.forward's own two lines: the projected last hidden state, here
            # [images, tiles, patches, hidden] of the one prompt.
            states = trunk.multi_modal_projector(encoder(**kwargs).last_hidden_state)
            return {"cross_attention_states": states[0].detach().to("cpu"), "__class__": None}
        out = trunk.get_image_features(**kwargs, return_dict=True)
        fields = {k: _move(v, "cpu") for k, v in out.items()
                  if k not in _DROPPED and v is not None}
        fields["__class__"] = type(out)
        return fields


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, list | tuple):
        return type(value)(_move(v, device) for v in value)
    return value


def _join(values: list):
    """Per-row values of one field joined as a batch would hold them: tensors concatenated on
    dim 0 (images), sequences of per-image tensors chained, per-layer lists joined per layer."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, 0)
    if isinstance(first, list | tuple) and first and isinstance(first[0], torch.Tensor):
        return type(first)(t for v in values for t in v)
    if isinstance(first, list | tuple):
        return type(first)(_join([v[i] for v in values]) for i in range(len(first)))
    return first


def trunk_inputs(model, inputs: dict) -> dict:
    """The model trunk's inputs for a collated batch: when the batch says which prompts it shows
    (``images``, a `BatchImages`) and the model can take them, the image features (cached, or
    encoded without gradient) replace the pixels as ``mm_encoder_outputs`` (Mllama:
    ``cross_attention_states``)."""
    images = inputs.pop("images", None)
    if images is None or not images.cache.supports(model) or "pixel_values" not in inputs:
        return inputs
    if "pixel_values_videos" in inputs:
        # Qwen-VL takes precomputed features or pixels, not both: a batch with a video prompt
        # (rdpo.pool's "video" records) runs the vision tower.
        return inputs
    trunk = unwrap(model).model
    pixels = inputs["pixel_values"]
    if _cross_attention(trunk):
        return _cross_attention_inputs(trunk, images, inputs)
    out_type, rows = images.cache.features(trunk, images, pixels, inputs["input_ids"].device)
    if not rows:
        return inputs
    joined = {k: _join([r[k] for r in rows]) for k in rows[0]}
    params = inspect.signature(trunk.get_image_features).parameters
    # Inputs only the vision tower reads (pixels and their masks) go; the rest (image grid
    # sizes, which Qwen's rotary positions also need) stays.
    inputs = {k: v for k, v in inputs.items() if not (k in params and k.startswith("pixel_"))}
    inputs["mm_encoder_outputs"] = {"image": out_type(**joined)}
    return inputs


def _cross_attention_inputs(trunk, images: BatchImages, inputs: dict) -> dict:
    """Mllama: the rows' cached [images, tiles, patches, hidden] blocks laid out as the batch's
    pixels are (`rdpo.engine.encode.pad_to`: a prompt's missing image slots at the end, given the
    empty slot's block), as the ``cross_attention_states`` the trunk would compute from them."""
    pixels = inputs["pixel_values"]  # [rows, images, tiles, channels, height, width]
    if sum("pixel_values" in e for e in images.encodings) != pixels.shape[0]:
        return inputs  # a row without images: its slots exist only in the pixels' layout
    if any(e["pixel_values"].shape[2:] != pixels.shape[2:] for e in images.encodings):
        # The processor pads every image to max_image_tiles; tiles padded later would change
        # the image's own features (its tiles attend to each other).
        return inputs
    _, rows = images.cache.features(trunk, images, pixels, inputs["input_ids"].device)
    states = [r["cross_attention_states"] for r in rows]
    missing = [pixels.shape[1] - s.shape[0] for s in states]
    if any(missing):
        empty = images.cache.empty_slot(trunk, pixels)
        states = [torch.cat([s, empty.expand(n, *empty.shape)]) if n else s
                  for s, n in zip(states, missing, strict=True)]
    batch = torch.stack(states)
    inputs = {k: v for k, v in inputs.items()
              if k not in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    inputs["cross_attention_states"] = batch.reshape(-1, *batch.shape[-2:])
    return inputs
