"""RubricDPOModule: the policy (VLM + LoRA/QLoRA), the DPO loss and the optimizer."""

from __future__ import annotations

import math

import lightning as L
import torch
from torchmetrics import MeanMetric

from rdpo.config import DPOConfig, RunConfig
from rdpo.engine.collate import reference_tensors
from rdpo.engine.loss import dpo_objective
from rdpo.engine.packing import completion_lengths, pair_logps

# Metric name (a torchmetrics module key: no dots) -> logged name (TRL's names).
METRICS = {"loss": "train/loss", "dpo_loss": "train/dpo_loss", "nll": "train/nll",
           "rewards_chosen": "train/rewards/chosen", "rewards_rejected": "train/rewards/rejected",
           "rewards_margins": "train/rewards/margins", "rewards_accuracy": "train/rewards/accuracy",
           "logps_chosen": "train/logps/chosen", "logps_rejected": "train/logps/rejected"}


class RubricDPOModule(L.LightningModule):
    """DPO on pairs whose reference log-probs were computed when their round built them.

    `model` is a PEFT-wrapped transformers VLM (only the adapter trains; or, for full
    fine-tuning, the VLM with its language model trainable) and `processor` its processor.
    Batches come from `rdpo.engine.collate.PairCollator`: B packed rows ``[prompt, chosen, rejected]``
    (``{"packed": ...}``) or, for models that cannot pack, 2B sequences (``{"sequences": ...}``,
    chosen then rejected), with ``ref_chosen_logps`` and ``ref_rejected_logps`` (B floats each).
    `dpo` is the run config's section of the same name (loss, optimizer, schedule);
    `on_nonfinite` is ``run.on_nonfinite``.
    """

    def __init__(self, model, processor, dpo: DPOConfig | None = None, *,
                 on_nonfinite: str = RunConfig.on_nonfinite):
        super().__init__()
        self.model = model
        self.processor = processor
        self.dpo = dpo = dpo or DPOConfig()
        self.on_nonfinite = on_nonfinite
        self.nonfinite_skipped = 0
        self.metrics = torch.nn.ModuleDict({name: MeanMetric() for name in METRICS})

    def on_train_start(self) -> None:
        # A bf16-true precision plugin converts the whole module, metric states included: the
        # logged loss would be rounded to bf16 (ln 2 -> 0.6914). The means stay in float32.
        for metric in self.metrics.values():
            metric.set_dtype(torch.float32)

    def pair_logps(self, batch: dict, *, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) completion log-probs [B] of a `PairCollator` batch."""
        return pair_logps(self.model, batch, average=average)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch.get("empty"):
            # No pair on this rank this round: a zero loss still touching every trainable
            # parameter keeps DDP's gradient all-reduce in step with the other ranks. The metrics
            # get a zero-weight update, so every rank joins their sync at the end of the round.
            # Under DeepSpeed the batch also holds a one-token filler pair (`RubricScoringCallback`):
            # its forward and backward are the ones the other ranks run, its loss times zero.
            return self._no_op_step(batch)
        chosen, rejected = self.pair_logps(batch)
        n_chosen, n_rejected = completion_lengths(batch)
        ref_chosen, ref_rejected = reference_tensors(batch, chosen)
        obj = dpo_objective(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected,
                            beta=self.dpo.beta, loss_type=self.dpo.loss_type,
                            label_smoothing=self.dpo.label_smoothing,
                            sft_weight=self.dpo.sft_weight)
        loss, out = obj.loss, obj.dpo
        if not torch.isfinite(loss):
            return self._nonfinite(loss, chosen, rejected, batch)
        values = {"nll": obj.nll.detach()} if obj.nll is not None else {}
        values |= {
            "loss": loss.detach(), "dpo_loss": out.loss.detach(), "rewards_chosen": out.chosen_rewards,
            "rewards_rejected": out.rejected_rewards, "rewards_margins": out.margins,
            "rewards_accuracy": out.accuracy, "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        }
        for name in METRICS:  # one order on every rank (see `_no_op_step`)
            if name in values:
                self._log_metric(name, values[name].float().mean(), chosen.shape[0])
        return loss

    def _nonfinite(self, loss, chosen, rejected, batch) -> torch.Tensor:
        """A NaN/inf loss never reaches the weights: stop with the numbers, or skip the batch
        (a zero loss touching every trainable weight, so DDP ranks stay in step) and count it."""
        if self.on_nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.global_step} (policy log-probs "
                f"chosen {chosen.tolist()}, rejected {rejected.tolist()}; reference chosen "
                f"{batch['ref_chosen_logps']}, rejected "
                f"{batch['ref_rejected_logps']}); run.on_nonfinite=skip skips such batches")
        self.nonfinite_skipped += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True,
                 on_epoch=False, reduce_fx="max")
        return self._no_op_step(logps=(chosen, rejected))

    def _no_op_step(self, batch: dict | None = None, logps=None) -> torch.Tensor:
        """Zero-weight metric updates and a zero loss that touches every trainable weight: a
        forward of the batch's filler pair times zero when it has one, `logps` (the step's own
        finite log-probs) times zero, or else every trainable weight times zero.

        The model, then the metrics, in the order of a real step: under ZeRO-3 every module
        call (the metrics are modules) is traced, and the traces of all ranks must agree."""
        if batch is not None and ("packed" in batch or "sequences" in batch):
            logps = self.pair_logps(batch)
        for name in METRICS:
            if name != "nll" or self.dpo.sft_weight:
                self._log_metric(name, torch.zeros(()), 0)
        if logps is not None and all(torch.isfinite(x).all() for x in logps):
            return sum(x.sum() for x in logps) * 0.0
        return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)

    def _log_metric(self, name: str, value: torch.Tensor, weight: int) -> None:
        # torchmetrics means weighted by pairs: ``_step`` is this batch's value, ``_epoch`` the
        # round's, synced across ranks by torchmetrics when Lightning computes it.
        metric = self.metrics[name]
        metric(value.to(self.device), weight=weight)
        self.log(METRICS[name], metric, prog_bar=name in ("loss", "rewards_accuracy"), on_step=True, on_epoch=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        dpo = self.dpo
        optimizer = torch.optim.AdamW(params, lr=dpo.lr, weight_decay=dpo.weight_decay)

        def factor(step: int) -> float:
            if step < dpo.warmup_steps:
                return (step + 1) / (dpo.warmup_steps + 1)
            if dpo.schedule == "cosine":
                progress = (step - dpo.warmup_steps) / max(1, dpo.max_steps - dpo.warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
