"""DeepSpeed folder checkpoints (`RoundCheckpoint.save`): a kill at any point of a save leaves a
checkpoint that run.resume=auto finds (`find_checkpoint`), and a resume keeps the metrics
history (`keep_metrics`). A stand-in trainer writes folders shaped as DeepSpeed's; the real
ones are resumed in tests/test_deepspeed.py."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from rdpo.callbacks.checkpoint import (
    RoundCheckpoint,
    checkpoint_step,
    find_checkpoint,
    keep_metrics,
)


class Killed(BaseException):
    """A SIGKILL at this point of the save: nothing after it runs."""


class FolderTrainer:
    """What `RoundCheckpoint.save` uses of a trainer under DeepSpeed: one rank, a barrier, and
    `save_checkpoint` writing a folder (tag ``checkpoint``, ``latest``, a model-states file
    with the Lightning state). `kill_in_save` stops it halfway through the folder."""

    is_global_zero = True

    def __init__(self):
        self.global_step = 0
        self.kill_in_save = False
        self.strategy = self

    def barrier(self, name=None) -> None:
        pass

    def save_checkpoint(self, path: Path, weights_only: bool = False) -> None:
        (path / "checkpoint").mkdir(parents=True)
        torch.save({"global_step": self.global_step},
                   path / "checkpoint/mp_rank_00_model_states.pt")
        if self.kill_in_save:
            raise Killed
        (path / "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 64)
        (path / "latest").write_text("checkpoint")


def _saved(run_dir: Path, steps: int) -> tuple[RoundCheckpoint, FolderTrainer]:
    checkpointer = RoundCheckpoint(run_dir / "checkpoints", every_n_steps=1)
    trainer = FolderTrainer()
    for step in range(1, steps + 1):
        trainer.global_step = step
        checkpointer.save(trainer)
    return checkpointer, trainer


def _kill_at_rename(monkeypatch, nth: int) -> None:
    """Kill the save at its `nth` rename of a checkpoint folder (1: last.ckpt -> .old,
    2: .tmp -> last.ckpt)."""
    real, count = Path.rename, [0]

    def rename(self, target):
        if self.name.startswith("last.ckpt"):
            count[0] += 1
            if count[0] == nth:
                raise Killed
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


@pytest.mark.parametrize("where, step", [("in the folder", 2), ("before the renames", 2),
                                         ("between the renames", 3), ("after the renames", 3)])
def test_a_kill_anywhere_in_a_save_leaves_a_checkpoint(where, step, tmp_path, monkeypatch):
    """Saved at step 2, killed while saving step 3: resume=auto finds step 2's checkpoint, or
    step 3's once that one is whole (between the renames: the sealed new folder is put back as
    last.ckpt; before this fix none was found and the run started over)."""
    checkpointer, trainer = _saved(tmp_path, 2)
    trainer.global_step = 3
    if where == "in the folder":
        trainer.kill_in_save = True
    elif where == "before the renames":
        _kill_at_rename(monkeypatch, 1)
    elif where == "between the renames":
        _kill_at_rename(monkeypatch, 2)
    else:  # killed removing last.ckpt.old, the save's last act
        def remove(path):
            if path.exists():
                raise Killed

        monkeypatch.setattr("rdpo.callbacks.checkpoint._remove", remove)
    with pytest.raises(Killed):
        checkpointer.save(trainer)
    monkeypatch.undo()
    found = find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints/last.ckpt"
    assert checkpoint_step(found) == step
    # the next save goes through and leaves one checkpoint, whatever was left over
    trainer.kill_in_save, trainer.global_step = False, 4
    checkpointer.save(trainer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert checkpoint_step(find_checkpoint(tmp_path)) == 4


def test_an_unsealed_new_folder_is_not_resumed(tmp_path, monkeypatch):
    """Killed between the renames of a save whose folder was not sealed (all ranks' parts not
    known to be written): the previous checkpoint comes back, not the partial one."""
    checkpointer, trainer = _saved(tmp_path, 2)
    trainer.global_step = 3
    _kill_at_rename(monkeypatch, 2)
    monkeypatch.setattr("rdpo.callbacks.checkpoint._seal", lambda folder: None)
    with pytest.raises(Killed):
        checkpointer.save(trainer)
    monkeypatch.undo()
    assert checkpoint_step(find_checkpoint(tmp_path)) == 2


def test_resume_from_a_folder_keeps_the_metrics_before_it(tmp_path):
    """keep_metrics with a DeepSpeed checkpoint: the rows before its step stay in metrics.csv
    (they were all deleted before: Lightning's CSV writer starts a new file)."""
    from lightning.pytorch.loggers import CSVLogger

    _, trainer = _saved(tmp_path, 4)
    logger = CSVLogger(tmp_path, name="logs", version="")
    path = Path(logger.log_dir) / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=["step", "train/loss"])
        out.writeheader()
        out.writerows({"step": s, "train/loss": 1.0 / (s + 1)} for s in range(7))
    keep_metrics(logger, find_checkpoint(tmp_path))
    rows = list(csv.DictReader(path.open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
