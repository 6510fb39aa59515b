"""slurm/fit.sbatch on a real single-node SLURM cluster (munged, slurmctld, slurmd started by
scripts/slurm_cluster.sh): 2 CPU tasks (DDP over srun), preempted once mid-run, requeued,
resumed from its checkpoint, finished."""

import os
import shutil
import subprocess
import time

import pytest
import torch
from scale_runs import ROOT, RUN, jsonl

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts/slurm_cluster.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root (CI runs as root)")
    if not shutil.which("slurmctld"):
        subprocess.run([SCRIPT, "install"], check=True, timeout=600)
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}
    try:
        subprocess.run([SCRIPT, "start", directory], check=True, timeout=60, env=env)
        yield env
    finally:
        subprocess.run([SCRIPT, "stop", directory], timeout=60, env=env)


def _squeue(env, job):
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                         text=True)
    return out.stdout.strip()


def test_fit_sbatch_preempted_requeued_resumed(cluster, small_toy, tmp_path):
    cache = small_toy.cache
    run = tmp_path / "run"
    env = {**cluster, "RDPO_PYTHON": str(ROOT / ".venv/bin/python")}
    args = ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
            "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
            f"--output={tmp_path}/slurm-%j.out", f"--chdir={ROOT}",
            str(ROOT / "slurm/fit.sbatch"), "configs/quickstart.yaml", *RUN,
            "data.prompts_per_round=8", f"run.dir={run}", f"toy.cache_dir={cache}",
            "run.strategy=ddp", "run.accelerator=cpu"]
    job = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout.strip()
    out = tmp_path / f"slurm-{job}.out"
    deadline = time.monotonic() + 240
    while not (run / "rounds/0000").is_dir():  # round 0 built: training is under way
        assert _squeue(env, job), out.read_text() if out.exists() else "job vanished"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # What a preemption does: SLURM signals the batch shell (#SBATCH --signal=B:USR1@...).
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    while _squeue(env, job):
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.5)
    log = out.read_text()
    assert f"rdpo-fit: job {job}, start 0, 1 node(s) x 2 task(s)" in log
    assert "rdpo-fit: preemption signal" in log
    assert "preemption signal: checkpoint saved at step" in log
    assert f"rdpo-fit: checkpoint saved; requeueing job {job}" in log
    assert f"rdpo-fit: job {job}, start 1, 1 node(s) x 2 task(s)" in log
    assert log.count(f"resuming from {run / 'checkpoints/last.ckpt'}") == 2  # both ranks
    stopped = int(log.split("preemption signal: checkpoint saved at step ")[1].split(",")[0])
    assert 0 < stopped < 8  # mid-run, not before or after training
    for name in ("adapter/adapter_model.safetensors", "eval.json", "rounds/0000/pairs.jsonl",
                 "rounds/0001/pairs.jsonl"):
        assert (run / name).is_file(), name
    assert len(jsonl(run / "rounds/0001/rollouts.jsonl")) == 16 * 4  # both ranks' rollouts
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    import csv

    steps = [int(r["step"]) for r in csv.DictReader((run / "logs/metrics.csv").open())
             if r.get("train/dpo_loss_step")]
    assert steps == list(range(8))  # every step once across the two starts
