"""On-policy sampling: a generator of K responses per prompt from the current policy."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rdpo.collate import encode_prompt, end_of_turn_id, pad_batch
from rdpo.pool import PromptRecord

# Sampling one of these would start a new image inside the answer; Qwen-VL's processor and
# rotary indexing then misread the sequence, so they are suppressed during generation.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class Rollout:
    """The responses sampled for one prompt."""

    record: PromptRecord
    responses: list[str]


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: K responses per prompt, at most `max_new_tokens` each."""

    num_samples: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16


def suppressed_token_ids(processor) -> list[int]:
    vocab = processor.tokenizer.get_vocab()
    return [vocab[t] for t in VISION_TOKENS if t in vocab]


@torch.no_grad()
def generate(model, processor, records: Sequence[PromptRecord], settings: SamplingSettings,
             prompt_cache: dict | None = None) -> Iterator[Rollout]:
    """Yield one `Rollout` per record, sampling ``settings.num_samples`` responses each.

    Prompts are left-padded and batched (KV cache on); ``temperature == 0`` means greedy decoding
    (then a single distinct response is repeated K times, so use K = 1).
    """
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    greedy = settings.temperature == 0
    gen_kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not greedy,
        num_return_sequences=settings.num_samples,
        eos_token_id=end_of_turn_id(processor),
        pad_token_id=tok.pad_token_id,
        suppress_tokens=suppressed_token_ids(processor),
        use_cache=True,
    )
    if not greedy:
        gen_kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    try:
        for start in range(0, len(records), settings.batch_size):
            chunk = records[start:start + settings.batch_size]
            prompts = []
            for record in chunk:
                if prompt_cache is not None and record.id in prompt_cache:
                    prompts.append(prompt_cache[record.id])
                else:
                    prompts.append(encode_prompt(processor, record))
                    if prompt_cache is not None:
                        prompt_cache[record.id] = prompts[-1]
            batch = pad_batch(prompts, tok.pad_token_id, side="left")
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**batch, **gen_kwargs)
            texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            k = settings.num_samples
            for i, record in enumerate(chunk):
                yield Rollout(record, [t.strip() for t in texts[i * k:(i + 1) * k]])
    finally:
        model.train(was_training)
