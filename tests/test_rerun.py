"""A run directory holds one run: a second run into it is refused (or deletes the first, on
purpose: run.overwrite), a resume continues only the run its checkpoint was written by (or
accepts named changes, on purpose, recorded in resumes.jsonl), and files are written atomically."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from scale_runs import ROOT, RUN, fit_cli, log_text
from small_toy import QUICKSTART

from rdpo import rundir
from rdpo.config import ConfigError, load_config
from rdpo.rundir import StartRefused, atomic_write, changes, check_dir, check_resume

SHORT = ["dpo.max_steps=2", "rollout.every_n_steps=2"]
"""One round of two steps: the smallest finished run."""


# -- fast: the pieces ------------------------------------------------------------------------

def _cfg(run_dir, *extra):
    return load_config(None, [f"run.dir={run_dir}", "model.path=/m", "data.train_pool=/p.jsonl",
                              *extra])


def _earlier_run(run_dir: Path) -> Path:
    (run_dir / "rounds/0000").mkdir(parents=True)
    (run_dir / "rounds/0000/pairs.jsonl").write_text("{}\n")
    (run_dir / "config.yaml").write_text("run: {}\n")
    (run_dir / "eval.json").write_text("{}\n")
    return run_dir


def test_a_new_run_in_a_used_run_dir_is_refused(tmp_path):
    run_dir = _earlier_run(tmp_path / "run")
    with pytest.raises(StartRefused) as err:
        check_dir(_cfg(run_dir), None)
    message = str(err.value)
    assert f"run.dir={run_dir} is not empty (config.yaml, eval.json, rounds/)" in message
    assert "run.resume=auto" in message and "run.overwrite=true" in message
    assert (run_dir / "rounds/0000/pairs.jsonl").is_file()
    check_dir(_cfg(tmp_path / "new"), None)  # missing or empty: a new run starts
    (tmp_path / "empty").mkdir()
    check_dir(_cfg(tmp_path / "empty"), None)


def test_overwrite_deletes_a_run_dir_and_nothing_else(tmp_path, monkeypatch):
    run_dir = _earlier_run(tmp_path / "run")
    check_dir(_cfg(run_dir, "run.overwrite=true"), None)
    assert run_dir.is_dir() and not list(run_dir.iterdir())
    # A folder holding anything rdpo does not write is not deleted.
    mine = _earlier_run(tmp_path / "mine")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(StartRefused, match=r"does not look like a run directory \(it holds files "
                                           r"rdpo does not write \(notes.txt\)\)"):
        check_dir(_cfg(mine, "run.overwrite=true"), None)
    assert (mine / "notes.txt").is_file() and (mine / "eval.json").is_file()
    # Nor one without rdpo's config.yaml, nor the home or working directory or a folder above.
    (mine / "notes.txt").unlink()
    (mine / "config.yaml").unlink()
    with pytest.raises(StartRefused, match="it has no config.yaml"):
        check_dir(_cfg(mine, "run.overwrite=true"), None)
    home = _earlier_run(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "rounds")
    for where in (home, home / "rounds", Path("/")):
        with pytest.raises(StartRefused, match="refusing to delete the contents"):
            rundir._check_clearable(where, sorted(where.iterdir()))
    assert (home / "rounds/0000/pairs.jsonl").is_file()


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match="run.overwrite: deletes the earlier run that "
                                          "run.resume=auto continues: choose one"):
        _cfg(tmp_path, "run.overwrite=true", "run.resume=auto")


def test_auto_without_a_checkpoint_does_not_start_over_a_finished_run(tmp_path):
    run_dir = _earlier_run(tmp_path / "run")
    with pytest.raises(StartRefused, match=r"found no checkpoint to continue, and the directory "
                                           r"holds a finished run \(eval.json\)"):
        check_dir(_cfg(run_dir, "run.resume=auto"), None)
    (run_dir / "eval.json").unlink()  # a start that stopped before its first checkpoint
    check_dir(_cfg(run_dir, "run.resume=auto"), None)


def test_changes_name_old_and_new_and_skip_free_keys(tmp_path):
    saved = rundir._flatten({"dpo": {"beta": 0.1, "lr": 1e-4, "max_steps": 40,
                                     "schedule": "constant"},
                             "judge": {"base_url": "http://a", "model": "j"}})
    now = {**saved, "dpo.beta": 0.9, "judge.base_url": "http://b", "dpo.max_steps": 80,
           "data.train_pool (contents)": "sha256:" + "1" * 64, "pairs.min_margin": 0.1}
    saved["data.train_pool (contents)"] = "sha256:" + "0" * 64
    found = changes(saved, now)
    # judge.base_url is free; max_steps extends a constant schedule; pairs.min_margin is absent
    # from the checkpoint but at its default.
    assert [str(c) for c in found] == ["data.train_pool (contents): sha256:000000000000… → "
                                       "sha256:111111111111…", "dpo.beta: 0.1 → 0.9"]
    cosine = {**now, "dpo.schedule": "cosine"}
    assert "dpo.max_steps" in [c.key for c in changes({**saved, "dpo.schedule": "cosine"}, cosine)]
    cfg = _cfg(tmp_path)
    with pytest.raises(StartRefused) as err:
        check_resume(cfg, Path("last.ckpt"), saved, now)
    assert "dpo.beta: 0.1 → 0.9" in str(err.value)
    assert "run.resume_accept=[data.train_pool,dpo.beta]" in str(err.value)
    accepted = check_resume(_cfg(tmp_path, "run.resume_accept=[dpo,data.train_pool]"),
                            Path("last.ckpt"), saved, now)
    assert accepted == found
    # The held-out pool and the evaluation settings measured eval_before.json: never accepted.
    with pytest.raises(StartRefused, match=r"eval.temperature: 1.0 → 0.0 cannot be accepted"):
        check_resume(_cfg(tmp_path, "run.resume_accept=[eval]"), Path("last.ckpt"),
                     {**saved, "eval.temperature": 1.0}, {**saved, "eval.temperature": 0.0})
    with pytest.raises(ConfigError, match="'dpo.betta' is not a setting"):
        rundir.check_accept_keys(_cfg(tmp_path, "run.resume_accept=[dpo.betta]"))


def test_eval_before_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """eval_before.json is written beside and renamed over the old one (`atomic_write`): a
    write that fails (here: the rename, as a full disk would) leaves the old file whole."""
    from rdpo.callbacks.heldout import HeldoutEvaluation

    (tmp_path / "eval_before.json").write_text("old\n")
    heldout = HeldoutEvaluation([object()], None, None, run_dir=tmp_path)
    result = {"rubric_score": 0.5, "essential_pass_rate": 0.5, "fully_judged": 2, "responses": 2,
              "truncated": 0}
    monkeypatch.setattr(heldout, "evaluate", lambda *a: result)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        heldout.on_train_start(SimpleNamespace(is_global_zero=True, loggers=[]), None)
    assert (tmp_path / "eval_before.json").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["eval_before.json"]  # no temporary left
    monkeypatch.undo()
    atomic_write(tmp_path / "eval_before.json", "new\n")
    assert (tmp_path / "eval_before.json").read_text() == "new\n"


def test_checkpoint_is_on_disk_before_it_replaces_the_previous(tmp_path, monkeypatch):
    """The single-file checkpoint: the new file is fsynced before the rename and the folder
    after it; until the rename, last.ckpt is the previous checkpoint."""
    from rdpo.callbacks.checkpoint import RoundCheckpoint

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        assert (tmp_path / "last.ckpt").read_bytes() == b"previous"
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    (tmp_path / "last.ckpt").write_bytes(b"previous")
    trainer = SimpleNamespace(
        is_global_zero=True, global_step=3,
        strategy=SimpleNamespace(barrier=lambda *a: None),
        save_checkpoint=lambda path, weights_only=False: Path(path).write_bytes(b"new"))
    RoundCheckpoint(tmp_path, 1).save(trainer)
    assert (tmp_path / "last.ckpt").read_bytes() == b"new"
    assert events == [("fsync", str(tmp_path / "last.ckpt.tmp")),
                      ("replace", str(tmp_path / "last.ckpt")), ("fsync", str(tmp_path))]


# -- slow: a finished run, then a second command into its run.dir ---------------------------

@pytest.fixture(scope="module")
def finished(small_toy, tmp_path_factory):
    """A finished one-round run (its run.dir is never changed: tests work on copies)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = fit_cli(run_dir, small_toy.cache, *SHORT)
    assert proc.returncode == 0, log_text(run_dir)
    return run_dir


