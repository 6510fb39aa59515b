"""The Lightning strategy and cluster plugins a run config asks for.

DeepSpeed is configured one way: `deepspeed_config` builds the JSON dict from the run config
(no files under configs/ to keep in step with it): ``run.strategy=deepspeed`` with
``run.deepspeed_stage`` and ``run.deepspeed_offload``. Lightning's own names
(``deepspeed_stage_2``, ...) are refused by the config check, since they would build another
DeepSpeed config that ignores those keys. Lightning fills in what the other strategies also
read: accumulation (data.accumulate_grad_batches), clipping (dpo.grad_clip, by norm) and
precision (run.precision).

On CPU ranks (``run.accelerator=cpu``) `make_strategy` gives `DeepSpeedAnyDevice`: the same
DeepSpeed engine, ZeRO stages and config, over gloo, with DeepSpeed's CPU accelerator
(``DS_ACCELERATOR=cpu``). It is a rehearsal of a GPU run (tests/test_deepspeed.py trains ZeRO-2
and ZeRO-3 on two CPU ranks), not a way to train fast.

``run.strategy=ddp`` is Lightning's DDP with one change, `sum_each_gradient`, so that a run
resumed on several ranks ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from rdpo.config import DEEPSPEED, Config, ConfigError

log = logging.getLogger("rdpo")


def deepspeed_config(cfg: Config, hidden_size: int | None = None) -> dict:
    """The DeepSpeed config of a run: ZeRO stage, offload, micro-batch size. `hidden_size`: the
    language model's, which sets ZeRO-3's persistence threshold (DeepSpeed's default without)."""
    run = cfg.run
    zero: dict = {
        "stage": run.deepspeed_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if run.deepspeed_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if run.deepspeed_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if run.deepspeed_stage == 3 and hidden_size:
        # Weights this small stay whole on every rank (biases, norms); the rest is sliced.
        # 10 x hidden is transformers' "auto" value; a fixed 1e5 would keep every weight of
        # a small model whole, and ZeRO-3 would shard nothing.
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        # rdpo's optimizer is torch AdamW over the trainable (adapter) weights only.
        "zero_allow_untested_optimizer": True,
    }
    return config


def make_strategy(cfg: Config, model=None):
    """`run.strategy` as Lightning takes it: the name, a configured `DeepSpeedAnyDevice`, or
    for ``ddp`` Lightning's DDP whose gradients are averaged by `sum_each_gradient`. `model`:
    the policy (its hidden size tunes ZeRO-3)."""
    if cfg.run.strategy == "ddp":
        return DDPSumEachGradient()
    if cfg.run.strategy != DEEPSPEED:
        return cfg.run.strategy
    select_deepspeed_accelerator(cfg)
    # Checkpoints leave the frozen base out (it comes back from model.path), as
    # `RoundCheckpoint` does for the other strategies.
    return DeepSpeedAnyDevice(config=deepspeed_config(cfg, _hidden_size(model)),
                              exclude_frozen_parameters=True)


def _hidden_size(model) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return getattr(config.get_text_config(), "hidden_size", None)


def _on_cpu(cfg: Config) -> bool:
    return cfg.run.accelerator == "cpu" or (cfg.run.accelerator == "auto"
                                            and not torch.cuda.is_available())


def select_deepspeed_accelerator(cfg: Config) -> None:
    """DeepSpeed picks its accelerator (cuda, cpu, ...) once, when it is first imported, from
    ``DS_ACCELERATOR`` or by detection (CUDA when a GPU is visible): set it for a CPU run before
    that, and refuse a DeepSpeed already imported for another accelerator."""
    want = "cpu" if _on_cpu(cfg) else "cuda"
    if want == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        raise ConfigError([f"run.accelerator={cfg.run.accelerator}: DS_ACCELERATOR="
                           f"{os.environ['DS_ACCELERATOR']} is set in the environment; unset it "
                           f"(or set run.accelerator=cpu for a CPU rehearsal)"])
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        got = get_accelerator().device_name()
        if got != want:
            raise ConfigError([f"run.accelerator={cfg.run.accelerator}: DeepSpeed was already "
                               f"imported in this process for the {got} accelerator; start a new "
                               f"process (DS_ACCELERATOR={want} is set before the import)"])


class DeepSpeedAnyDevice(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, on CUDA as Lightning has it, and also on CPU ranks.

    Lightning refuses any accelerator but CUDA in `setup_environment` and wants device indices
    0..N-1 in `setup_distributed`; a CPU device has no index. On CPU both checks are skipped
    and each rank's root device is ``cpu:LOCAL_RANK`` (DeepSpeed reads the index as the rank's
    device; torch places tensors on the one CPU whatever the index). Everything else, the
    engine, ZeRO partitioning, the optimizer and the checkpoints, is DeepSpeed's own."""

    def _cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._cpu():
            super().setup_environment()
            return
        DDPStrategy.setup_environment(self)  # Strategy's, then setup_distributed below
        if self.is_global_zero:
            log.info("DeepSpeed ZeRO-%d on %d CPU rank(s) (gloo, DeepSpeed's CPU accelerator): "
                     "a rehearsal of a GPU run, the same config and code path, not a fast way "
                     "to train", self.config["zero_optimization"]["stage"], self.world_size)

    def setup_distributed(self) -> None:
        if not self._cpu():
            super().setup_distributed()
            return
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        return torch.device("cpu", self.local_rank) if device.type == "cpu" else device


def is_deepspeed(trainer) -> bool:
    return isinstance(trainer.strategy, DeepSpeedStrategy)


@contextlib.contextmanager
def full_weights(trainer, model, *, trainable_only: bool = False):
    """Under DeepSpeed ZeRO-3, the whole weights of `model` (or its trainable ones) on every
    rank for the duration, released (sliced again) on exit; a no-op under any other strategy.
    Collective: every rank enters, at the same point.

    ZeRO-3 normally gathers a module's weights just before its forward and frees them after,
    in collectives with the other ranks, so every rank must run the same forwards. Rollouts,
    the held-out evaluation and the reference pass run each rank's own prompts and pairs, as
    many forwards as they need (a sampled answer ends when it ends), so the weights are
    gathered once here and ZeRO-3's per-module hooks are off meanwhile (otherwise the first
    forward would free the gathered weights and the next would gather alone: a hang)."""
    if not getattr(trainer.strategy, "zero_stage_3", False):
        yield
        return
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    offload = None if trainable_only else _parameter_offload(trainer.strategy.deepspeed_engine)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if offload is not None:
            _remove_zero3_hooks(offload)
        try:
            yield
        finally:
            if offload is not None:
                # Registered again as the engine registered them (the module trace restarts).
                offload._register_deepspeed_module(offload.module)


def _parameter_offload(engine):
    """ZeRO-3's module-hook owner (`DeepSpeedZeRoOffload`) of a `DeepSpeedEngine`."""
    optimizer = engine.optimizer
    return getattr(optimizer, "parameter_offload", optimizer)


def _remove_zero3_hooks(offload) -> None:
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    for param in iter_params(offload.module, recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


class DDPSumEachGradient(DDPStrategy):
    """Lightning's DDP strategy with `sum_each_gradient` as DDP's communication hook (Lightning
    registers hooks on CUDA only; this one on every device)."""

    def configure_ddp(self) -> None:
        super().configure_ddp()
        self.model.register_comm_hook(None, sum_each_gradient)


def sum_each_gradient(group, bucket):
    """DDP communication hook: average each parameter's gradient over the ranks in a collective
    of its own, not the bucket's gradients in one.

    A ring all-reduce splits its buffer in one chunk per rank, and the chunk decides the order
    in which the ranks' values are added. DDP lays a bucket out in parameter order for the first
    step of a process and in the order backward produced the gradients after it, so with more
    than two ranks the first step after every start (a resume, a requeue) adds in another order
    than an uninterrupted run does at that step: the weights part in the last bits. Reduced one
    by one, a gradient is added the same way whatever the layout. The gradients of a LoRA
    adapter are small: the extra collectives cost little."""
    import torch
    import torch.distributed as dist

    group = group or dist.group.WORLD
    futures = [dist.all_reduce(grad, group=group, async_op=True).get_future()
               for grad in bucket.gradients()]  # views into the bucket's buffer
    world = dist.get_world_size(group)
    return torch.futures.collect_all(futures).then(lambda _: bucket.buffer().div_(world))


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its own requeue handler, because
    `RoundCheckpoint` handles the preemption signal at a step boundary on every rank and the
    batch script requeues (``slurm/fit.sbatch``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []
