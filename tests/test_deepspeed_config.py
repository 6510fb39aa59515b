"""DeepSpeed: the config rdpo builds (rdpo.strategy) validates against DeepSpeed's own schema, and
a CPU run gets DeepSpeed's CPU accelerator. Training: two CPU ranks in tests/test_deepspeed.py,
one GPU (ZeRO-2/3 × LoRA/QLoRA, bf16) in tests/test_gpu.py (scripts/gpu_check.sh)."""

import pytest

from rdpo.config import ConfigError, load_config
from rdpo.strategy import deepspeed_config, make_strategy

deepspeed = pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")


def _cfg(*overrides):
    return load_config("configs/quickstart.yaml", ["run.dir=unused", "run.strategy=deepspeed",
                                                   *overrides])


@pytest.mark.parametrize("stage,offload", [(2, False), (2, True), (3, False), (3, True)])
def test_config_builds_and_validates(stage, offload):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _cfg(f"run.deepspeed_stage={stage}", f"run.deepspeed_offload={offload}",
               "data.accumulate_grad_batches=2", "run.precision=bf16-mixed")
    config = deepspeed_config(cfg)
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload
    assert ("offload_param" in zero) == (offload and stage == 3)
    assert config["train_micro_batch_size_per_gpu"] == cfg.data.batch_size

    strategy = make_strategy(cfg)
    assert strategy.zero_stage_3 == (stage == 3)
    # What Lightning adds from the Trainer when it sets the strategy up (accumulation,
    # clipping, precision), then DeepSpeed's own parser, which rejects unknown ZeRO keys.
    full = {**strategy.config, "gradient_accumulation_steps": 2,
            "gradient_clipping": cfg.dpo.grad_clip, "bf16": {"enabled": True}}
    parsed = DeepSpeedConfig(full)
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == cfg.data.batch_size * 2
    assert parsed.zero_config.offload_optimizer is None or offload
    with pytest.raises(Exception, match="typo_key"):
        DeepSpeedConfig({**full, "zero_optimization": {**zero, "typo_key": 1}})


def test_bad_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="run.deepspeed_stage"):
        _cfg("run.deepspeed_stage=1")


def test_other_strategies_pass_through():
    cfg = load_config("configs/quickstart.yaml", ["run.dir=unused", "run.strategy=ddp_spawn"])
    assert make_strategy(cfg) == "ddp_spawn"


def test_ddp_reduces_each_gradient_alone():
    """run.strategy=ddp: Lightning's DDP with `sum_each_gradient` (bit-exact resumes on more
    than two ranks: tests/test_slurm.py)."""
    from rdpo.strategy import DDPSumEachGradient

    cfg = load_config("configs/quickstart.yaml", ["run.dir=unused", "run.strategy=ddp"])
    assert isinstance(make_strategy(cfg), DDPSumEachGradient)



def test_cpu_ranks_get_deepspeeds_cpu_accelerator(monkeypatch):
    """run.accelerator=cpu: DS_ACCELERATOR=cpu before DeepSpeed picks its accelerator (it does
    so once, at import: CUDA when a GPU is visible); a GPU run with DS_ACCELERATOR=cpu left in
    the environment is refused."""
    import os

    from deepspeed.accelerator import get_accelerator

    from rdpo.strategy import DeepSpeedAnyDevice

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k != "DS_ACCELERATOR"})
    assert isinstance(make_strategy(_cfg("run.accelerator=cpu")), DeepSpeedAnyDevice)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert get_accelerator().device_name() == "cpu"
    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cpu is set in the environment"):
        make_strategy(_cfg("run.accelerator=gpu"))


def test_zero3_slices_all_but_small_weights():
    """ZeRO-3 keeps whole on every rank only weights below 10 x the hidden size (transformers'
    "auto"): a fixed threshold of 1e5 kept every weight of the tiny test models whole."""
    cfg = _cfg("run.deepspeed_stage=3")
    assert deepspeed_config(cfg, hidden_size=64)["zero_optimization"][
        "stage3_param_persistence_threshold"] == 640
