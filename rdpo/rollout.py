"""On-policy sampling: a generator of K responses per prompt from the current policy.

Each response keeps the token ids the policy sampled and why sampling ended: ``stop`` (an
end-of-sequence token, which is kept as the last id) or ``length`` (cut at ``max_new_tokens``).
Training uses those ids as they are; the decoded text is for the judge and the artifacts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from rdpo.config import RolloutConfig
from rdpo.engine.encode import PromptCache, end_of_turn_id, pad_batch
from rdpo.engine.image_slots import isolate_image_slots
from rdpo.engine.logps import unwrap
from rdpo.families import vision_token_ids
from rdpo.pool import PromptRecord

STOP, LENGTH = "stop", "length"


@dataclass(frozen=True)
class Rollout:
    """The responses sampled for one prompt: text, sampled ids and finish reason of each."""

    record: PromptRecord
    responses: list[str]
    token_ids: list[tuple[int, ...]] = field(default_factory=list)
    """The ids sampled for each response (a final end-of-sequence id included when it stopped)."""
    finish_reasons: list[str] = field(default_factory=list)
    """``stop`` or ``length`` per response."""

    @property
    def truncated(self) -> list[bool]:
        return [reason == LENGTH for reason in self.finish_reasons] or [False] * len(self.responses)


def suppressed_token_ids(processor) -> list[int]:
    """Ids never sampled: the image/video special tokens (`rdpo.families.vision_token_ids`).
    A sampled one would be read as the start of an image when the answer is trained on."""
    return vision_token_ids(processor)


def stop_token_ids(processor, model) -> list[int]:
    """Every id that ends a turn: the chat template's end of turn, the tokenizer's end of
    sequence, and the end-of-sequence ids of the checkpoint's generation config."""
    ids = [end_of_turn_id(processor), processor.tokenizer.eos_token_id]
    gen = getattr(unwrap(model), "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return sorted({int(i) for i in ids if i is not None})


def generation_config(processor, model, settings: RolloutConfig, num_samples: int):
    """The whole `GenerationConfig` of a rollout, built from rdpo's settings alone.

    Every sampling knob is set explicitly; `sampling_context` hides the checkpoint's own
    generation_config from ``generate``, which would otherwise fill in whatever is unset here
    (a repetition penalty or min_p of an Instruct checkpoint silently changes the samples).
    """
    from transformers import GenerationConfig

    greedy = settings.temperature == 0
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not greedy,
        num_return_sequences=num_samples,
        temperature=1.0 if greedy else settings.temperature,
        top_p=1.0 if greedy else settings.top_p,
        top_k=0 if greedy else settings.top_k,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=stop_token_ids(processor, model),
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=suppressed_token_ids(processor) or None,
        use_cache=True,
    )


@contextlib.contextmanager
def sampling_context(model):
    """The model in eval mode with an empty generation config for the duration."""
    from transformers import GenerationConfig

    base = unwrap(model)
    saved, was_training = getattr(base, "generation_config", None), model.training
    base.generation_config = GenerationConfig()
    model.eval()
    try:
        yield
    finally:
        base.generation_config = saved
        model.train(was_training)


def split_sample(ids: Sequence[int], stop_ids: set[int]) -> tuple[tuple[int, ...], str]:
    """A generated row cut after its first stop id (``stop``), or whole (``length``)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return tuple(ids[:i + 1]), STOP
    return tuple(ids), LENGTH


@torch.no_grad()
def generate(model, processor, records: Sequence[PromptRecord], settings: RolloutConfig,
             num_samples: int | None = None, prompts: PromptCache | None = None
             ) -> Iterator[Rollout]:
    """Yield one `Rollout` per record with `num_samples` (default ``settings.samples_per_prompt``)
    responses each.

    Prompts are left-padded and batched (``settings.batch_size`` prompts, KV cache on);
    ``temperature == 0`` means greedy decoding (then K identical responses, so use K = 1).
    `prompts` caches the encoded prompts across calls.
    """
    tok = processor.tokenizer
    k = num_samples or settings.samples_per_prompt
    config = generation_config(processor, model, settings, k)
    stops = set(config.eos_token_id)
    prompts = prompts if prompts is not None else PromptCache(processor, max_mb=0)
    device = next(model.parameters()).device
    # Mllama: a prompt samples from the distribution it has alone, whatever its batch pads.
    isolate_image_slots(model)
    with sampling_context(model):
        for start in range(0, len(records), settings.batch_size):
            chunk = records[start:start + settings.batch_size]
            batch = pad_batch([prompts.get(r) for r in chunk], tok.pad_token_id, side="left")
            batch = {key: v.to(device) for key, v in batch.items()}
            out = model.generate(**batch, generation_config=config)
            rows = out[:, batch["input_ids"].shape[1]:].tolist()
            for i, record in enumerate(chunk):
                samples = [split_sample(row, stops) for row in rows[i * k:(i + 1) * k]]
                ids = [s[0] for s in samples]
                texts = tok.batch_decode([s[:-1] if r == STOP else s for s, r in samples],
                                         skip_special_tokens=True)
                yield Rollout(record, [t.strip() for t in texts], ids, [r for _, r in samples])
