"""GPU checks (CUDA only; scripts/gpu_check.sh runs them on a lent GPU, CPU CI skips them)."""

import pytest
import torch

from rdpo.batches import PairCollator, TrainPair
from rdpo.collate import collate_sequences, encode_prompt
from rdpo.config import DPOConfig, ModelConfig, RolloutConfig
from rdpo.logps import sequence_logps
from rdpo.model import load_policy
from rdpo.module import RubricDPOModule
from rdpo.packing import pack_pairs, packed_logps
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
