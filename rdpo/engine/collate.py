"""A round's DPO pairs (`rdpo.pairs.TrainPair`) collated into model batches: packed
``[prompt, chosen, rejected]`` rows or two padded sequences per pair (no Lightning here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rdpo.engine.encode import Completion, PromptCache, collate_sequences
from rdpo.engine.packing import pack_pairs
from rdpo.engine.vision_cache import BatchImages, VisionCache
from rdpo.pairs import TrainPair
from rdpo.pool import PromptRecord


class PairCollator:
    """Collates `TrainPair`s into one DPO batch.

    With ``packed`` (the default) each pair is one row ``[prompt, chosen, rejected]`` that
    carries the image and the prompt once (`rdpo.engine.packing`); otherwise the batch holds 2B
    sequences, the chosen ones then the rejected. Prompt encodings come from `prompts`, a
    bounded cache shared with the rollout (a round reuses each prompt for several steps).
    With `vision` (`rdpo.engine.vision_cache.VisionCache`) a batch also says which prompt each row
    shows, and the log-prob functions reuse those prompts' image features: the reference pass
    encodes each image once and the steps never run the vision tower.
    """

    def __init__(self, processor, packed: bool = True, prompts: PromptCache | None = None,
                 vision: VisionCache | None = None):
        self.processor = processor
        self.packed = packed
        self.prompts = prompts if prompts is not None else PromptCache(processor)
        self.vision = vision

    def _images(self, records: Sequence[PromptRecord], prompts: list[dict]) -> BatchImages:
        return BatchImages(self.vision, [r.content_key for r in records], prompts)

    def sequences(self, records: Sequence[PromptRecord], completions: Sequence[Completion]) -> dict:
        """A right-padded batch of prompt + completion sequences (supervised fine-tuning)."""
        return collate_sequences(self.processor, [self.prompts.get(r) for r in records],
                                 completions)

    def pairs(self, records: Sequence[PromptRecord], chosen: Sequence[Completion],
              rejected: Sequence[Completion]) -> dict:
        """The model inputs of B pairs: ``{"packed": ...}`` or ``{"sequences": ...}``."""
        prompts = [self.prompts.get(r) for r in records]
        if self.packed:
            batch = pack_pairs(self.processor, prompts, chosen, rejected)
            if self.vision is not None:
                batch["images"] = self._images(records, prompts)
            return {"packed": batch}
        batch = collate_sequences(self.processor, prompts * 2, [*chosen, *rejected])
        if self.vision is not None:
            batch["images"] = self._images([*records, *records], prompts * 2)
        return {"sequences": batch}

    def __call__(self, items: list[TrainPair | None]) -> dict:
        pairs = [p for p in items if p is not None]
        if not pairs:
            # A rank whose round kept no pair still takes its steps (see RoundDataset).
            return {"empty": True}
        chosen, rejected = zip(*(p.completions for p in pairs), strict=True)
        batch = self.pairs([p.record for p in pairs], chosen, rejected)
        # Plain floats, not tensors: a precision plugin converts every floating tensor of a batch
        # to its dtype (bf16-true, DeepSpeed bf16), and a log-prob of -40 in bf16 is off by up
        # to 0.125 nats. `reference_tensors` makes float32 tensors of them inside the step.
        batch["ref_chosen_logps"] = [p.ref_chosen_logp for p in pairs]
        batch["ref_rejected_logps"] = [p.ref_rejected_logp for p in pairs]
        return batch


def reference_tensors(batch: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's reference log-probs (chosen, rejected) as float32 tensors on `like`'s device."""
    return tuple(torch.tensor(batch[k], dtype=torch.float32, device=like.device)
                 for k in ("ref_chosen_logps", "ref_rejected_logps"))
