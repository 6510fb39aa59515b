"""``python tests/slurm_task.py [--hold S,..] [--kill-rank R --kill-step N] --marks DIR --config ...``:
one srun task of tests/test_slurm.py, `python -m rdpo.fit` with test-only timing around it.

- Exits are staggered: the task of rank k (SLURM_PROCID) exits k seconds after the run returns,
  so the tasks never stop together (production tasks stop whenever they get there).
- ``--hold``: after each listed optimizer step every rank writes ``DIR/held-S-rank-K`` and waits
  until its own process has received the preemption signal (at most 2 minutes), so the test can
  preempt at that step exactly: the run then stops at the next step boundary.
- ``--kill-rank/--kill-step``: that rank SIGKILLs itself right after that step
  (tests/kill_at_step.py), after writing ``DIR/killed``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
from kill_at_step import KillAtStep


class Hold(L.Callback):
    """After the listed steps, wait until this process has got the preemption signal."""

    def __init__(self, steps: set[int], marks: Path, rank: int):
        self.steps, self.marks, self.rank = steps, marks, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps or trainer.fit_loop._should_accumulate():
            return
        from rdpo.callbacks.checkpoint import RoundCheckpoint

        checkpointer = next(c for c in trainer.callbacks if isinstance(c, RoundCheckpoint))
        (self.marks / f"held-{step}-rank-{self.rank}").touch()
        deadline = time.monotonic() + 120
        while not checkpointer._signalled and time.monotonic() < deadline:
            time.sleep(0.05)


class Killed(KillAtStep):
    def __init__(self, step: int, marks: Path):
        super().__init__(step)
        self.marks = marks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not trainer.fit_loop._should_accumulate():
            (self.marks / "killed").write_text(f"{time.time()}\n")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--marks", type=Path, required=True)
    parser.add_argument("--hold", default="")
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-step", type=int)
    args, rest = parser.parse_known_args(argv)
    rank = int(os.environ.get("SLURM_PROCID", 0))
    added: list[L.Callback] = []
    if args.hold:
        added.append(Hold({int(s) for s in args.hold.split(",")}, args.marks, rank))
    if args.kill_rank == rank:
        added.append(Killed(args.kill_step, args.marks))
    init = L.Trainer.__init__

    def with_test_callbacks(self, *a, callbacks=None, **kw):
        init(self, *a, callbacks=[*(callbacks or []), *added], **kw)

    L.Trainer.__init__ = with_test_callbacks
    from rdpo.fit import main as fit_main

    status = fit_main(rest)
    print(f"slurm_task: rank {rank} exits with status {status} after {rank} s", flush=True)
    time.sleep(rank)
    return status


if __name__ == "__main__":
    sys.exit(main())
