"""RoundCheckpoint: checkpoints a run can resume from with nothing lost, and preemption.

One file, ``last.ckpt``, replaced atomically (written next to it, then renamed) so a kill
at any moment leaves either the old or the new checkpoint, never half of one. It is saved

- right after a round is built (its pairs and reference log-probs are in the data module's
  state), so a kill during training never samples or judges that round again;
- every `every_n_steps` optimizer steps (the round's position is the data module's
  ``batches_done``);
- when the preemption signal arrives (SLURM: ``USR1``, to the tasks directly or forwarded by
  slurm/fit.sbatch), at the next step boundary, agreed by all ranks; then the run stops with
  ``preempted`` set, and rank 0 writes ``preempted`` (the step) beside ``last.ckpt`` once every
  rank's part is saved: the launcher's sign that the job can be requeued.

The checkpoint also carries the RNG states (Python, NumPy, torch) and, for a model whose
base weights are frozen, only the trainable weights: the base comes back from model.path. So
that a resume cannot silently continue an adapter on another base with the same shapes (a
moved or re-downloaded model.path that is in fact another fine-tune), it also carries a
fingerprint of the frozen base weights (`base_fingerprint`), compared when it loads, and the
settings of the run that wrote it (`rdpo.rundir.run_settings`: config and pool digests), which
rdpo.fit compares before it resumes (`read_run_state`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch

from rdpo.rundir import atomic_write, fsync_dir

log = logging.getLogger("rdpo")

LAST = "last.ckpt"
PREEMPTED = "preempted"


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run: ``checkpoints/last.ckpt`` or a Lightning SLURM
    ``hpc_ckpt_N.ckpt`` in the run directory; None when there is none. A DeepSpeed checkpoint
    that a kill left between its two renames is put back first (`recover_deepspeed`)."""
    run_dir = Path(run_dir)
    recover_deepspeed(run_dir / "checkpoints")
    found = [p for p in [run_dir / "checkpoints" / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")]
             if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


SEALED = "rdpo-complete"
"""The last file of a DeepSpeed checkpoint folder, written once every rank's part is on disk."""


def recover_deepspeed(dirpath: Path) -> Path | None:
    """``last.ckpt`` again after a kill between the renames of a DeepSpeed (folder) checkpoint
    (`RoundCheckpoint.save`): the new, sealed ``last.ckpt.tmp`` if it is whole, else the
    previous one, ``last.ckpt.old``. Returns the folder put back, if any. Any rank may call
    this at once: a rename that another rank has already done fails, and it moves on."""
    last = dirpath / LAST
    for candidate in (dirpath / f"{LAST}.tmp", dirpath / f"{LAST}.old"):
        if last.exists():
            return None
        whole = candidate.is_dir() and (candidate.suffix == ".old"
                                        or (candidate / SEALED).is_file())
        if not whole:
            continue
        try:
            candidate.rename(last)
        except OSError:  # another rank put one back first
            continue
        fsync_dir(dirpath)
        log.warning("%s: the last checkpoint save was interrupted between its renames; %s is "
                    "last.ckpt again", dirpath, candidate.name)
        return candidate
    return None


def read_run_state(ckpt: str | Path) -> dict | None:
    """What a checkpoint records about the run that wrote it: ``{"settings": ..., "base": ...}``
    (`RoundCheckpoint`), read without loading its weights; None for a checkpoint of an earlier
    version. A DeepSpeed checkpoint (a folder) keeps it in its model-states file."""
    state = _lightning_state(Path(ckpt))
    return None if state is None else state.get("rdpo_run")


def _lightning_state(ckpt: Path) -> dict | None:
    """A checkpoint's Lightning state: the file, or a DeepSpeed folder's rank-0 model-states file
    (None when the folder has none)."""
    if not ckpt.is_dir():
        return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    files = sorted(ckpt.glob("**/*model_states.pt"))
    if not files:
        return None
    # Written by DeepSpeed with more than plain types (its config); the file is rdpo's own.
    return torch.load(files[0], map_location="cpu", weights_only=False)


def base_mismatch(ckpt: str | Path, saved: str, now: str) -> str:
    """The refusal of a checkpoint written on another base model."""
    return (f"checkpoint {ckpt} was written on another base model (weights fingerprint {saved}, "
            f"this model.path gives {now}): resume with the model.path it was trained on, or "
            f"start a new run (another run.dir, or run.resume=none run.overwrite=true)")


def base_fingerprint(model: torch.nn.Module, *, tensors: int = 4, values: int = 4096) -> str:
    """A short hash of the frozen floating-point weights of `model`: a strided sample of the
    first and last `tensors` by name. Cheap at 7B (a few thousand values each) and the same
    whatever dtype the base was loaded in: values are rounded to bfloat16 first, which maps a
    float32 weight and its bfloat16 copy to the same bits. Quantised (integer) weights are
    skipped; their embeddings, norms and vision tower still identify the base."""
    frozen = sorted((n, p) for n, p in model.named_parameters()
                    if not p.requires_grad and p.is_floating_point() and p.numel() > 0)
    if not frozen:
        return ""
    picked = frozen[:tensors] + frozen[-tensors:] if len(frozen) > 2 * tensors else frozen
    digest = hashlib.sha256()
    for name, p in picked:
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // values)][:values]
        digest.update(name.encode())
        digest.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


class RoundCheckpoint(L.Callback):
    """Saves ``dirpath/last.ckpt`` after each round is built, every `every_n_steps` steps and
    on `stop_signal`; list it after `RubricScoringCallback` so the round is built first.
    `base` (`base_fingerprint` of the policy as loaded) is saved, and a checkpoint written on
    another base is refused. `settings` (plain types) are saved for `read_run_state`.
    `on_train_start(trainer)` is called on every rank as training starts, once a resumed
    checkpoint is restored (rdpo.fit writes config.yaml then)."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, *,
                 stop_signal: int | None = None, enabled: bool = True, base: str = "",
                 settings: dict | None = None,
                 on_train_start: Callable[[L.Trainer], None] | None = None):
        self.dirpath = Path(dirpath)
        self.base = base
        self.settings = settings
        self._on_train_start = on_train_start
        self.every_n_steps = every_n_steps
        self.stop_signal = stop_signal
        self.enabled = enabled
        self.preempted = False
        self._signalled = False
        self._round_start = False
        self._last_saved_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.stop_signal is not None:
            self._previous = signal.signal(self.stop_signal, self._on_signal)
            # rdpo.fit blocks the signal while it starts, so one that came early is held;
            # unblocking delivers it now, and the run stops at its first step boundary.
            mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {self.stop_signal})
            self._was_blocked = self.stop_signal in mask

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.stop_signal is not None:
            if self._was_blocked:  # after training a signal changes nothing: held again
                signal.pthread_sigmask(signal.SIG_BLOCK, {self.stop_signal})
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(self.stop_signal, previous)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._on_train_start is not None:
            self._on_train_start(trainer)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: saving inside a signal handler could interrupt a collective halfway.
        self._signalled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            self._round_start = True
            try:
                self.save(trainer)
            finally:
                self._round_start = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        stepped = step != self._last_saved_step and not trainer.fit_loop._should_accumulate()
        # The round's last batch is saved at the epoch's end instead: Lightning resumes a
        # checkpoint taken at the last batch of an epoch one epoch too far (2.6).
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if stepped and not last:
            if not self._maybe_preempt(trainer) and self.enabled and step % self.every_n_steps == 0:
                self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._maybe_preempt(trainer) and self.enabled:
            self.save(trainer)

    def _maybe_preempt(self, trainer: L.Trainer) -> bool:
        """On the preemption signal (any rank's): save, stop the run and return True."""
        if self.preempted:  # saved at the step boundary: not again at the epoch's end after it
            return True
        if self.stop_signal is None or not self._agree(trainer, self._signalled):
            return False
        self.save(trainer)  # ends with a barrier: every rank's part is written
        self.preempted = True
        trainer.should_stop = True
        step = trainer.global_step
        if trainer.is_global_zero:
            atomic_write(self.dirpath / PREEMPTED, f"preemption checkpoint saved at step {step}\n")
        log.warning("preemption signal: checkpoint saved at step %d, stopping", step)
        return True

    @staticmethod
    def _agree(trainer: L.Trainer, flag: bool) -> bool:
        """True on every rank when any rank got the signal, so all stop at the same step."""
        if trainer.world_size == 1:
            return flag
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` atomically (every rank must call this: saving is collective)."""
        tmp = self.dirpath / f"{LAST}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("rdpo.checkpoint")
        trainer.save_checkpoint(tmp, weights_only=False)  # ends with a barrier: every rank's part is written
        if trainer.is_global_zero:
            if tmp.is_dir():  # DeepSpeed writes a folder; a folder cannot replace a folder
                # Sealed once whole; then last.ckpt -> .old, .tmp -> last.ckpt, .old removed.
                # A kill between the renames leaves both; `recover_deepspeed` puts one back.
                _seal(tmp)
                old = self.dirpath / f"{LAST}.old"
                _remove(old)
                if self.path.exists():
                    self.path.rename(old)
                tmp.rename(self.path)
                fsync_dir(self.dirpath)
                _remove(old)
            else:
                # On disk before the rename: a crash (power, node) right after it must not leave
                # an empty last.ckpt where the previous one was; the previous stays until then.
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                fsync_dir(self.dirpath)
        trainer.strategy.barrier("rdpo.checkpoint.done")
        self._last_saved_step = trainer.global_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rdpo_run"] = {"settings": self.settings, "base": self.base}
        frozen = {n for n, p in pl_module.named_parameters() if not p.requires_grad}
        if frozen and "state_dict" in checkpoint:
            # The base weights never change and come back from model.path: keep the trainable
            # ones (the adapter) and the buffers, which is all a resume needs.
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k not in frozen}
            checkpoint["rdpo_trainable_only"] = True
        if self._round_start and "loops" in checkpoint:
            # As an epoch starts, Lightning's loops still hold the last epoch's batch counts
            # (2.6), which it resets only when the epoch's batches begin: resumed from here
            # with them, the round would end after its first step.
            loops = checkpoint["loops"]["fit_loop"]
            for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress",
                        "epoch_loop.automatic_optimization.optim_progress"):
                _reset_current(loops[key])
            loops["epoch_loop.batch_progress"]["is_last_batch"] = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # DeepSpeed restores the weights itself: its client state has no "state_dict".
        if checkpoint.get("rdpo_trainable_only") and "state_dict" in checkpoint:
            trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
            missing = sorted(trainable - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} trainable weights of this "
                                 f"model (first: {missing[0]}): was it written with another "
                                 f"model.lora / model.finetune setting?")

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # Plain types only, so the checkpoint loads with torch.load(weights_only=True).
        return {"base": self.base,
                "rng": {"python": random.getstate(),
                        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("base", "")  # "" in checkpoints of earlier versions: not checked
        if saved and self.base and saved != self.base:
            raise ValueError(base_mismatch(self.dirpath, saved, self.base))
        rng = state_dict["rng"]
        random.setstate(rng["python"])
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def keep_metrics(logger, ckpt: Path) -> None:
    """Before a resumed run logs: keep the CSV rows of the steps before the checkpoint's step
    (Lightning's CSV writer deletes metrics.csv when it starts; the steps from the checkpoint
    on are logged again), so logs/metrics.csv covers the whole run."""
    import csv

    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    step = checkpoint_step(ckpt)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        keys, rows = sorted(reader.fieldnames or []), list(reader)
    writer = logger.experiment  # created now: this deletes the old file
    rows = [r for r in rows if r.get("step") and int(float(r["step"])) < step]
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=keys)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = keys


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint was saved at: a file, or a DeepSpeed folder, whose
    Lightning state is in rank 0's model-states file."""
    state = _lightning_state(ckpt)
    if state is None:
        raise ValueError(f"{ckpt}: no DeepSpeed model-states file (*/*model_states.pt): not a "
                         f"checkpoint folder rdpo wrote")
    return state["global_step"]


def _seal(folder: Path) -> None:
    """Every file of a checkpoint folder on disk, then the `SEALED` file."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for sub in sorted(p for p in folder.rglob("*") if p.is_dir()):
        fsync_dir(sub)
    atomic_write(folder / SEALED, "")
    fsync_dir(folder)


def _reset_current(progress: dict) -> None:
    """Zero the per-epoch ("current") counters of a Lightning progress state, as
    ``reset_on_run`` does."""
    for key, value in progress.items():
        if key == "current":
            progress[key] = dict.fromkeys(value, 0)
        elif isinstance(value, dict):
            _reset_current(value)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


__all__ = ["PREEMPTED", "RoundCheckpoint", "find_checkpoint", "read_run_state"]
