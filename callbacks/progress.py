"""RoundProgressBar: Lightning's tqdm progress bar, told in rounds, phases and optimizer steps.

Lightning's own bar counts batches of an "epoch" (here: one round) and, with ``max_epochs=-1``,
reads ``Epoch 9/-2``. rdpo's console instead shows, on one line at a time (stderr):

    round 3 · sampling:  50%|██████      | 384/768 [00:02<00:02, 150.2responses/s]
    round 3 · judging: ...   round 3 · reference log-probs: ...     (transient lines)
    round 3: mean score 0.637, essential pass 53.5%, pairs 65/96 (1.4s)    (the round's summary)
    round 3 · training: 40%|████▊       | 160/400 [00:01<00:00, 25.1steps/s, loss=0.69, acc=0.5]

Rounds are numbered from 0, as their folders (rounds/0003); the step counter says how far the
whole run is. When training starts, one line says how many rounds of how many steps to expect.

A round's training line stays on screen when the round ends; phase lines disappear when their
phase ends. Phases are announced by the round's code through `phase` (a no-op without this bar,
on ranks other than 0, and with the bar disabled), so `RubricScoringCallback` works unchanged
under any other progress bar.
"""

from __future__ import annotations

import math
import sys

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:12}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

POSTFIX = {"train/loss_step": "loss", "train/rewards/accuracy_step": "acc"}
"""Step metrics shown on the training line, and their short names."""


class Phase:
    """The console line of one phase of a round (sampling, judging, reference log-probs); a
    context manager. ``Phase(None)`` displays nothing."""

    def __init__(self, bar: Tqdm | None):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def phase(trainer: L.Trainer, name: str, total: int, unit: str, where: str | None = None) -> Phase:
    """A `Phase` line on `trainer`'s `RoundProgressBar`, or one that displays nothing. The line
    reads ``WHERE · NAME`` (`where`: the current round, ``round i``, by default)."""
    bar = trainer.progress_bar_callback
    if not isinstance(bar, RoundProgressBar) or not trainer.is_global_zero or bar.is_disabled:
        return Phase(None)
    return bar.phase(trainer, name, total, unit, where)


class RoundProgressBar(TQDMProgressBar):
    """The training line counts optimizer steps out of ``max_steps`` and names the round;
    `phase` adds the transient lines of a round's other work. `print` writes above the bars."""

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate, leave=True)
        self._announced = False

    def _announce(self, trainer: L.Trainer) -> None:
        """Once, as the first round trains: rounds x steps (an epoch's batches over the
        accumulation) = max_steps."""
        if self._announced:
            return
        self._announced = True
        batches = trainer.num_training_batches
        steps = 0 if math.isinf(batches) else batches // max(1, trainer.accumulate_grad_batches)
        if steps and trainer.max_steps > 0:
            rounds = -(-trainer.max_steps // steps)
            self.print(f"training: {trainer.max_steps} steps in {rounds} rounds of {steps} "
                       f"(rounds 0-{rounds - 1})")

    def _tqdm(self, desc: str, total: int | None, unit: str, leave: bool, initial: int = 0) -> Tqdm:
        return Tqdm(desc=desc, total=total, unit=unit, initial=initial, leave=leave,
                    position=2 * self.process_position, disable=self.is_disabled,
                    dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=BAR_FORMAT)

    def phase(self, trainer: L.Trainer, name: str, total: int, unit: str,
              where: str | None = None) -> Phase:
        where = where or f"round {trainer.current_epoch}"
        return Phase(self._tqdm(f"{where} · {name}", total, unit, False))

    def init_train_tqdm(self) -> Tqdm:
        return self._tqdm("training", None, "steps", True)

    def on_train_start(self, *_) -> None:
        self.train_progress_bar = Tqdm(disable=True)  # each round opens its own line

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        # One line per round, counting optimizer steps of the whole run from where it stands.
        self._announce(trainer)
        step = trainer.global_step
        self.train_progress_bar = self._tqdm(f"round {trainer.current_epoch} · training",
                                             trainer.max_steps if trainer.max_steps > 0 else None,
                                             "steps", True, initial=step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar.disable or trainer.global_step == bar.n:
            return  # a micro-batch inside gradient accumulation: no new step yet
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        metrics = trainer.progress_bar_metrics
        return {short: f"{float(metrics[key]):.3g}" for key, short in POSTFIX.items()
                if key in metrics}

    def print(self, *args, sep: str = " ", **kwargs) -> None:
        # Above any open bar, on the bars' stream; also between rounds, when none is open.
        Tqdm.write(sep.join(map(str, args)), file=sys.stderr, **kwargs)


__all__ = ["Phase", "RoundProgressBar", "phase"]
