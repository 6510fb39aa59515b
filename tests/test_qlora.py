"""QLoRA on CPU: 4-bit language model, full-precision vision tower and lm_head, LoRA trains
across the eval (sampling) / train alternation of a round."""

import torch

from rdpo.config import ModelConfig, RolloutConfig
from rdpo.engine.collate import PairCollator
from rdpo.model import load_policy
from rdpo.pool import load_pool
from rdpo.rollout import generate


def test_nf4_policy_trains_after_sampling(tiny_dir, toy_pools):
    import bitsandbytes as bnb

    model, processor = load_policy(ModelConfig(path=str(tiny_dir), quantization="nf4"))
    base = model.get_base_model()
    four_bit = {n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any("language_model" in n for n in four_bit)
    assert not any("visual" in n for n in four_bit) and "lm_head" not in four_bit

    records = load_pool(toy_pools.train)[:2]
    # sampling runs in eval mode: it must not leave the 4-bit weights unusable for training
    rollouts = list(generate(model, processor, records, RolloutConfig(samples_per_prompt=2, max_new_tokens=4)))
    assert [len(r.responses) for r in rollouts] == [2, 2]

    model.train()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    from rdpo.engine.logps import sequence_logps

    batch = PairCollator(processor).sequences(records, [r.reference for r in records])
    for _ in range(2):
        loss = -sequence_logps(model, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert any("lora_B" in n for n in changed)
