"""GPU checks (CUDA only; scripts/gpu_check.sh runs them on a lent GPU, CPU CI skips them)."""

import pytest
import torch

from rdpo.config import DPOConfig, ModelConfig, RolloutConfig, load_config
from rdpo.engine.collate import PairCollator
from rdpo.engine.encode import collate_sequences, encode_prompt
from rdpo.engine.logps import sequence_logps
from rdpo.engine.packing import pack_pairs, packed_logps
from rdpo.model import load_policy
from rdpo.module import RubricDPOModule
from rdpo.pairs import TrainPair
from rdpo.pool import load_pool
from rdpo.rollout import generate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CHOSEN = ["The circle is red.", "There are two shapes: a blue square and a green triangle."]
REJECTED = ["A dog on a sofa, it is purple.", "One."]


def test_qlora_nf4_bf16_trains_on_cuda(tiny_dir, toy_pools):
    """4-bit nf4 base (vision tower and lm_head in bf16), LoRA trains under bf16 autocast
    after sampling, as a round alternates them."""
    import bitsandbytes as bnb

    model, processor = load_policy(ModelConfig(path=str(tiny_dir), quantization="nf4", dtype="bfloat16",
                                               gradient_checkpointing=True))
    model.cuda()
    base = model.get_base_model()
    four_bit = {n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any("language_model" in n for n in four_bit)
    assert not any("visual" in n for n in four_bit) and "lm_head" not in four_bit

    records = load_pool(toy_pools.train)[:2]
    rollouts = list(generate(model, processor, records, RolloutConfig(samples_per_prompt=2, max_new_tokens=6)))
    assert [len(r.responses) for r in rollouts] == [2, 2]

    collator = PairCollator(processor, packed=True)
    pairs = [TrainPair(r, c, j, -20.0, -20.0) for r, c, j in zip(records, CHOSEN, REJECTED, strict=True)]
    module = RubricDPOModule(model, processor, DPOConfig(beta=0.1, sft_weight=1.0))
    model.train()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collator(pairs)
    batch = {k: ({kk: vv.cuda() for kk, vv in v.items()} if isinstance(v, dict) else v.cuda())
             for k, v in batch.items()}
    for _ in range(2):
        with torch.autocast("cuda", torch.bfloat16):
            loss = module.training_step(batch, 0)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert any("lora_B" in n for n in changed)
    assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_separate_on_cuda(tiny_model_and_processor, toy_pools, dtype):
    model, processor = tiny_model_and_processor
    model = model.to("cuda", dtype)
    try:
        prompts = [encode_prompt(processor, r) for r in load_pool(toy_pools.train)[:2]]
        seqs = collate_sequences(processor, prompts * 2, CHOSEN + REJECTED)
        packed = pack_pairs(processor, prompts, CHOSEN, REJECTED)
        with torch.no_grad():
            want = sequence_logps(model, {k: v.cuda() for k, v in seqs.items()}).chunk(2)
            got = packed_logps(model, {k: v.cuda() for k, v in packed.items()})
        tol = 1e-4 if dtype == torch.float32 else 0.5  # bf16 sums over ~10 tokens
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=tol, rtol=1e-3)
    finally:
        model.to("cpu", torch.float32)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_deepspeed_fit_on_gpu(stage, quantization, small_toy_cache, tmp_path):
    """A few DPO steps under ZeRO-2/3 on one GPU, LoRA and QLoRA (nf4 stored in bf16, so
    ZeRO-3 can slice it), bf16: the run finishes, the loss starts at ln 2 and the adapter
    moves. The same runs on two CPU ranks, fp32, in tests/test_deepspeed.py."""
    pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    import csv
    import math

    from safetensors.torch import load_file

    from rdpo.fit import fit

    cfg = load_config("configs/quickstart.yaml", [
        f"run.dir={tmp_path / 'run'}", f"toy.cache_dir={small_toy_cache}",
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
