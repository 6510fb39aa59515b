"""``python -m rdpo.bench dpo [--json]``: rdpo's DPO training against TRL's DPOTrainer.
(``python -m rdpo.bench rollout``: a round's sampling per rollout engine, `rdpo.dev.bench.rollout`.)

One random-init Qwen2-VL-shaped model and one set of pairs (``--images N`` images per prompt);
N training steps with rdpo (`RubricDPOModule` in a Lightning Trainer, packed pairs, reference
log-probs and image features computed once per pair and counted in rdpo's time) and with TRL
1.16's DPOTrainer (its own collator and trainer, reference forward at every step), same batch
size, LoRA, loss, optimizer and initial adapter, each side with gradient checkpointing off and
on (TRL's default is on), and rdpo also with selective checkpointing (`rdpo.engine.recompute`). Each run is its own subprocess (`rdpo.dev.bench.workers`); the settings
run in turn, ``--repeats`` times, and the best repeat of each counts, so load on a shared
machine falls on every setting alike. Reports pairs/s, the bytes one step saves for backward
(`rdpo.engine.saved_memory`) and what dominates them, peak memory, the ratios, and the largest
per-step loss difference, and rdpo's model FLOPs (torch's counter over the reference pass and one
step without checkpointing) per pair, per second and, on a GPU, as MFU; ``--levers`` runs rdpo alone with each of its levers (packing, vision
cache, language-model checkpointing) on and off; ``--json`` prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rdpo.dev.bench.fixtures import build

# rdpo's settings (gradient checkpointing, vision cache, packed pairs) in `--levers` mode: each
# lever alone against rdpo's plain packed run, then together.
LEVERS = [dict(gc=False, cache=False, packed=False), dict(gc=False, cache=False, packed=True),
          dict(gc=False, cache=True, packed=True), dict(gc="selective", cache=False, packed=True),
          dict(gc=True, cache=False, packed=True), dict(gc="selective", cache=True, packed=True),
          dict(gc=True, cache=True, packed=True)]

_GC = {False: "off", True: "on", "selective": "selective"}


def _label(run: dict) -> str:
    flags = [f"gc {_GC[run['gc']]}"]
    if run["impl"] == "rdpo":
        flags += [f"cache {'on' if run.get('cache', True) else 'off'}",
                  f"{'packed' if run.get('packed', True) else 'plain'}"]
    return f"{run['impl']} ({', '.join(flags)})"


def _settings(args) -> list[dict]:
    if args.levers:
        return [dict(impl="rdpo", **lever) for lever in LEVERS]
    # rdpo first: it saves the shared initial adapter that every later run loads.
    return [dict(impl="rdpo", gc=False), dict(impl="trl", gc=False), dict(impl="rdpo", gc="selective"),
            dict(impl="rdpo", gc=True), dict(impl="trl", gc=True)]


def _launch(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "rdpo.dev.bench", "_worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode:
        raise RuntimeError(f"{_label(spec)} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dpo(args) -> dict:
    """Build once, then run every setting of both sides in turn, `repeats` times (so load on a
    shared machine falls on all of them); the best repeat of each setting counts."""
    work = Path(args.work or tempfile.mkdtemp(prefix="rdpo-bench-"))
    if not (work / "pool.jsonl").exists():
        build(work, args.shape, args.steps * args.batch, args.response_tokens, args.image_side,
              seed=0, images=args.images)
    common = dict(work=str(work), steps=args.steps, batch=args.batch, device=args.device,
                  precision=args.precision)
    settings = _settings(args)
    runs: list[list[dict]] = [[] for _ in settings]
    for _ in range(args.repeats):
        for spec, done in zip(settings, runs, strict=True):
            done.append({**spec, **_launch({**common, **spec})})
    best = [max(done, key=lambda r: r["pairs_per_s"]) for done in runs]
    result = {"shape": args.shape, "images": args.images, "device": args.device,
              "precision": args.precision, "steps": args.steps, "batch": args.batch,
              "repeats": args.repeats,
              "runs": [{"setting": _label(r), **{k: v for k, v in r.items() if k != "work"}}
                       for r in best]}
    if args.levers:
        return result
    cpu_peak = (cpu_peak_flops(int(os.environ.get("RDPO_BENCH_THREADS", "2")))
                if args.device == "cpu" else None)
    return {**result, **_compare(best, args.device, args.peak_tflops, cpu_peak)}


def cpu_peak_flops(threads: int, side: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matrix-product rate (FLOP/s) with `threads` threads: the best of
    `repeats` products of two `side`×`side` matrices, after one warm-up."""
    import time

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * side**3 / min(seconds)


