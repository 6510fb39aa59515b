"""Bytes saved for backward (`rdpo.saved_memory`) and gradient checkpointing of the language
model only (`rdpo.model.checkpoint_language_model`)."""

import torch

from rdpo.batches import PairCollator, TrainPair
from rdpo.config import LoraConfig, ModelConfig
from rdpo.model import load_policy
from rdpo.packing import pair_logps
from rdpo.pool import load_pool
from rdpo.saved_memory import SavedTensorMeter
from rdpo.vision_cache import VisionCache


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


def test_language_model_checkpointing_same_gradients_fewer_saved_bytes(tiny_dir, toy_pools):
    records = load_pool(toy_pools.train)[:2]
    pairs = [TrainPair(r, "A red circle.", "Two blue squares on the right.", 0.0, 0.0) for r in records]
    out = {}
    for gc in (False, True):
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
    (want, want_grads, plain_bytes, _), (got, got_grads, gc_bytes, flags) = out[False], out[True]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
    assert gc_bytes < 0.7 * plain_bytes
    # The language model checkpoints its layers; the vision tower does not.
    assert flags["Qwen2VLTextModel"] is True
    assert not any(v for k, v in flags.items() if "Vision" in k)
