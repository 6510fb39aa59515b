"""The run directory: a new run never overwrites an earlier one, a resume continues only the run
that wrote its checkpoint, and the files a run's result is read from are written atomically.

- `check_dir`: a new run (``run.resume=none``) starts in an empty run.dir only; with
  ``run.overwrite=true`` rdpo first deletes what an earlier run left there, and only from a
  directory that is plainly a run directory (its config.yaml, nothing rdpo does not write).
- `run_settings`: what defines a run, stored in every checkpoint: the whole resolved config and
  a digest of each pool's contents (the JSONL and every image it names).
- `check_resume`: a resume whose settings differ from its checkpoint's is refused, naming each
  changed key (old → new), unless the keys are listed in ``run.resume_accept``; the keys that
  may change freely are `FREE` (each with its reason). Accepted changes go to the run's
  history, run.dir/resumes.jsonl (`record_resume`).
- `atomic_write`: temporary file, fsync, rename, fsync of the folder.

Light on purpose (no torch, no Lightning): rdpo.config imports `atomic_write`.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import OmegaConf

from rdpo.config import Config, ConfigError

log = logging.getLogger("rdpo")

CONFIG = "config.yaml"
HISTORY = "resumes.jsonl"


class StartRefused(ConfigError):
    """This command may not start in its run.dir (an earlier run is there, or its checkpoint was
    written with other settings); the message names the way out. Exit status 2."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        ValueError.__init__(self, "\n  ".join(problems))


# -- atomic writes ---------------------------------------------------------------------------

