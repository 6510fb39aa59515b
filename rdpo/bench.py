"""``python -m rdpo.bench dpo [--json]``: rdpo's DPO training against TRL's DPOTrainer.
(``python -m rdpo.bench rollout``: a round's sampling per rollout engine, `rdpo.bench_rollout`.)

One random-init Qwen2-VL-shaped model and one set of pairs; N training steps with rdpo
(`RubricDPOModule` in a Lightning Trainer, packed pairs, reference log-probs computed once per
pair and counted in rdpo's time) and with TRL 1.16's DPOTrainer (its own collator and trainer,
reference forward at every step), same batch size, LoRA, loss, optimizer and initial adapter.
Each run is its own subprocess (so peak memory is its own), runs alternate, and the best
repeat of each counts. Prints pairs/s, peak memory, their ratios and the largest per-step
loss difference; ``--json`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # CPU: hidden 256, 4 layers, 448×448 images (256 image tokens), Qwen's real vocabulary.
    "cpu": dict(hidden=256, layers=4, head_dim=64, intermediate=1024, vocab_size=151936,
                vision_hidden=256, vision_layers=4),
    # The test suite's smoke run (head_dim 32: the smallest vLLM's CPU attention serves).
    "tiny": dict(hidden=64, layers=2, head_dim=32, vocab_size=4096),
    # A Qwen2-VL-2B-class shape for a GPU (bf16).
    "2b": dict(hidden=1536, layers=28, head_dim=128, intermediate=8960, vocab_size=151936,
               vision_hidden=1280, vision_layers=32, kv_heads=2),
}
LORA = dict(r=16, alpha=32, target=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")


def build(out: Path, shape: str, pairs: int, response_tokens: int, image_side: int, seed: int) -> None:
    """The model (random init), its processor and a pool of `pairs` prompts with two responses each."""
    from PIL import Image

    from rdpo.demo import toy
    from rdpo.demo.tiny import build_tiny_vlm

    build_tiny_vlm(out / "model", toy.corpus(), image_pixels=image_side * image_side, seed=seed,
                   **SHAPES[shape])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "model")
    rng = random.Random(seed)
    words = sorted({w for s in toy.corpus() for w in s.split()})
    (out / "images").mkdir(exist_ok=True)

    def response() -> str:
        ids = tok(" ".join(rng.choices(words, k=4 * response_tokens)), add_special_tokens=False)["input_ids"]
        return tok.decode(ids[:response_tokens - 1]).strip()

    with open(out / "pool.jsonl", "w") as f, open(out / "responses.jsonl", "w") as g:
        for i in range(pairs):
            pixels = bytes(rng.randrange(256) for _ in range(3 * 64 * 64))
            Image.frombytes("RGB", (64, 64), pixels).resize((image_side, image_side)).save(out / f"images/{i}.png")
            f.write(json.dumps({
                "id": f"bench-{i}", "images": [f"images/{i}.png"],
                "instruction": "Describe the picture in detail.",
                "rubric": {"essential": [{"id": "E1", "text": "Describes the picture."}]}}) + "\n")
            g.write(json.dumps({"chosen": response(), "rejected": response()}) + "\n")


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


def worker(impl: str, work: Path, steps: int, batch: int, device: str, precision: str) -> dict:
    import torch

    torch.manual_seed(0)
    records, chosen, rejected = _pool(work)
    records, chosen, rejected = records[:steps * batch], chosen[:steps * batch], rejected[:steps * batch]
    run = _run_rdpo if impl == "rdpo" else _run_trl
    return run(work, records, chosen, rejected, steps, batch, device, precision)


def _pool(work: Path):
    from rdpo.pool import load_pool

    lines = [json.loads(x) for x in (work / "responses.jsonl").read_text().splitlines()]
    return load_pool(work / "pool.jsonl"), [x["chosen"] for x in lines], [x["rejected"] for x in lines]


def _model_config(work: Path, precision: str):
    from rdpo.config import LoraConfig, ModelConfig

    return ModelConfig(path=str(work / "model"), dtype="bfloat16" if precision == "bf16" else "float32",
                       lora=LoraConfig(r=LORA["r"], alpha=LORA["alpha"], target_modules=LORA["target"]))


def _run_rdpo(work, records, chosen, rejected, steps, batch, device, precision) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from rdpo.batches import PairCollator, TrainPair
    from rdpo.model import load_policy
    from rdpo.module import RubricDPOModule
    from rdpo.rounds import with_reference_logps

    model, processor = load_policy(_model_config(work, precision))
    _lora_init(model, work / "lora_init.pt")
    model.to(device)
    base_rss = _rss_mb()
    collator = PairCollator(processor, packed=True)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, b, i):
            losses.append(float(outputs["loss"]))

    from rdpo.config import DPOConfig

    module = RubricDPOModule(model, processor, DPOConfig(beta=0.1, lr=1e-4, max_steps=steps))
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps,
                        precision="bf16-mixed" if precision == "bf16" else "32-true",
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    start = time.perf_counter()
    # Reference log-probs once per pair (adapters off), as a round computes them.
    pairs = with_reference_logps(
        model, collator, [TrainPair(*x, 0.0, 0.0) for x in zip(records, chosen, rejected, strict=True)],
        batch, precision=trainer.precision_plugin)
    model.train()
    trainer.fit(module, DataLoader(pairs, batch_size=batch, shuffle=False, collate_fn=collator))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pairs_per_s": steps * batch / seconds, "losses": losses,
            "peak_mb": _peak_mb(device), "base_rss_mb": base_rss}


def _run_trl(work, records, chosen, rejected, steps, batch, device, precision) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    from rdpo.collate import chat_text
    from rdpo.model import load_base, load_processor
    from rdpo.pool import load_images

    cfg = _model_config(work, precision)
    processor = load_processor(cfg.path)
    base = load_base(cfg)
    # The same token sequences as rdpo's: the templated prompt, each response + end of turn.
    data = Dataset.from_list([{"images": load_images(r), "prompt": chat_text(processor, r),
                               "chosen": c + "<|im_end|>", "rejected": j + "<|im_end|>"}
                              for r, c, j in zip(records, chosen, rejected, strict=True)])
    losses: list[float] = []

    class Trainer(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # rdpo's order

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append(float(loss))
            return loss

    args = DPOConfig(
        output_dir=str(work / "trl"), beta=0.1, loss_type=["sigmoid"], per_device_train_batch_size=batch,
        max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=device == "cpu", bf16=precision == "bf16", max_length=None,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target"], lora_dropout=0.0)
    trainer = Trainer(model=base, args=args, train_dataset=data, processing_class=processor, peft_config=lora)
    _lora_init(trainer.model, work / "lora_init.pt")
    base_rss = _rss_mb()
    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pairs_per_s": steps * batch / seconds, "losses": losses,
            "peak_mb": _peak_mb(device), "base_rss_mb": base_rss}


def dpo(args) -> dict:
    """Build once, then alternate rdpo and TRL runs in subprocesses; the best repeat counts."""
    work = Path(args.work or tempfile.mkdtemp(prefix="rdpo-bench-"))
    if not (work / "pool.jsonl").exists():
        build(work, args.shape, args.steps * args.batch, args.response_tokens, args.image_side, seed=0)
    runs: dict[str, list[dict]] = {"rdpo": [], "trl": []}
    # rdpo first: it saves the shared initial adapter that every later run loads.
    for _ in range(args.repeats):
        for impl in ("rdpo", "trl"):
            cmd = [sys.executable, "-m", "rdpo.bench", "_worker", impl, str(work), str(args.steps),
                   str(args.batch), args.device, args.precision]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode:
                raise RuntimeError(f"{impl} run failed:\n{out.stderr[-4000:]}")
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {k: max(v, key=lambda r: r["pairs_per_s"]) for k, v in runs.items()}
    r, t = best["rdpo"], best["trl"]
    n = min(len(r["losses"]), len(t["losses"]))
    return {
        "shape": args.shape, "device": args.device, "precision": args.precision,
        "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
        "rdpo_pairs_per_s": r["pairs_per_s"], "trl_pairs_per_s": t["pairs_per_s"],
        "throughput_ratio": r["pairs_per_s"] / t["pairs_per_s"],
        "rdpo_peak_mb": r["peak_mb"], "trl_peak_mb": t["peak_mb"],
        "peak_memory_ratio": r["peak_mb"] / t["peak_mb"],
        # On CPU, RSS also holds the libraries and the weights; the part training adds on top of
        # the loaded model is the comparable one.
        "training_memory_ratio": (r["peak_mb"] - r["base_rss_mb"]) / max(1.0, t["peak_mb"] - t["base_rss_mb"])
        if args.device == "cpu" else None,
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(r["losses"][:n], t["losses"][:n], strict=True)),
        "rdpo_losses": r["losses"], "trl_losses": t["losses"],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        impl, work, steps, batch, device, precision = argv[1:]
        import torch

        torch.set_num_threads(int(os.environ.get("RDPO_BENCH_THREADS", "2")))
        result = worker(impl, Path(work), int(steps), int(batch), device, precision)
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(prog="python -m rdpo.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["dpo", "rollout"],
                        help="dpo: rdpo vs TRL training; rollout: tokens/s per rollout engine "
                        "(rdpo.bench_rollout)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--work", help="directory for the model and data (reused when present)")
    from rdpo import bench_rollout

    bench_rollout.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.what == "rollout":
        result = bench_rollout.rollout(args)
        if args.json:
            print(json.dumps(result))
        else:
            bench_rollout.report(result)
        return 0
    result = dpo(args)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_losses")}))
        return 0
    print(f"DPO, {args.shape} shape on {args.device} ({args.precision}), {args.steps} steps × {args.batch} pairs, "
          f"best of {args.repeats}")
    print(f"  rdpo {result['rdpo_pairs_per_s']:.2f} pairs/s, peak {result['rdpo_peak_mb']:.0f} MB")
    print(f"  TRL  {result['trl_pairs_per_s']:.2f} pairs/s, peak {result['trl_peak_mb']:.0f} MB")
    print(f"  throughput ratio (rdpo ÷ TRL) {result['throughput_ratio']:.2f}, peak memory ratio "
          f"{result['peak_memory_ratio']:.2f}"
          + (f", training memory ratio {result['training_memory_ratio']:.2f}" if result["training_memory_ratio"] else ""))
    print(f"  largest per-step loss difference {result['max_abs_loss_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
