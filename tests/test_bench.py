"""The DPO benchmark runs rdpo and TRL on the same pairs and reports comparable numbers."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trains rdpo and TRL's DPOTrainer in subprocesses


def bench(tmp_path, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "rdpo.bench", "dpo", "--json", "--shape", "tiny", "--steps", "3",
         "--batch", "2", "--repeats", "1", "--response-tokens", "16", "--image-side", "112",
         "--work", str(tmp_path), *extra],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_dpo_json(tmp_path):
    result = bench(tmp_path, "--images", "2")
    assert result["images"] == 2
    settings = [r["setting"] for r in result["runs"]]
    assert settings == ["rdpo (gc off, cache on, packed)", "trl (gc off)",
                        "rdpo (gc selective, cache on, packed)", "rdpo (gc on, cache on, packed)",
                        "trl (gc on)"]
    for key in ("throughput_ratio_like_for_like", "throughput_ratio_vs_trl_default",
                "activation_memory_ratio_rdpo_selective_vs_trl_off", "peak_memory_ratio", "training_memory_ratio",
                "throughput_ratio_selective_vs_trl_best"):
        assert result[key] > 0, key
    runs = {r["setting"]: r for r in result["runs"]}
    trl_off = runs["trl (gc off)"]["activation_mb"]
    # The headline: rdpo's selective checkpointing against TRL without checkpointing.
    assert result["activation_memory_ratio_rdpo_selective_vs_trl_off"] == pytest.approx(
        runs["rdpo (gc selective, cache on, packed)"]["activation_mb"] / trl_off)
    assert result["activation_memory_ratio_off_vs_off"] == pytest.approx(
        runs["rdpo (gc off, cache on, packed)"]["activation_mb"] / trl_off)
    # Selective keeps less than none, more than full checkpointing.
    assert (runs["rdpo (gc on, cache on, packed)"]["activation_mb"]
            < runs["rdpo (gc selective, cache on, packed)"]["activation_mb"]
            < runs["rdpo (gc off, cache on, packed)"]["activation_mb"])
    # FLOPs a pair costs (reference pass + step, counted by torch): recomputation adds to them,
    # selective's (LoRA's rank-r products only) less than full checkpointing's.
    flops = [runs[f"rdpo (gc {gc}, cache on, packed)"]["flops_per_pair"] for gc in ("off", "selective", "on")]
    assert 0 < flops[0] < flops[1] < flops[2]
    assert result["rdpo_model_flops_per_pair"] == flops[0] and result["rdpo_model_tflops_per_s"] > 0
    assert result["rdpo_mfu"] is None  # CPU: no GPU peak to compare with
    # ...but this CPU's own matmul rate, measured in the same run.
    assert result["cpu_peak_tflops_measured"] > 0
    assert result["rdpo_fraction_of_peak"] == pytest.approx(
        result["rdpo_model_tflops_per_s"] / result["cpu_peak_tflops_measured"])
    # The output layer's share of each side's FLOPs: TRL on CPU projects every position, rdpo
    # only the completion rows (policy + reference), so TRL's share is the larger, and the
    # estimate for a GPU (TRL completion-only) lies below the measured CPU FLOP ratio.
    trl = runs["trl (gc off)"]
    rdpo = runs["rdpo (gc off, cache on, packed)"]
    assert 0 < rdpo["output_layer_flops_per_pair"] < trl["output_layer_flops_per_pair"] < trl["flops_per_pair"]
    assert result["trl_gpu_model_flops_per_pair_estimate"] == pytest.approx(
        trl["flops_per_pair"] - trl["output_layer_flops_per_pair"] + rdpo["output_layer_flops_per_pair"])
    assert 1 < result["expected_gpu_throughput_ratio_from_flops"] < trl["flops_per_pair"] / rdpo["flops_per_pair"]
    for run in result["runs"]:
        assert run["activation_mb"] > 0 and run["pairs_per_s"] > 0
    # rdpo's steps reuse the image features the reference pass encoded.
    assert all(r["vision_calls_in_steps"] == 0 for r in result["runs"] if r["impl"] == "rdpo")
    # Same initial adapter, same token sequences, same optimizer: the two trainers take the
    # same steps, so their per-step losses agree (step 0 is ln 2 for both).
    assert result["max_abs_loss_diff"] < 1e-4


def test_bench_levers(tmp_path):
    result = bench(tmp_path, "--levers")
    runs = {r["setting"]: r for r in result["runs"]}
    assert runs["rdpo (gc off, cache off, packed)"]["vision_calls_in_steps"] == 3
    assert runs["rdpo (gc off, cache on, packed)"]["vision_calls_in_steps"] == 0
    # Checkpointing the language model leaves less saved for backward.
    assert (runs["rdpo (gc on, cache on, packed)"]["activation_mb"]
            < runs["rdpo (gc off, cache on, packed)"]["activation_mb"])


def test_bench_round_json(small_toy, tmp_path):
    """``python -m rdpo.bench round --async`` on the small toy: pipelined, sequential and async
    runs, the keys, the same pairs, the sequential round is about the sum of its phases, and
    the async run's second round was sampled by the first round's policy."""
    out = subprocess.run(
        [sys.executable, "-m", "rdpo.bench", "round", "--json", "--small", "--rounds", "2",
         "--async",
         "--judge-latency", "0.01", "--judge-concurrency", "4", "--rollout-batch", "4",
         "--work", str(tmp_path), "--toy-cache", str(small_toy.cache)],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("sampling_seconds", "judging_seconds", "reference_seconds", "round_seconds",
                "overlap_ratio", "sequential_round_seconds"):
        assert result[key] > 0, key
    assert result["same_pairs"] is True
    # The same judge requests either way (the same answers, asked in the same calls).
    requests = result["judge_requests"]
    assert 0 < requests["pipelined"] == requests["sequential"]
    # Async: round 1's answers are the initial policy's, not the same answers (requests differ).
    assert requests["async"] > 0
    ahead = result["async"]
    assert ahead["policy_rounds"] == [0, 0] and ahead["steps"] == 4
    assert ahead["speedup"] == pytest.approx(
        result["run_seconds"]["pipelined"] / result["run_seconds"]["async"])
    assert ahead["async_steps_per_second"] == pytest.approx(4 / result["run_seconds"]["async"])
    pipelined, seq = result["pipelined"], result["sequential"]
    assert result["overlap_ratio"] == pytest.approx(pipelined["round_seconds"] / max(
        pipelined["sampling_seconds"], pipelined["judging_seconds"] + pipelined["reference_seconds"]))
    assert result["sequential_round_seconds"] == seq["round_seconds"]
    # Sequential: the phases run one after another, so the round is their sum (plus writing
    # the round's files and the bookkeeping around them).
    phases = seq["sampling_seconds"] + seq["judging_seconds"] + seq["reference_seconds"]
    assert phases <= seq["round_seconds"] <= 1.25 * phases + 1.0
