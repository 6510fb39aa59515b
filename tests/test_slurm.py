"""slurm/fit.sbatch on a real SLURM cluster of two nodes on this machine (scripts/slurm_cluster.sh
start DIR 2: munged, slurmctld and two slurmd): 2 nodes x 2 CPU tasks, DDP over gloo, every
task exiting k seconds after its run returns (rank k; tests/slurm_task.py), so the tasks never
stop together. Preempted four times in one job (three times through the batch shell, once
through the tasks), the job finishes where an uninterrupted one does; a task SIGKILLed fails
the job at once, and submitting the same command again finishes it."""

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scale_runs import ROOT, RUN, jsonl

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts/slurm_cluster.sh"
RESOURCES = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
             "--time=10"]
STEPS = 12
OVERRIDES = [*RUN, f"dpo.max_steps={STEPS}", "data.prompts_per_round=4", "run.strategy=ddp",
             "run.accelerator=cpu"]
"""Three rounds of four steps; 4 prompts per rank and round (16 in all)."""
ROUNDS = ["0000", "0001", "0002"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root (CI runs as root)")
    if not shutil.which("slurmctld"):
        subprocess.run([SCRIPT, "install"], check=True, timeout=600)
    directory = tmp_path_factory.mktemp("slurm")
    # The second node's name does not resolve: DDP finds rank 0 through MASTER_ADDR.
    env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf"), "MASTER_ADDR": "127.0.0.1"}
    try:
        subprocess.run([SCRIPT, "start", directory, "2"], check=True, timeout=60, env=env)
        yield env
    finally:
        subprocess.run([SCRIPT, "stop", directory], timeout=60, env=env)


class Job:
    """`sbatch slurm/fit.sbatch` of the small toy on 2 x 2 tasks, run by tests/slurm_task.py with
    `task_args`; `marks` is where the tasks leave their marks."""

    def __init__(self, env, run: Path, cache: Path, marks: Path, *task_args: str):
        marks.mkdir(parents=True, exist_ok=True)
        python = marks / "python"  # RDPO_PYTHON: a task's `-m rdpo.fit` is tests/slurm_task.py
        python.write_text(
            f'#!/bin/sh\nif [ "$1 $2" = "-m rdpo.fit" ] && [ "$3" != --print-run-dir ]; then\n'
            f'  shift 2\n  exec {sys.executable} {ROOT}/tests/slurm_task.py --marks {marks} '
            f'{" ".join(task_args)} "$@"\nfi\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
        self.env = {**env, "RDPO_PYTHON": str(python)}
        self.run, self.marks = run, marks
        args = ["sbatch", "--parsable", *RESOURCES, f"--output={marks}/slurm-%j.out",
                f"--chdir={ROOT}", str(ROOT / "slurm/fit.sbatch"), "configs/quickstart.yaml",
                *OVERRIDES, f"run.dir={run}", f"toy.cache_dir={cache}"]
        self.id = subprocess.run(args, env=self.env, check=True, capture_output=True,
                                 text=True).stdout.strip()
        self.out = marks / f"slurm-{self.id}.out"

    def log(self) -> str:
        return self.out.read_text() if self.out.exists() else "(no output yet)"

    def queued(self) -> bool:
        out = subprocess.run(["squeue", "-h", "-j", self.id, "-o", "%T"], env=self.env,
                             capture_output=True, text=True)
        return bool(out.stdout.strip())

    def wait_for(self, done, deadline: float, what: str) -> None:
        while not done():
            assert self.queued(), f"job ended before {what}:\n{self.log()}"
            assert time.monotonic() < deadline, f"{what}: not reached in time:\n{self.log()}"
            time.sleep(0.1)

    def wait_gone(self, deadline: float) -> float:
        while self.queued():
            assert time.monotonic() < deadline, f"job still running:\n{self.log()}"
            time.sleep(0.2)
        return time.time()

    def signal(self, to_batch_shell: bool) -> None:
        """USR1 as SLURM sends it before the time limit: --signal=B:USR1@T signals the batch
        shell (scancel --batch), --signal=USR1@T every task of the job's steps."""
        where = ["--batch"] if to_batch_shell else []
        subprocess.run(["scancel", *where, "--signal=USR1", self.id], env=self.env, check=True)


@pytest.fixture(scope="module")
def reference(cluster, small_toy, tmp_path_factory):
    """The uninterrupted run on the same 4 tasks and seed."""
    base = tmp_path_factory.mktemp("slurm-reference")
    job = Job(cluster, base / "run", small_toy.cache, base / "marks")
    job.wait_gone(time.monotonic() + 180)
    assert (base / "run/adapter/adapter_model.safetensors").is_file(), job.log()
    assert "start 1" not in job.log()
    return base / "run"


def _same_run(run: Path, reference: Path) -> None:
    """Same rollouts, pairs, losses and adapter weights, bit for bit (CPU, fixed seed)."""
    for r in ROUNDS:
        for name in ("rollouts.jsonl", "pairs.jsonl"):
            assert jsonl(run / "rounds" / r / name) == jsonl(reference / "rounds" / r / name)
    assert jsonl(reference / "rounds/0002/pairs.jsonl")[:-1], "no pairs: nothing compared"
    assert _losses(run) == _losses(reference) and len(_losses(run)) == STEPS
    weights = load_file(run / "adapter/adapter_model.safetensors")
    expected = load_file(reference / "adapter/adapter_model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    assert any(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)  # trained


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader((run / "logs/metrics.csv").open())
    return [(int(r["step"]), float(r["train/dpo_loss_step"])) for r in rows
            if r.get("train/dpo_loss_step")]


PREEMPTIONS = [(1, True), (3, True), (6, False), (9, True)]
"""(step, to the batch shell?): the signal arrives while every task waits after that step."""
SAVED = [2, 4, 7, 10]
"""Where the tasks stop: the next step boundary (4: a round's end, saved at the epoch's end)."""


def test_preempted_four_times_ends_like_an_uninterrupted_run(cluster, small_toy, reference,
                                                             tmp_path):
    holds = ",".join(str(step) for step, _ in PREEMPTIONS)
    job = Job(cluster, tmp_path / "run", small_toy.cache, tmp_path / "marks", "--hold", holds)
    deadline = time.monotonic() + 360
    for step, to_batch_shell in PREEMPTIONS:
        held = [job.marks / f"held-{step}-rank-{k}" for k in range(4)]
        job.wait_for(lambda held=held: all(p.exists() for p in held), deadline,
                     f"all held at step {step}")
        job.signal(to_batch_shell)
    job.wait_gone(deadline)

    log = job.log()
    starts = [line for line in log.splitlines() if line.startswith("rdpo-fit: job ")]
    assert starts == [f"rdpo-fit: job {job.id}, start {k}, 2 node(s) x 2 task(s)"
                      for k in range(len(PREEMPTIONS) + 1)], log
    assert log.count("rdpo-fit: preemption signal") == 3  # the fourth went to the tasks only
    saved = re.findall(rf"rdpo-fit: preemption checkpoint saved at step (\d+); requeueing job "
                       rf"{job.id}\n", log)
    assert [int(s) for s in saved] == SAVED, log
    # Every task of every start exited 0, one second apart; srun never reported a failure.
    assert "srun: error" not in log and "not requeued" not in log, log
    for k in range(4):
        assert log.count(f"slurm_task: rank {k} exits with status 0 after {k} s") == 5
    assert log.count(f"resuming from {tmp_path / 'run/checkpoints/last.ckpt'}") == 4 * 4
    _same_run(tmp_path / "run", reference)


def test_killed_task_fails_the_job_fast_and_resubmitting_resumes(cluster, small_toy, reference,
                                                                 tmp_path):
    run, cache = tmp_path / "run", small_toy.cache
    job = Job(cluster, run, cache, tmp_path / "marks", "--kill-rank", "2", "--kill-step", "6")
    ended = job.wait_gone(time.monotonic() + 240)
    killed = float((job.marks / "killed").read_text())
    log = job.log()
    assert ended - killed < 60, f"job ended {ended - killed:.0f} s after the kill:\n{log}"
    assert re.search(rf"rdpo-fit: job {job.id}, start 0: a task failed \(srun status \d+\); not "
                     rf"requeued. Last checkpoint: {run}/checkpoints/last.ckpt; submit the same "
                     rf"command again to resume from it", log), log
    assert "start 1" not in log and "requeueing" not in log
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # round 1 built; steps 5 and 6 are done again

    again = Job(cluster, run, cache, tmp_path / "marks-again")
    again.wait_gone(time.monotonic() + 180)
    log = again.log()
    assert f"rdpo-fit: job {again.id}, start 0, 2 node(s) x 2 task(s)" in log
    assert log.count(f"resuming from {run}/checkpoints/last.ckpt") == 4, log
    _same_run(run, reference)
