"""One benchmark run, in its own process: rdpo's DPO steps or TRL 1.16's DPOTrainer on the
pairs `rdpo.dev.bench.dpo` built, with one setting (gradient checkpointing; for rdpo also the vision
cache and packing). Both sides get the same model, pairs, order, LoRA, loss, optimizer and
initial adapter; the result is pairs/s, per-step losses, resident memory and the bytes one
training step saves for its backward pass (`rdpo.engine.saved_memory`, metered the same way on both
sides, at step `METER_STEP`).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from rdpo.dev.bench.fixtures import LORA, model_config, pool

METER_STEP = 1
"""The metered step: not the first, which may allocate lazily."""


def _peak_mb(device) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _lora_init(model, path: Path) -> None:
    """Every run starts from the same adapter: saved by the first, loaded by the others."""
    import torch

    state = {k: v for k, v in model.named_parameters() if "lora_" in k}
    key = lambda k: k.replace(".default", "")  # noqa: E731
    if path.exists():
        saved = torch.load(path)
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(saved[key(k)])
    else:
        torch.save({key(k): v.detach().cpu() for k, v in state.items()}, path)


class VocabFlops:
    """Matrix-product FLOPs of the output layer, forward and backward (a dispatch mode, nested
    inside torch's FlopCounterMode): products with the vocabulary as one of their dimensions, or
    with an operand that is (a slice of) the output layer's weight — at Qwen's vocabulary
    transformers projects the logits in slices of the vocabulary, whose products never show
    its full size. On CPU TRL 1.16 projects every position through the output layer (its
    fused, completion-only path needs Triton); this count is what lets the bench say what a GPU
    run would not pay."""

    def __init__(self, weight):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.add(func, args)
                return func(*args, **(kwargs or {}))

        self.vocab, self.flops, self.mode = weight.shape[0], 0, Mode()
        self._storage = weight.untyped_storage().data_ptr()

    def add(self, func, args) -> None:
        import torch

        aten = torch.ops.aten
        packet = func.overloadpacket  # every overload: TRL's chunked output layer calls mm.out
        if packet in (aten.mm, aten.bmm):
            a, b = args[0], args[1]
        elif packet in (aten.addmm, aten.baddbmm):
            a, b = args[1], args[2]
        else:
            return
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        if self.vocab in (m, k, n) or any(t.untyped_storage().data_ptr() == self._storage
                                          for t in (a, b)):
            self.flops += 2 * m * k * n * (a.shape[0] if a.dim() == 3 else 1)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _output_weight(model):
    from rdpo.engine.logps import unwrap

    return unwrap(model).get_output_embeddings().weight


def _vision_module(model):
    from rdpo.engine.logps import unwrap

    trunk = unwrap(model).model
    return next(getattr(trunk, n) for n in ("visual", "vision_tower", "vision_model") if hasattr(trunk, n))


def _result(seconds, steps, batch, losses, meter, device, base_rss, **extra) -> dict:
    return {"seconds": seconds, "pairs_per_s": steps * batch / seconds, "losses": losses,
            "activation_mb": meter.peak / 2**20,
            "activation_top": [(what, size / 2**20) for what, size in meter.top(6)],
            "peak_mb": _peak_mb(device), "base_rss_mb": base_rss, **extra}


def run(spec: dict) -> dict:
    """One run as `spec` says: impl (rdpo, trl), work, steps, batch, device, precision, gc, and
    for rdpo cache and packed."""
    import torch

    torch.manual_seed(0)
    return (_run_rdpo if spec["impl"] == "rdpo" else _run_trl)(spec, Path(spec["work"]))


def _run_rdpo(spec: dict, work: Path) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from rdpo.config import DPOConfig
    from rdpo.engine.collate import PairCollator
    from rdpo.engine.saved_memory import SavedTensorMeter
    from rdpo.engine.vision_cache import VisionCache
    from rdpo.model import load_policy
    from rdpo.module import RubricDPOModule
    from rdpo.pairs import TrainPair
    from rdpo.rounds import with_reference_logps

    steps, batch, device = spec["steps"], spec["batch"], spec["device"]
    records, chosen, rejected = pool(work, steps * batch)
    model, processor = load_policy(model_config(work, spec["precision"], spec["gc"]))
    _lora_init(model, work / "lora_init.pt")
    model.to(device)
    base_rss = _rss_mb()
    collator = PairCollator(processor, packed=spec.get("packed", True),
                            vision=VisionCache() if spec.get("cache", True) else None)
    losses: list[float] = []
    meter = SavedTensorMeter(model)
    # Matrix-product and attention FLOPs (torch's own counter) of the metered step, forward and
    # backward, and of the whole reference pass: the model FLOPs a pair costs (with
    # checkpointing, the step's count also holds what it recomputes).
    step_counter, flops = FlopCounterMode(display=False), {}
    vocab_step, vocab_reference = VocabFlops(_output_weight(model)), VocabFlops(_output_weight(model))
    vision_calls = []
    hook = _vision_module(model).register_forward_hook(lambda *a: vision_calls.append(1))

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, b, i):
            if i == METER_STEP:
                step_counter.__enter__()
                vocab_step.__enter__()
                meter.__enter__()

        def on_before_backward(self, trainer, module, loss):
            if trainer.global_step == METER_STEP:
                meter.__exit__(None, None, None)

        def on_train_batch_end(self, trainer, module, outputs, b, i):
            losses.append(float(outputs["loss"]))
            if i == METER_STEP:
                vocab_step.__exit__(None, None, None)
                step_counter.__exit__(None, None, None)
                flops["step"] = step_counter.get_total_flops()

    module = RubricDPOModule(model, processor, DPOConfig(beta=0.1, lr=1e-4, max_steps=steps))
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps,
                        precision="bf16-mixed" if spec["precision"] == "bf16" else "32-true",
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    start = time.perf_counter()
    # Reference log-probs once per pair (adapters off), as a round computes them; with the
    # vision cache this pass also encodes each image, once.
    with FlopCounterMode(display=False) as reference_counter, vocab_reference:
        pairs = with_reference_logps(
            model, collator, [TrainPair(*x, 0.0, 0.0) for x in zip(records, chosen, rejected, strict=True)],
            batch, precision=trainer.precision_plugin)
    reference_vision_calls = len(vision_calls)
    model.train()
    trainer.fit(module, DataLoader(pairs, batch_size=batch, shuffle=False, collate_fn=collator))
    _sync(device)
    seconds = time.perf_counter() - start
    hook.remove()
    return _result(seconds, steps, batch, losses, meter, device, base_rss,
                   vision_calls_in_steps=len(vision_calls) - reference_vision_calls,
                   flops_per_pair=reference_counter.get_total_flops() / len(pairs) + flops["step"] / batch,
                   output_layer_flops_per_pair=vocab_reference.flops / len(pairs) + vocab_step.flops / batch)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _run_trl(spec: dict, work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from torch.utils.flop_counter import FlopCounterMode
    from trl import DPOConfig, DPOTrainer

    from rdpo.engine.encode import chat_text
    from rdpo.engine.saved_memory import SavedTensorMeter
    from rdpo.model import load_base, load_processor
    from rdpo.pool import load_images

    steps, batch, device, precision = spec["steps"], spec["batch"], spec["device"], spec["precision"]
    records, chosen, rejected = pool(work, steps * batch)
    cfg = model_config(work, precision, False)
    processor = load_processor(cfg.path)
    base = load_base(cfg)
    # The same token sequences as rdpo's: the templated prompt, each response + end of turn.
    data = Dataset.from_list([{"images": load_images(r), "prompt": chat_text(processor, r),
                               "chosen": c + "<|im_end|>", "rejected": j + "<|im_end|>"}
                              for r, c, j in zip(records, chosen, rejected, strict=True)])
    losses: list[float] = []
    meter: list[SavedTensorMeter] = []
    flops: dict[str, float] = {}

    class Trainer(DPOTrainer):
        def training_step(self, *args, **kwargs):
            # One whole step (policy and reference forwards, backward): TRL's FLOPs per pair.
            if self.state.global_step != METER_STEP or flops or spec["gc"]:
                return super().training_step(*args, **kwargs)
            vocab = VocabFlops(_output_weight(self.model))
            with FlopCounterMode(display=False) as counter, vocab:
                loss = super().training_step(*args, **kwargs)
            flops.update(step=counter.get_total_flops(), vocab=vocab.flops)
            return loss

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # rdpo's order

        def compute_loss(self, *args, **kwargs):
            if self.state.global_step == METER_STEP and not meter:
                meter.append(SavedTensorMeter(self.model))
                with meter[0]:
                    loss = super().compute_loss(*args, **kwargs)
            else:
                loss = super().compute_loss(*args, **kwargs)
            losses.append(float(loss))
            return loss

    args = DPOConfig(
        output_dir=str(work / "trl"), beta=0.1, loss_type=["sigmoid"], per_device_train_batch_size=batch,
        max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=device == "cpu", bf16=precision == "bf16", max_length=None,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        gradient_checkpointing=spec["gc"])
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target"], lora_dropout=0.0)
    trainer = Trainer(model=base, args=args, train_dataset=data, processing_class=processor, peft_config=lora)
    _lora_init(trainer.model, work / "lora_init.pt")
    base_rss = _rss_mb()
    start = time.perf_counter()
    trainer.train()
    _sync(device)
    seconds = time.perf_counter() - start
    extra = ({"flops_per_pair": flops["step"] / batch, "output_layer_flops_per_pair": flops["vocab"] / batch}
             if flops else {})
    return _result(seconds, steps, batch, losses, meter[0], device, base_rss, **extra)