def _copy(finished, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


def _config(run_dir, small_toy, *extra):
    return load_config(QUICKSTART, [*RUN, *SHORT, f"run.dir={run_dir}",
                                    f"toy.cache_dir={small_toy.cache}", *extra])


@pytest.mark.slow
def test_second_run_into_a_finished_run_is_refused(finished, small_toy, tmp_path):
    from rdpo.fit import fit

    run_dir = _copy(finished, tmp_path)
    before = _files(run_dir)
    assert {"config.yaml", "eval.json", "adapter/adapter_model.safetensors",
            "checkpoints/last.ckpt", "logs/metrics.csv"} <= set(before)
    proc = fit_cli(run_dir, small_toy.cache, *SHORT)
    out = log_text(run_dir)
    assert proc.returncode == 2, out
    assert f"error: run.dir={run_dir} is not empty" in out
    assert "Continue it with run.resume=auto, start over with run.overwrite=true" in out
    with pytest.raises(ConfigError, match="is not empty"):
        fit(_config(run_dir, small_toy))
    assert _files(run_dir) == before  # byte for byte


@pytest.mark.slow
def test_overwrite_deletes_the_earlier_run_first(finished, small_toy, tmp_path):
    run_dir = _copy(finished, tmp_path)
    (run_dir / "rounds/0007").mkdir()  # a round of an earlier, longer run
    old = json.loads((run_dir / "eval.json").read_text())
    proc = fit_cli(run_dir, small_toy.cache, *SHORT, "run.overwrite=true", "run.seed=1")
    assert proc.returncode == 0, log_text(run_dir)
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == ["0000"]
    assert json.loads((run_dir / "eval.json").read_text()) != old  # the new run's (seed 1)
    saved = load_config(run_dir / "config.yaml")
    assert saved.run.seed == 1 and saved.run.overwrite is False  # one start only


@pytest.mark.slow
def test_resume_with_another_beta_is_refused(finished, small_toy, tmp_path):
    run_dir = _copy(finished, tmp_path)
    before = _files(run_dir)
    proc = fit_cli(run_dir, small_toy.cache, *SHORT, "run.resume=auto", "dpo.beta=0.9")
    out = log_text(run_dir)
    assert proc.returncode == 2, out
    assert f"run.resume=auto: {run_dir / 'checkpoints/last.ckpt'} was written by a run with " \
           "other settings:\n    dpo.beta: 0.5 → 0.9\n" in out
    assert "run.resume_accept=[dpo.beta]" in out
    assert _files(run_dir) == before  # config.yaml (and every other file) unchanged


def _edited_pool(small_toy, where: Path, edit) -> Path:
    """A copy of the train pool with its images, changed by `edit(records, folder)`."""
    src = Path(small_toy.paths.train_pool)
    shutil.copytree(src.parent, where)
    pool = where / src.name
    records = [json.loads(line) for line in pool.read_text().splitlines()]
    edit(records, where)
    pool.write_text("".join(json.dumps(r) + "\n" for r in records))
    return pool


@pytest.mark.slow
def test_resume_with_a_pool_edited_at_the_same_size_is_refused(finished, small_toy, tmp_path):
    from rdpo.fit import fit

    run_dir = _copy(finished, tmp_path)
    before = _files(run_dir)

    def reword(records, folder):
        records[3]["instruction"] += " Answer briefly."

    def repaint(records, folder):
        image = folder / records[3]["images"][0]
        with Image.open(image) as im:
            im = im.convert("RGB")
        im.putpixel((0, 0), (1, 2, 3))
        im.save(image)

    for name, edit in (("reworded", reword), ("repainted", repaint)):
        pool = _edited_pool(small_toy, tmp_path / name, edit)
        cfg = _config(run_dir, small_toy, "run.resume=auto", f"data.train_pool={pool}")
        with pytest.raises(StartRefused, match=r"data.train_pool \(contents\): sha256:\w+… → "
                                               r"sha256:\w+…\n.*run.resume_accept="
                                               r"\[data.train_pool\]") as err:
            fit(cfg)
        assert "dpo." not in str(err.value)  # the pool's path itself may change
    assert _files(run_dir) == before


@pytest.mark.slow
def test_a_change_accepted_on_purpose_is_resumed_and_recorded(finished, small_toy, tmp_path):
    run_dir = _copy(finished, tmp_path)
    proc = fit_cli(run_dir, small_toy.cache, "run.resume=auto", "dpo.beta=0.9",
                   "dpo.max_steps=4", "rollout.every_n_steps=2",
                   "run.resume_accept=[dpo.beta,dpo.max_steps]")
    out = log_text(run_dir)
    assert proc.returncode == 0, out
    assert "resuming with a changed setting (run.resume_accept): dpo.beta: 0.5 → 0.9" in out
    history = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert len(history) == 1
    assert history[0]["checkpoint"] == str(run_dir / "checkpoints/last.ckpt")
    assert history[0]["step"] == 2
    assert history[0]["accepted"] == {"dpo.beta": [0.5, 0.9], "dpo.max_steps": [2, 4]}
    saved = load_config(run_dir / "config.yaml")  # written once the checkpoint was restored
    assert saved.dpo.beta == 0.9 and saved.run.resume_accept == []
    assert (run_dir / "rounds/0001").is_dir()
    # The next resume compares with the accepted settings: nothing to accept again.
    cfg = _config(run_dir, small_toy, "run.resume=auto", "dpo.beta=0.9", "dpo.max_steps=4")
    from rdpo.fit import check_start

    assert check_start(cfg, dry_run=True).accepted == []


@pytest.mark.slow
def test_sbatch_resubmission_with_a_changed_config_is_refused(finished, small_toy, tmp_path):
    """slurm/fit.sbatch's own command lines, without SLURM: the batch shell's check refuses a
    changed config before srun starts any task; the same config reaches srun."""
    run_dir = _copy(finished, tmp_path)
    before = _files(run_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/srun-called\n')
    srun.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "RDPO_PYTHON": sys.executable}

    def sbatch(*extra):
        return subprocess.run(
            ["bash", str(ROOT / "slurm/fit.sbatch"), str(QUICKSTART), *RUN, *SHORT,
             f"run.dir={run_dir}", f"toy.cache_dir={small_toy.cache}", *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    proc = sbatch("dpo.beta=0.9")
    assert proc.returncode == 2, proc.stderr
    assert "dpo.beta: 0.5 → 0.9" in proc.stderr
    assert "rdpo-fit: job 7, start 0: refused before starting" in proc.stderr
    assert not (tmp_path / "srun-called").exists()
    assert _files(run_dir) == before
    proc = sbatch()
    assert proc.returncode == 0, proc.stderr
    assert "run.resume=auto" in (tmp_path / "srun-called").read_text()