def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (a crash after it cannot bring the old entry back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (network, FUSE) do not sync folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` so that a crash at any moment leaves the old file or the new one,
    never part of one: a temporary file beside it, fsync, rename, fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


# -- a new run in run.dir --------------------------------------------------------------------

def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: `atomic_write`)."""
    atomic_write(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


RUN_FILES = ("config.yaml", HISTORY, "eval.json", "eval_before.json", "loggers.json",
             "report.png", "report.md", "cost.json", "judge_audit.json", "logs", "rounds",
             "judge_cache.sqlite*", "checkpoints", "adapter", "model", "adapters", "tensorboard", "wandb", "lightning_logs",
             "hpc_ckpt_*.ckpt", ".write-test-*", ".*.tmp-*")
"""What rdpo writes at the top of a run directory (fnmatch patterns): ``run.overwrite`` deletes a
directory holding these only."""

RESULTS = ("adapter", "model", "eval.json")
"""A finished run's results."""


def _entries(run_dir: Path) -> list[Path]:
    try:
        return sorted(run_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def is_empty(run_dir: Path) -> bool:
    """No run.dir yet, or nothing in it."""
    return not _entries(run_dir)


def _listing(entries: list[Path], most: int = 6) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _foreign(entries: list[Path]) -> list[Path]:
    return [p for p in entries if not any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_FILES)]


def check_dir(cfg: Config, checkpoint: Path | None, *, clear: bool = True) -> None:
    """Refuse a start that would overwrite an earlier run in run.dir (rank 0, before anything is
    written); with run.overwrite=true and `clear`, delete the earlier run first."""
    run_dir = Path(cfg.run.dir)
    entries = _entries(run_dir)
    if not entries:
        return
    if cfg.run.resume != "none":
        if checkpoint is not None:
            return  # a resume continues what is there (`check_resume` compares the settings)
        foreign = _foreign(entries)
        results = [p for p in entries if p.name in RESULTS]
        if foreign or results:
            what = (f"a finished run ({_listing(results)})" if results else
                    f"files rdpo does not write ({_listing(foreign)})")
            raise StartRefused([
                f"run.dir={run_dir}: run.resume={cfg.run.resume} found no checkpoint to continue, "
                f"and the directory holds {what}. Start over there with run.resume=none "
                f"run.overwrite=true (deletes it first), or choose a new run.dir"])
        log.info("%s: no checkpoint yet, starting the run", run_dir)
        return
    if not cfg.run.overwrite:
        raise StartRefused([
            f"run.dir={run_dir} is not empty ({_listing(entries)}): an earlier run is there, "
            f"and a new run would overwrite it. Continue it with run.resume=auto, start over "
            f"with run.overwrite=true (deletes what is in run.dir first), or choose a new run.dir"])
    _check_clearable(run_dir, entries)
    if clear:
        _clear(run_dir, entries)


def _check_clearable(run_dir: Path, entries: list[Path]) -> None:
    where = run_dir.resolve()
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve()}
    if where in protected or any(where in p.parents for p in protected):
        raise StartRefused([f"run.overwrite: refusing to delete the contents of run.dir={run_dir} "
                            f"({where}: the filesystem root, your home, the working directory "
                            f"or a folder above one): choose a new run.dir"])
    foreign = _foreign(entries)
    if foreign or not (run_dir / CONFIG).is_file():
        why = (f"it holds files rdpo does not write ({_listing(foreign)})" if foreign
               else f"it has no {CONFIG}")
        raise StartRefused([f"run.overwrite: run.dir={run_dir} does not look like a run "
                            f"directory ({why}): rdpo deletes only its own runs; empty it "
                            f"yourself or choose a new run.dir"])


def _clear(run_dir: Path, entries: list[Path]) -> None:
    # config.yaml last: a directory left half-deleted by a crash still reads as a run directory.
    for p in sorted(entries, key=lambda p: p.name == CONFIG):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    fsync_dir(run_dir)
    log.warning("run.overwrite: deleted the earlier run in %s (%s)", run_dir, _listing(entries))


def save_run_config(cfg: Config, run_dir: Path) -> None:
    """config.yaml: the resolved config, less what applies to one start only (run.overwrite,
    run.resume_accept), so that running it again cannot delete or accept anything by itself."""
    run = replace(cfg.run, overwrite=False, resume_accept=[])
    save_config(replace(cfg, run=run), run_dir / CONFIG)


# -- what a run is ---------------------------------------------------------------------------

CONTENTS = " (contents)"
"""Suffix of the pool-digest keys: ``data.train_pool (contents)``."""

FREE: dict[str, str] = {
    "run.dir": "where the run is, not what it is (a copied run directory resumes)",
    "run.resume": "how this start begins",
    "run.resume_accept": "this start's accepted changes",
    "run.overwrite": "this start's deletion of an earlier run",
    "run.progress_bar": "console output",
    "run.log_every_n_steps": "how often metrics are logged",
    "run.loggers": "where metrics are logged",
    "logger": "where metrics are logged",
    "run.report": "the plots written at the end",
    "run.threads": "CPU threads: speed",
    "run.checkpoint": "when checkpoints are written, not what is trained",
    "run.checkpoint_every_n_steps": "when checkpoints are written, not what is trained",
    "run.on_nonfinite": "what a non-finite loss does (skip it or stop); it changes no finite step",
    "model.path": "where the base is: its weights are compared by their fingerprint instead",
    "model.gradient_checkpointing": "memory for time: recomputation gives the same activations",
    "data.train_pool": "where the pool is: its contents are compared instead",
    "data.heldout_pool": "where the pool is: its contents are compared instead",
    "data.prompt_cache_mb": "memory bound of a cache of exact encodings",
    "data.vision_cache_mb": "memory bound of a cache of exact image features",
    "toy.cache_dir": "where the toy's files are: the toy's settings and pools are compared",
    "judge.base_url": "the judge server's address (a restarted server, a new job's node): "
                      "judge.model names the judge",
    "judge.api_key_env": "how requests are sent, not what is asked",
    "judge.concurrency": "how requests are sent, not what is asked",
    "judge.timeout": "how requests are sent, not what is asked",
    "judge.max_retries": "how requests are sent, not what is asked",
    "judge.rate_limit_retries": "how requests are sent, not what is asked",
    "judge.round_timeout": "how long judging may take, not what is asked",
    "judge.cache": "where verdicts are cached",
    "judge.price_input_per_mtok": "what cost.json says the tokens cost, not what is asked",
    "judge.price_output_per_mtok": "what cost.json says the tokens cost, not what is asked",
    "judge.audit": "a second judge that watches the rounds; no pair depends on it",
    "judge.audit_fraction": "how much the audit judge re-judges; no pair depends on it",
    "rollout.base_url": "the rollout server's address (a restarted server, a new job's node)",
    "rollout.api_key_env": "how requests are sent, not what is sampled",
    "rollout.concurrency": "how requests are sent, not what is sampled",
    "rollout.timeout": "how requests are sent, not what is sampled",
    "rollout.max_retries": "how requests are sent, not what is sampled",
    "rollout.pipeline": "when each phase of a round runs: the same rollouts, pairs and losses",
}
"""Settings that may change when a run resumes, each with why the run stays the same run
(a key or a whole section). ``dpo.max_steps`` may change too (to extend or shorten a run),
except under ``dpo.schedule=cosine``, whose learning rate of every step depends on it."""

FIXED: dict[str, str] = {
    "run.seed": "the rounds' prompts and samples follow the seed: another seed is another run",
    "run.devices": "the checkpoint holds each rank's pairs",
    "run.num_nodes": "the checkpoint holds each rank's pairs",
    "data.heldout_pool": "eval_before.json was measured on the old held-out pool",
    "eval": "eval_before.json was measured with the old evaluation settings",
}
"""Changes ``run.resume_accept`` cannot accept, with the reason: start a new run instead."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(key: str, names) -> str | None:
    """The entry of `names` that `key` is or lies under (``eval`` covers ``eval.temperature``;
    ``data.train_pool`` covers ``data.train_pool (contents)``)."""
    for name in names:
        if key == name or key.startswith(name + ".") or key.startswith(name + CONTENTS):
            return name
    return None


def pool_digest(path: str | os.PathLike | None) -> str | None:
    """sha256 of a pool: the JSONL file's bytes and the bytes of every image (and video frame)
    its records name, in order; None for no pool."""
    if not path:
        return None
    from rdpo.pool import file_digest, load_pool

    digest = hashlib.sha256(Path(path).read_bytes())
    seen: set[Path] = set()
    for record in load_pool(path, open_images=False):
        for image in (*record.images, *record.video):
            if image not in seen:
                seen.add(image)
                digest.update(file_digest(image).encode())
    return "sha256:" + digest.hexdigest()


def run_settings(cfg: Config) -> dict:
    """What defines the run: the resolved config as flat ``section.key`` entries, and
    ``data.train_pool (contents)`` / ``data.heldout_pool (contents)`` (`pool_digest`).
    Plain types only: the checkpoint stays loadable with torch.load(weights_only=True)."""
    flat = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    flat["data.train_pool" + CONTENTS] = pool_digest(cfg.data.train_pool)
    flat["data.heldout_pool" + CONTENTS] = pool_digest(cfg.data.heldout_pool)
    return flat


def _defaults() -> dict:
    return _flatten(OmegaConf.to_container(OmegaConf.structured(Config), resolve=False))


@dataclass(frozen=True)
class Change:
    """A setting whose value differs from the one the checkpoint was written with."""

    key: str
    old: object
    new: object

    def __str__(self) -> str:
        def show(v):
            if isinstance(v, str) and v.startswith("sha256:"):
                return v[:19] + "…"
            return json.dumps(v)
        return f"{self.key}: {show(self.old)} → {show(self.new)}"


def changes(saved: dict, now: dict) -> list[Change]:
    """The settings of `now` that differ from `saved`, less those in `FREE`. A key `saved`
    lacks (the checkpoint is older than the setting) counts as its default."""
    defaults = _defaults()
    cosine = "cosine" in (saved.get("dpo.schedule"), now.get("dpo.schedule"))
    out = []
    for key in sorted(now):
        if _under(key, FREE) and not key.endswith(CONTENTS):
            continue
        if key == "dpo.max_steps" and not cosine:
            continue
        old = saved.get(key, defaults.get(key))
        if old != now[key]:
            out.append(Change(key, old, now[key]))
    return out


def check_accept_keys(cfg: Config) -> None:
    """Every run.resume_accept entry names a setting (a key, a section, or a pool)."""
    keys = list(_defaults()) + ["data.train_pool" + CONTENTS, "data.heldout_pool" + CONTENTS]
    bad = [a for a in cfg.run.resume_accept if not any(_under(k, [a]) for k in keys)]
    if bad:
        raise ConfigError([f"run.resume_accept: {a!r} is not a setting (a key such as dpo.beta, "
                           f"a section such as judge, or data.train_pool)" for a in bad])


def check_resume(cfg: Config, checkpoint: Path, saved: dict | None, now: dict) -> list[Change]:
    """The changes the resume from `checkpoint` accepts (listed in run.resume_accept); raise
    `StartRefused` naming every other change (old → new) and the settings that accept them."""
    if saved is None:
        log.warning("%s records no settings (an earlier rdpo wrote it): the resume cannot check "
                    "that this config is the run's", checkpoint)
        return []
    found = changes(saved, now)
    accepted = [c for c in found if _under(c.key, cfg.run.resume_accept)]
    refused = [c for c in found if c not in accepted]
    fixed = [(c, FIXED[_under(c.key, FIXED)]) for c in accepted if _under(c.key, FIXED)]
    unused = [a for a in cfg.run.resume_accept if not any(_under(c.key, [a]) for c in found)]
    if unused:
        log.warning("run.resume_accept: %s did not change", ", ".join(unused))
    problems = []
    if refused:
        keys = ",".join(c.key.removesuffix(CONTENTS) for c in refused)
        problems.append(
            f"run.resume={cfg.run.resume}: {checkpoint} was written by a run with other "
            f"settings:\n    " + "\n    ".join(str(c) for c in refused) + "\n  "
            f"A resume continues the run that wrote the checkpoint: resume with its settings "
            f"({Path(cfg.run.dir) / CONFIG}), accept the changes on purpose with "
            f"run.resume_accept=[{keys}] (recorded in run.dir/{HISTORY}), or start a new run "
            f"in another run.dir")
    for change, why in fixed:
        problems.append(f"run.resume_accept: {change} cannot be accepted ({why}): start a new "
                        f"run in another run.dir")
    if problems:
        raise StartRefused(problems)
    for change in accepted:
        log.warning("resuming with a changed setting (run.resume_accept): %s", change)
    return accepted


def record_resume(run_dir: Path, checkpoint: Path, step: int, accepted: list[Change]) -> None:
    """Append this resume to run.dir/resumes.jsonl: when, from which checkpoint and step, and
    the changes it accepted."""
    line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": str(checkpoint), "step": step,
            "accepted": {c.key: [c.old, c.new] for c in accepted}}
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Start:
    """How a run starts: the checkpoint it continues (None: a new run), its settings
    (`run_settings`), what the checkpoint recorded (settings and base fingerprint) and the
    changes accepted on purpose."""

    checkpoint: Path | None
    settings: dict = field(default_factory=dict)
    saved: dict | None = None
    accepted: list[Change] = field(default_factory=list)
