"""slurm/fit.sbatch on a real SLURM cluster of two nodes on this machine (scripts/slurm_cluster.sh
start DIR 2: munged, slurmctld and two slurmd): 2 nodes x 2 CPU tasks, DDP over gloo, every
task exiting k seconds after its run returns (rank k; tests/slurm_task.py), so the tasks never
stop together. Preempted three times in one job (twice through the batch shell, once
through the tasks), the job finishes where an uninterrupted one does; a task SIGKILLed fails
the job at once, and submitting the same command again finishes it. DeepSpeed ZeRO-2 on one
node x 2 tasks, preempted once, ends as the same run started without SLURM."""

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

    def __init__(self, env, run: Path, cache: Path, marks: Path, *task_args: str,
                 resources: list[str] = RESOURCES, overrides: list[str] = OVERRIDES):
        marks.mkdir(parents=True, exist_ok=True)
        python = marks / "python"  # RDPO_PYTHON: a task's `-m rdpo.fit` is tests/slurm_task.py
        python.write_text(
            f'#!/bin/sh\nif [ "$1 $2" = "-m rdpo.fit" ] && [ "$3" != --print-run-dir ]; then\n'
            f'  shift 2\n  exec {sys.executable} {ROOT}/tests/slurm_task.py --marks {marks} '
            f'{" ".join(task_args)} "$@"\nfi\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
        self.env = {**env, "RDPO_PYTHON": str(python)}
        self.run, self.marks = run, marks
        args = ["sbatch", "--parsable", *resources, f"--output={marks}/slurm-%j.out",
                f"--chdir={ROOT}", str(ROOT / "slurm/fit.sbatch"), "configs/quickstart.yaml",
                *overrides, f"run.dir={run}", f"toy.cache_dir={cache}"]
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


PREEMPTIONS = [(1, True), (3, True), (6, False)]
"""(step, to the batch shell?): the signal arrives while every task waits after that step."""
SAVED = [2, 4, 7]
"""Where the tasks stop: the next step boundary (4: a round's end, saved at the epoch's end)."""


def test_preempted_three_times_ends_like_an_uninterrupted_run(cluster, small_toy, reference,
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
    assert log.count("rdpo-fit: preemption signal") == 2  # the third went to the tasks only
    saved = re.findall(rf"rdpo-fit: preemption checkpoint saved at step (\d+); requeueing job "
                       rf"{job.id}\n", log)
    assert [int(s) for s in saved] == SAVED, log
    # Every task of every start exited 0, one second apart; srun never reported a failure.
    assert "srun: error" not in log and "not requeued" not in log, log
    for k in range(4):
        assert log.count(f"slurm_task: rank {k} exits with status 0 after {k} s") == 4
    assert log.count(f"resuming from {tmp_path / 'run/checkpoints/last.ckpt'}") == 3 * 4
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


FAKE_VLLM = '''#!{python}
"""`vllm serve MODEL --host H --port P ...`: records its command line and VLLM_API_KEY, answers
GET /v1/models only with that key (as vLLM does)."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
with open(os.environ["FAKE_VLLM_LOG"], "w") as f:
    json.dump({{"argv": args, "key": os.environ.get("VLLM_API_KEY")}}, f)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Authorization") == "Bearer " + os.environ["VLLM_API_KEY"]
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{{"data": []}}')

    def log_message(self, *args):
        pass


HTTPServer((args[args.index("--host") + 1], int(args[args.index("--port") + 1])),
           Handler).serve_forever()
'''


def _fake_bin(folder: Path, env: dict, **scripts: str) -> dict:
    """`env` without API keys, with PATH starting at `folder`, which holds `scripts`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    env = {k: v for k, v in env.items() if k not in ("RDPO_JUDGE_API_KEY", "OPENAI_API_KEY")}
    return {**env, "PATH": f"{folder}:{env['PATH']}"}


def test_judge_server_refuses_an_open_or_unreachable_address(tmp_path):
    """--host/--api-key in the vllm options are refused (the script sets both); a node whose
    name resolves to loopback only is refused unless RDPO_JUDGE_HOST names the address."""
    script = str(ROOT / "slurm/judge_server.sbatch")
    env = _fake_bin(tmp_path / "bin", dict(os.environ), hostname="#!/bin/sh\necho node1\n",
                    getent="#!/bin/sh\necho '127.0.1.1       STREAM node1'\n")
    for option in (["--host", "0.0.0.0"], ["--api-key=abc"]):
        out = subprocess.run(["bash", script, "m", str(tmp_path / "url"), *option], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 2, out
        assert "use RDPO_JUDGE_HOST for the address, RDPO_JUDGE_API_KEY for the key" in out.stderr
    out = subprocess.run(["bash", script, "m", str(tmp_path / "url")], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert ("node1 resolves to no address but loopback: other nodes could not reach the server; "
            "set RDPO_JUDGE_HOST to this node's internal address") in out.stderr
    assert not (tmp_path / "url.key").exists()


def test_judge_server_key_reaches_the_fit_job(cluster, tmp_path):
    """judge_server.sbatch serves on the address asked (not 0.0.0.0) with a generated key
    (URL_FILE.key, mode 0600, given to vLLM through VLLM_API_KEY, never on its command line);
    fit.sbatch's tasks get the URL and the key (judge.api_key_env); both files go when the
    server stops."""
    import json
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url_file, marks = tmp_path / "judge.url", tmp_path / "marks"
    marks.mkdir()
    python = (f'#!/bin/sh\ncase " $* " in *" --print-run-dir "*) echo {tmp_path}/run; exit 0;; '
              f'esac\necho "$@" >{marks}/args\nprintf %s "$RDPO_JUDGE_API_KEY" >{marks}/key\n')
    env = {**_fake_bin(tmp_path / "bin", cluster, python=python,
                       vllm=FAKE_VLLM.format(python=sys.executable)),
           "FAKE_VLLM_LOG": str(tmp_path / "vllm.json"), "RDPO_JUDGE_HOST": "127.0.0.1",
           "RDPO_JUDGE_PORT": str(port), "RDPO_PYTHON": str(tmp_path / "bin/python"),
           "RDPO_JUDGE_URL_FILE": str(url_file)}
    sbatch = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
              "--time=5", f"--chdir={ROOT}"]
    judge = subprocess.run([*sbatch, "--ntasks=1", f"--output={tmp_path}/judge-%j.out",
                            str(ROOT / "slurm/judge_server.sbatch"), "judge-model", str(url_file),
                            "--max-model-len", "64"], env=env, check=True, capture_output=True,
                           text=True).stdout.strip()

    def log() -> str:
        return "\n".join(p.read_text() for p in tmp_path.glob("*-*.out"))

    def queued(job: str) -> bool:
        return bool(subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                                   text=True).stdout.strip())

    deadline = time.monotonic() + 120
    while not url_file.exists():
        assert queued(judge) and time.monotonic() < deadline, f"no URL file:\n{log()}"
        time.sleep(0.2)
    url = url_file.read_text().strip()
    key_file = Path(f"{url_file}.key")
    key = key_file.read_text().strip()
    assert url == f"http://127.0.0.1:{port}/v1"
    assert re.fullmatch(r"[0-9a-f]{64}", key) and key_file.stat().st_mode & 0o777 == 0o600
    seen = json.loads((tmp_path / "vllm.json").read_text())
    assert seen["key"] == key and key not in " ".join(seen["argv"])
    assert seen["argv"][:6] == ["serve", "judge-model", "--host", "127.0.0.1", "--port", str(port)]
    assert "0.0.0.0" not in seen["argv"] and "--api-key" not in seen["argv"]
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{url}/models", timeout=10)
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
    assert urllib.request.urlopen(request, timeout=10).status == 200

    fit = subprocess.run([*sbatch, "--ntasks-per-node=1", f"--output={tmp_path}/fit-%j.out",
                          str(ROOT / "slurm/fit.sbatch"), "configs/quickstart.yaml"], env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    deadline = time.monotonic() + 120
    while queued(fit):
        assert time.monotonic() < deadline, log()
        time.sleep(0.2)
    args = (marks / "args").read_text().split()
    assert f"judge.base_url={url}" in args and "judge.api_key_env=RDPO_JUDGE_API_KEY" in args
    assert (marks / "key").read_text() == key

    subprocess.run(["scancel", judge], env=env, check=True)
    deadline = time.monotonic() + 60
    while url_file.exists() or key_file.exists():
        assert time.monotonic() < deadline, f"URL or key file left:\n{log()}"
        time.sleep(0.2)


@pytest.mark.deepspeed
def test_deepspeed_preempted_requeued_and_resumed(cluster, small_toy, zero2_run, tmp_path):
    """DeepSpeed ZeRO-2 on one node x 2 CPU tasks (the run of tests/deepspeed_runs.py):
    preempted once through the batch shell while both tasks wait after step 5, it saves its
    folder checkpoint at step 6, is requeued, resumes from it and finishes as the same run
    started without SLURM (`zero2_run`) finished: rollouts, pairs, losses, adapter weights."""
    from deepspeed_runs import deepspeed_overrides, losses

    run = tmp_path / "run"
    job = Job(cluster, run, small_toy.cache, tmp_path / "marks", "--hold", "5",
              resources=["--nodes=1", *RESOURCES[1:]], overrides=deepspeed_overrides(2))
    deadline = time.monotonic() + 360
    held = [job.marks / f"held-5-rank-{k}" for k in range(2)]
    job.wait_for(lambda: all(p.exists() for p in held), deadline, "both held at step 5")
    job.signal(to_batch_shell=True)
    job.wait_gone(deadline)

    log = job.log()
    starts = [line for line in log.splitlines() if line.startswith("rdpo-fit: job ")]
    assert starts == [f"rdpo-fit: job {job.id}, start {k}, 1 node(s) x 2 task(s)"
                      for k in range(2)], log
    assert f"preemption checkpoint saved at step 6; requeueing job {job.id}" in log, log
    assert log.count("preemption signal: checkpoint saved at step 6") == 2, log  # once a rank
    assert log.count(f"resuming from {run / 'checkpoints/last.ckpt'}") == 2, log
    assert (run / "checkpoints/last.ckpt/rdpo-complete").is_file()
    for r in ("0000", "0001"):
        for name in ("rollouts.jsonl", "pairs.jsonl"):
            assert jsonl(run / "rounds" / r / name) == jsonl(zero2_run / "rounds" / r / name)
    assert losses(run) == losses(zero2_run) and len(losses(run)) == 8
    weights = load_file(run / "adapter/adapter_model.safetensors")
    expected = load_file(zero2_run / "adapter/adapter_model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