def cpu_only(device: str, trl_flops: float, trl_gpu_flops: float) -> bool:
    """Whether the measured ratio is a CPU artifact: on CPU, TRL's output layer over every
    position (its fused completion-only layer needs Triton) is more than a tenth of its FLOPs."""
    return device == "cpu" and trl_flops - trl_gpu_flops > 0.1 * trl_flops


def _compare(best: list[dict], device: str, peak_tflops: float, cpu_peak: float | None = None) -> dict:
    """The headline figures from the best run of each setting."""
    side = {impl: [r for r in best if r["impl"] == impl] for impl in ("rdpo", "trl")}
    top = {impl: max(rs, key=lambda r: r["pairs_per_s"]) for impl, rs in side.items()}
    at = {(r["impl"], r["gc"]): r for r in best}
    r, t = top["rdpo"], top["trl"]
    trl_default = at[("trl", True)]  # TRL's DPOConfig default: gradient checkpointing on
    memory = {gc: at[("rdpo", gc)]["activation_mb"] / at[("trl", gc)]["activation_mb"]
              for gc in (False, True)}
    # Neither side recomputing a matrix product: TRL without checkpointing, rdpo with selective
    # checkpointing (which recomputes only element-wise work).
    memory["selective"] = at[("rdpo", "selective")]["activation_mb"] / at[("trl", False)]["activation_mb"]
    diffs = [abs(a - b) for x in side["rdpo"] for y in side["trl"]
             for a, b in zip(x["losses"], y["losses"], strict=False)]
    # Model FLOPs of a pair: the runs without checkpointing (no recomputation in them).
    rdpo_off, trl_off = at[("rdpo", False)], at[("trl", False)]
    model_flops = rdpo_off["flops_per_pair"]
    achieved = model_flops * r["pairs_per_s"]
    # TRL on a GPU projects only completion rows through the output layer, as rdpo does; on CPU
    # (no Triton) it projects every position. Its GPU FLOPs: its CPU count with the output
    # layer's share replaced by rdpo's (the same completion rows, policy and reference).
    trl_gpu_flops = trl_off["flops_per_pair"] - trl_off["output_layer_flops_per_pair"] + rdpo_off["output_layer_flops_per_pair"]
    return {
        "rdpo_model_flops_per_pair": model_flops, "rdpo_model_tflops_per_s": achieved / 1e12,
        # Model FLOPs utilisation against the GPU's dense bf16 peak (`--peak-tflops`).
        "rdpo_mfu": achieved / (peak_tflops * 1e12) if device == "cuda" else None,
        # On CPU: against this machine's fp32 matmul rate (a large GEMM, same threads).
        "cpu_peak_tflops_measured": cpu_peak / 1e12 if cpu_peak else None,
        "rdpo_fraction_of_peak": achieved / cpu_peak if cpu_peak else None,
        "rdpo_output_layer_flops_per_pair": rdpo_off["output_layer_flops_per_pair"],
        "trl_model_flops_per_pair": trl_off["flops_per_pair"],
        "trl_output_layer_flops_per_pair": trl_off["output_layer_flops_per_pair"],
        "trl_gpu_model_flops_per_pair_estimate": trl_gpu_flops,
        # What the like-for-like ratio would be where both sides run at the same FLOP/s and TRL
        # takes its completion-only output layer (a GPU): the FLOP count's ratio, an estimate.
        "expected_gpu_throughput_ratio_from_flops": trl_gpu_flops / model_flops,
        "throughput_ratio_cpu_only": cpu_only(device, trl_off["flops_per_pair"], trl_gpu_flops),
        "rdpo_pairs_per_s": r["pairs_per_s"], "trl_pairs_per_s": t["pairs_per_s"],
        "rdpo_best_setting": _label(r), "trl_best_setting": _label(t),
        "throughput_ratio_like_for_like": r["pairs_per_s"] / t["pairs_per_s"],
        "trl_default_pairs_per_s": trl_default["pairs_per_s"],
        "throughput_ratio_vs_trl_default": r["pairs_per_s"] / trl_default["pairs_per_s"],
        # Bytes saved for backward in one step, two settings named in each key: neither side
        # recomputing a matrix product (rdpo selective ÷ TRL off), and each shared setting.
        "activation_memory_ratio_rdpo_selective_vs_trl_off": memory["selective"],
        "activation_memory_ratio_off_vs_off": memory[False],
        "activation_memory_ratio_on_vs_on": memory[True],
        "rdpo_selective_pairs_per_s": at[("rdpo", "selective")]["pairs_per_s"],
        "throughput_ratio_selective_vs_trl_best": at[("rdpo", "selective")]["pairs_per_s"] / t["pairs_per_s"],
        "rdpo_peak_mb": r["peak_mb"], "trl_peak_mb": t["peak_mb"],
        "peak_memory_ratio": r["peak_mb"] / t["peak_mb"],
        # On CPU, RSS also holds the libraries and the weights; the part training adds on top of
        # the loaded model is the comparable one.
        "training_memory_ratio": (r["peak_mb"] - r["base_rss_mb"]) / max(1.0, t["peak_mb"] - t["base_rss_mb"])
        if device == "cpu" else None,
        "max_abs_loss_diff": max(diffs),
    }


