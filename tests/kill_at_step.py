"""``python tests/kill_at_step.py --step N --config ... [key=value ...]``: `python -m rdpo.fit`
that SIGKILLs its own process right after optimizer step N (a crash between checkpoints, for
tests/test_resume.py). The kill is a Lightning callback added to the run's trainer, listed
after rdpo's own callbacks, so whatever they do at the end of step N is done first."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process once the trainer has taken `step` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not trainer.fit_loop._should_accumulate():
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, required=True)
    args, rest = parser.parse_known_args(argv)
    init = L.Trainer.__init__

    def with_kill(self, *a, callbacks=None, **kw):
        init(self, *a, callbacks=[*(callbacks or []), KillAtStep(args.step)], **kw)

    L.Trainer.__init__ = with_kill
    from rdpo.fit import main as fit_main

    return fit_main(rest)


if __name__ == "__main__":
    sys.exit(main())
