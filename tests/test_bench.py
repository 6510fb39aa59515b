"""The DPO benchmark runs rdpo and TRL on the same pairs and reports comparable numbers."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trains rdpo and TRL's DPOTrainer in a subprocess


def test_bench_dpo_json(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rdpo.bench", "dpo", "--json", "--shape", "tiny", "--steps", "3",
         "--batch", "2", "--repeats", "1", "--response-tokens", "16", "--image-side", "112",
         "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("throughput_ratio", "peak_memory_ratio", "max_abs_loss_diff"):
        assert result[key] > 0 or key == "max_abs_loss_diff"
    # Same initial adapter, same token sequences, same optimizer: the two trainers take the
    # same steps, so their per-step losses agree (step 0 is ln 2 for both).
    assert result["max_abs_loss_diff"] < 1e-4
    assert result["rdpo_pairs_per_s"] > 0 and result["trl_pairs_per_s"] > 0
