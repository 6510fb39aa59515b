"""The Lightning strategy and cluster plugins a run config asks for.

DeepSpeed is configured one way: `deepspeed_config` builds the JSON dict from the run config
(no files under configs/ to keep in step with it): ``run.strategy=deepspeed`` with
``run.deepspeed_stage`` and ``run.deepspeed_offload``. Lightning's own names
(``deepspeed_stage_2``, ...) are refused by the config check, since they would build another
DeepSpeed config that ignores those keys. Lightning fills in what the other strategies also
read: accumulation (data.accumulate_grad_batches), clipping (dpo.grad_clip, by norm) and
precision (run.precision).

``run.strategy=ddp`` is Lightning's DDP with one change, `sum_each_gradient`, so that a run
resumed on several ranks ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy

from rdpo.config import DEEPSPEED, Config


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config of a run: ZeRO stage, offload, micro-batch size."""
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
    if run.deepspeed_stage == 3:
        # Saved adapters and checkpoints hold whole weights, not each rank's slice.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_param_persistence_threshold"] = 1e5
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        # rdpo's optimizer is torch AdamW over the trainable (adapter) weights only.
        "zero_allow_untested_optimizer": True,
    }
    return config


def make_strategy(cfg: Config):
    """`run.strategy` as Lightning takes it: the name, a configured `DeepSpeedStrategy`, or for
    ``ddp`` Lightning's DDP whose gradients are averaged by `sum_each_gradient`."""
    if cfg.run.strategy == "ddp":
        return DDPSumEachGradient()
    if cfg.run.strategy != DEEPSPEED:
        return cfg.run.strategy
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(cfg))


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
