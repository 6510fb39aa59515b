"""RoundProgressBar on a plain Lightning run: rounds, phases, steps out of max_steps."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from rdpo.callbacks.progress import Phase, RoundProgressBar, phase
from torch.utils.data import DataLoader


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(12, 2), batch_size=2)  # 6 batches an epoch (a round)


class Sampling(L.Callback):
    """Stands in for RubricScoringCallback: a phase line as each round starts."""

    def on_train_epoch_start(self, trainer, pl_module):
        with phase(trainer, "sampling", 8, "responses") as shown:
            shown.update(8)


def _shown(output: str) -> list[str]:
    return [line.split("\r")[-1].rstrip() for line in output.split("\n")
            if line.split("\r")[-1].strip()]


@pytest.mark.parametrize("accumulate", [1, 3])
def test_rounds_phases_and_steps(capsys, accumulate):
    steps_per_round = 6 // accumulate
    trainer = L.Trainer(max_steps=2 * steps_per_round, max_epochs=-1, accelerator="cpu",
                        accumulate_grad_batches=accumulate, logger=False,
                        callbacks=[Sampling(), RoundProgressBar()], enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(Tiny())
    err = capsys.readouterr().err
    total = 2 * steps_per_round
    assert "Epoch" not in err
    assert "round 0 · sampling" in err and "round 1 · sampling" in err
    lines = _shown(err)
    assert f"training: {total} steps in 2 rounds of {steps_per_round} (rounds 0-1)" in lines
    done = [line for line in lines if "· training" in line]
    assert re.match(rf"round 0 · training: +50%\|.*\| {steps_per_round}/{total} \[.*steps/s, "
                    r"loss=[-\d.e]+\]$", done[0]), done
    assert re.match(rf"round 1 · training: 100%\|.*\| {total}/{total} \[", done[1]), done


def test_phase_without_the_bar_displays_nothing(capsys):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    capsys.readouterr()  # what the trainer itself printed
    shown = phase(trainer, "judging", 3, "responses")
    assert isinstance(shown, Phase) and shown.bar is None
    shown.update(3)
    shown.close()
    assert capsys.readouterr().err == ""
