"""DeepSpeed: the config rdpo builds (rdpo.strategy) validates against DeepSpeed's own schema on
CPU; the GPU runs (ZeRO-2/3 × LoRA/QLoRA, a few steps) are marked gpu and run only on CUDA."""

import pytest
import torch

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_deepspeed_fit_on_gpu(stage, quantization, tmp_path):
    """A few DPO steps under ZeRO-2/3 on one GPU, LoRA and QLoRA: the run finishes, the loss
    starts at ln 2 and the adapter moves; ZeRO-3 rollouts gather the weights for generation."""
    import csv
    import math

    from safetensors.torch import load_file

    from rdpo.fit import fit

    cfg = load_config("configs/quickstart.yaml", [
        f"run.dir={tmp_path / 'run'}", f"toy.cache_dir={tmp_path / 'cache'}",
        "run.accelerator=gpu", "run.devices=1", "run.strategy=deepspeed",
        f"run.deepspeed_stage={stage}", f"model.quantization={quantization}",
        "model.dtype=bfloat16", "run.precision=bf16-mixed", "run.progress_bar=false",
        "run.report=false", "toy.n_train=16", "toy.n_heldout=8", "toy.warmstart_steps=30",
        "toy.warmstart_lr=3e-3", "toy.flaw_rate=0.5", "dpo.max_steps=4",
        "rollout.every_n_steps=2", "rollout.samples_per_prompt=4", "data.batch_size=4",
        "data.prompts_per_round=16", "dpo.lr=5e-3", "eval.max_prompts=2",
        "eval.samples_per_prompt=2", "rollout.max_new_tokens=12"])
    result = fit(cfg)
    rows = list(csv.DictReader((result.run_dir / "logs/metrics.csv").open()))
    losses = [float(r["train/dpo_loss_step"]) for r in rows if r.get("train/dpo_loss_step")]
    assert len(losses) == 4 and losses[0] == pytest.approx(math.log(2), abs=1e-2)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


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