def report(result: dict, args) -> None:
    print(f"DPO, {args.shape} shape, {args.images} image(s) per prompt, on {args.device} "
          f"({args.precision}), {args.steps} steps × {args.batch} pairs, best of {args.repeats}")
    for run in result["runs"]:
        print(f"  {run['setting']:<36} {run['pairs_per_s']:6.2f} pairs/s, saved for backward "
              f"{run['activation_mb']:7.1f} MB, peak {run['peak_mb']:.0f} MB"
              + (f", vision calls in steps {run['vision_calls_in_steps']}"
                 if "vision_calls_in_steps" in run else ""))
        top = ", ".join(f"{what} {mb:.1f}" for what, mb in run["activation_top"][:3])
        print(f"  {'':<36} largest saved (MB): {top}")
    if args.levers:
        return
    print(f"  like-for-like throughput ratio (best ÷ best) {result['throughput_ratio_like_for_like']:.2f}; "
          f"vs TRL's default (checkpointing on) {result['throughput_ratio_vs_trl_default']:.2f}")
    if result["throughput_ratio_cpu_only"]:
        print(f"  (CPU-only figure: TRL projects every position through the output layer here, only "
              f"completion rows on a GPU; from the FLOP count a GPU ratio of about "
              f"{result['expected_gpu_throughput_ratio_from_flops']:.2f})")
    print(f"  activation memory ratio, rdpo selective ÷ TRL off "
          f"{result['activation_memory_ratio_rdpo_selective_vs_trl_off']:.2f} "
          f"(at {result['throughput_ratio_selective_vs_trl_best']:.2f}× TRL's best throughput); off ÷ off "
          f"{result['activation_memory_ratio_off_vs_off']:.2f}, on ÷ on {result['activation_memory_ratio_on_vs_on']:.2f}; "
          f"peak memory ratio {result['peak_memory_ratio']:.2f}"
          + (f", training memory ratio {result['training_memory_ratio']:.2f}"
             if result["training_memory_ratio"] else ""))
    print(f"  largest per-step loss difference {result['max_abs_loss_diff']:.2e}")
    print(f"  rdpo model FLOPs {result['rdpo_model_flops_per_pair'] / 1e9:.1f} GFLOP per pair, "
          f"{result['rdpo_model_tflops_per_s']:.3f} TFLOP/s at its best"
          + (f", MFU {100 * result['rdpo_mfu']:.1f} % of {args.peak_tflops:g} TFLOP/s"
             if result["rdpo_mfu"] is not None else "")
          + (f", {100 * result['rdpo_fraction_of_peak']:.1f} % of this CPU's measured fp32 matmul "
             f"rate ({result['cpu_peak_tflops_measured'] * 1e3:.0f} GFLOP/s)"
             if result["rdpo_fraction_of_peak"] is not None else ""))
    print(f"  FLOPs per pair: TRL {result['trl_model_flops_per_pair'] / 1e9:.1f} GFLOP (output layer "
          f"{result['trl_output_layer_flops_per_pair'] / 1e9:.1f}), rdpo output layer "
          f"{result['rdpo_output_layer_flops_per_pair'] / 1e9:.1f}; expected ratio where both run at the "
          f"same FLOP/s with TRL's completion-only output layer: "
          f"{result['expected_gpu_throughput_ratio_from_flops']:.2f}")
