"""The Lightning strategy and cluster plugins a run config asks for.

DeepSpeed is configured one way: `deepspeed_config` builds the JSON dict from the run config
(no files under configs/ to keep in step with it): ``run.strategy=deepspeed`` with
``run.deepspeed_stage`` and ``run.deepspeed_offload``. Lightning's own names
(``deepspeed_stage_2``, ...) are refused by the config check, since they would build another
DeepSpeed config that ignores those keys. Lightning fills in what the other strategies also
read: accumulation (data.accumulate_grad_batches), clipping (dpo.grad_clip, by norm) and
precision (run.precision).
"""

from __future__ import annotations

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
    """`run.strategy` as Lightning takes it: the name, or a configured `DeepSpeedStrategy`."""
    if cfg.run.strategy != DEEPSPEED:
        return cfg.run.strategy
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(cfg))


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its own requeue handler, because
    `RoundCheckpoint` handles the preemption signal at a step boundary on every rank and the
    batch script requeues (``slurm/fit.sbatch``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []
