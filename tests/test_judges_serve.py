"""Smoke test: OpenAIJudge against a real OpenAI-compatible server, `transformers serve`,
serving the tiny VLM offline on loopback (skipped when the serving extras are missing)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rdpo.config import JudgeConfig
from rdpo.judging.judges import OpenAIJudge
from rdpo.pool import load_pool

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow  # starts a `transformers serve` process and loads a model in it


def test_openai_judge_against_transformers_serve(tiny_dir, toy_pools, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port),
                             str(tiny_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"transformers serve did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(1)
        records = load_pool(toy_pools.train)[:2]
        judge = OpenAIJudge(JudgeConfig(
            kind="openai", model=str(tiny_dir), base_url=f"http://127.0.0.1:{port}/v1",
            timeout=60, max_retries=0, max_tokens=8, parse_retries=0, concurrency=2, cache=None))
        verdicts = judge.judge_many([(r, ["The circle is red."]) for r in records])
        # the random tiny model answers noise: every verdict is unknown, none made up
        assert verdicts == [[{c.id: None for c in r.rubric.criteria()}] for r in records]
        assert judge.outcome(records[0], ["x"]) == [None]
        assert judge.stats == {"requests": 3, "cache_hits": 0, "unparseable": 3}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
