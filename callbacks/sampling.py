"""Sampling from the policy as it trains, for the round and the held-out evaluation: in the
trainer's precision context, weights gathered under DeepSpeed ZeRO-3, from a generator seeded
per (seed, round, rank), with the transformers engine or through a vLLM server."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import lightning as L
import torch

from rdpo.config import RolloutConfig
from rdpo.rollout import Rollout, generate
from rdpo.strategy import full_weights


def round_seed(seed: int, round_index: int, rank: int) -> int:
    """The sampling seed of one rank's rollout in one round.

    Sampling draws from a generator seeded here rather than from the global stream, so a round's
    responses depend only on (seed, round, rank) and the policy's weights: a run resumed from a
    checkpoint samples exactly what the uninterrupted run sampled.
    """
    digest = hashlib.sha256(f"{seed}:{round_index}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample(trainer: L.Trainer, pl_module: L.LightningModule, records, rollout: RolloutConfig, *,
           seed: int, num_samples: int | None = None, prompts=None, server=None,
           progress=None) -> list:
    """Rollouts of `records` from the policy as it trains: in the trainer's precision context,
    weights gathered under ZeRO-3, from a generator seeded with `seed` (the global RNG is left
    as it was). With `server` (a `VLLMRollout`), the policy's adapter is published to the
    server (collective: every rank calls this) and the server samples, seeded per prompt.
    `progress(n)` is told of every n responses sampled (the console's progress display)."""
    if server is not None:
        publish(trainer, pl_module, server)
        rollouts = server_rollouts(pl_module, records, rollout, seed=seed,
                                    num_samples=num_samples, prompts=prompts, server=server)
    else:
        rollouts = iter_sample(trainer, pl_module, records, rollout, seed=seed,
                               num_samples=num_samples, prompts=prompts)
    out = []
    with contextlib.closing(rollouts):
        for r in rollouts:
            out.append(r)
            if progress is not None:
                progress(len(r.responses))
    return out


def iter_sample(trainer: L.Trainer, pl_module: L.LightningModule, records,
                rollout: RolloutConfig, *, seed: int, num_samples: int | None = None,
                prompts=None) -> Iterator[Rollout]:
    """`sample` with the transformers engine, one `Rollout` at a time (a generation batch's
    prompts come together). The precision context, the gathered weights and the seeded
    generator hold while it is suspended: close it (``contextlib.closing``) if it is left
    before its end."""
    device = next(pl_module.model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            gathered_for_generation(trainer, pl_module.model), \
            trainer.precision_plugin.forward_context():
        torch.manual_seed(seed)
        yield from generate(pl_module.model, pl_module.processor, records, rollout,
                            num_samples=num_samples, prompts=prompts)


def publish(trainer, pl_module, server, step: int | None = None) -> None:
    with gathered_for_generation(trainer, pl_module.model):
        server.publish(pl_module.model, trainer.global_step if step is None else step,
                       is_main=trainer.is_global_zero, barrier=trainer.strategy.barrier)


def server_rollouts(pl_module, records, rollout, *, seed, prompts, server,
                     num_samples=None) -> Iterator[Rollout]:
    from rdpo.rollout import stop_token_ids, suppressed_token_ids

    model, processor = pl_module.model, pl_module.processor
    return server.iter_sample(processor, records, rollout,
                              stop_ids=stop_token_ids(processor, model),
                              suppress_ids=suppressed_token_ids(processor), seed=seed,
                              num_samples=num_samples, prompts=prompts)



def gathered_for_generation(trainer: L.Trainer, model):
    """Under DeepSpeed ZeRO-3 each rank holds a slice of every weight, and each rank samples
    its own prompts for as many tokens as they take: the weights are gathered once for the
    whole rollout (`rdpo.strategy.full_weights`)."""
    return full_weights(trainer, model)


__all__ = ["gathered_for_generation", "iter_sample", "publish", "round_seed", "sample",
           "server_rollouts"]
