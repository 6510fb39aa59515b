"""Bytes saved for backward (`rdpo.engine.saved_memory`) and gradient checkpointing of the language
model only (`rdpo.model.checkpoint_language_model`), full and selective (`rdpo.engine.recompute`)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from rdpo.config import LoraConfig, ModelConfig
from rdpo.engine.collate import PairCollator
from rdpo.engine.packing import pair_logps
from rdpo.engine.recompute import keep, selective_checkpoint_kwargs
from rdpo.engine.saved_memory import SavedTensorMeter
from rdpo.engine.vision_cache import VisionCache
from rdpo.model import load_policy
from rdpo.pairs import TrainPair
from rdpo.pool import load_pool


def test_meter_counts_each_storage_once_and_no_weights():
    layer = torch.nn.Linear(16, 64)
    x = torch.randn(8, 16, requires_grad=True)
    meter = SavedTensorMeter(layer)
    with meter:
        h = layer(x)
        y = (h * h).sum() + (h[:4] * 2).sum()  # h saved twice (mul), plus a view of it: one storage
    want = x.numel() * 4 + h.numel() * 4
    assert meter.peak == want and meter.bytes == want
    assert dict(meter.top())[f"{tuple(h.shape)} torch.float32"] == h.numel() * 4
    y.backward()
    del y, h
    assert meter.bytes == 0 and meter.peak == want


def test_selective_keeps_the_products_and_recomputes_the_rest():
    """A LoRA-shaped block: base projection (contraction 16 → 64 wide) and down-projection to
    rank 2 kept, the rank-2 up-projection and the element-wise work recomputed."""
    base = torch.nn.Linear(16, 64, bias=False)
    down, up = torch.nn.Linear(16, 2, bias=False), torch.nn.Linear(2, 64, bias=False)
    torch.nn.init.normal_(up.weight)
    for p in base.parameters():
        p.requires_grad_(False)

    def block(x):
        return torch.nn.functional.silu(base(x) + up(down(x))) * x.sum(-1, keepdim=True)

    x = torch.randn(8, 16, requires_grad=True)
    want = block(x)
    want.sum().backward()
    want_grads = [t.grad.clone() for t in (x, down.weight, up.weight)]
    for t in (x, down.weight, up.weight):
        t.grad = None
    meter = SavedTensorMeter(base, down, up)
    with meter:
        got = checkpoint(block, x, use_reentrant=False, **selective_checkpoint_kwargs())
    # The region's input (8×16), the base projection's output (8×64) and the rank-2 product (8×2).
    assert meter.peak == 4 * (8 * 16 + 8 * 64 + 8 * 2)
    got.sum().backward()
    assert meter.bytes == 0
    assert torch.equal(got, want)
    for g, w in zip((x.grad, down.weight.grad, up.weight.grad), want_grads, strict=True):
        assert torch.equal(g, w)
    mm = torch.ops.aten.mm.default
    assert keep(mm, torch.empty(8, 16), torch.empty(16, 64))  # 4 × 16 >= 64
    assert not keep(mm, torch.empty(8, 2), torch.empty(2, 64))
    assert not keep(torch.ops.aten.silu.default, torch.empty(8, 64))


@pytest.mark.parametrize("mode", [True, "selective"])
def test_language_model_checkpointing_same_gradients_fewer_saved_bytes(tiny_dir, toy_pools, mode):
    records = load_pool(toy_pools.train)[:2]
    pairs = [TrainPair(r, "A red circle.", "Two blue squares on the right.", 0.0, 0.0) for r in records]
    out = {}
    for gc in (False, mode):
        torch.manual_seed(0)
        cfg = ModelConfig(path=str(tiny_dir), lora=LoraConfig(r=4, alpha=8), gradient_checkpointing=gc)
        model, processor = load_policy(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        # Without the cache the step runs the frozen vision tower, which builds no graph.
        outputs = []
        hook = model.get_base_model().model.visual.register_forward_hook(
            lambda m, i, o, seen=outputs: seen.append(o.last_hidden_state))
        pair_logps(model, PairCollator(processor)(pairs))
        hook.remove()
        assert outputs and not any(o.requires_grad for o in outputs)
        collator = PairCollator(processor, vision=VisionCache())
        with torch.no_grad():
            pair_logps(model, collator(pairs))  # the reference pass: features cached
        meter = SavedTensorMeter(model)
        with meter:
            chosen, rejected = pair_logps(model, collator(pairs))
        (chosen - rejected).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        trunk = model.get_base_model().model
        flags = {type(m).__name__: m.gradient_checkpointing for m in trunk.modules()
                 if hasattr(m, "gradient_checkpointing")}
        out[gc] = (torch.cat([chosen, rejected]).detach(), grads, meter.peak, flags)
    (want, want_grads, plain_bytes, _), (got, got_grads, gc_bytes, flags) = out[False], out[mode]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
    # Full: only each layer's input is kept. Selective: also the products' and attention's
    # outputs, but not the element-wise work's (measured: 0.58 at the bench's CPU shape).
    assert gc_bytes < (0.2 if mode is True else 0.75) * plain_bytes
    # The language model checkpoints its layers; the vision tower does not.
    assert flags["Qwen2VLTextModel"] is True
    assert not any(v for k, v in flags.items() if "Vision" in k)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_selective_recomputes_dropout_and_autocast_exactly(tiny_dir, toy_pools, autocast):
    """The real recipe's step: LoRA dropout kept on (model.disable_dropout=false) and bf16
    autocast; selective checkpointing recomputes the same dropout masks and casts."""
    records = load_pool(toy_pools.train)[:2]
    pairs = [TrainPair(r, "A red circle.", "Two blue squares on the right.", 0.0, 0.0) for r in records]
    out = {}
    for gc in (False, "selective"):
        torch.manual_seed(0)
        model, processor = load_policy(ModelConfig(
            path=str(tiny_dir), lora=LoraConfig(r=4, alpha=8, dropout=0.3),
            gradient_checkpointing=gc, disable_dropout=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        batch = PairCollator(processor)(pairs)
        logps = []
        for seed in (1, 2):
            model.zero_grad()
            torch.manual_seed(seed)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                chosen, rejected = pair_logps(model, batch)
            (chosen - rejected).sum().backward()
            logps.append(torch.cat([chosen, rejected]).detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[gc] = (logps, grads)
    (want, want_grads), (got, got_grads) = out[False], out["selective"]
    assert not torch.equal(want[0], want[1])  # dropout acts: another seed, other log-probs
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
