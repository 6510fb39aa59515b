"""RubricDPOModule: the policy (VLM + LoRA/QLoRA), the DPO loss and the optimizer."""

from __future__ import annotations

import math

import lightning as L
import torch

from rdpo.logps import sequence_logps
from rdpo.loss import dpo_loss
from rdpo.rollout import SamplingSettings, generate


class RubricDPOModule(L.LightningModule):
    """DPO on pairs whose reference log-probs were computed when their round built them.

    `model` is a PEFT-wrapped transformers VLM (only the adapter trains) and `processor` its
    processor. Batches come from `OnPolicyDataModule`: 2B sequences (chosen, then rejected) with
    ``ref_chosen_logps`` and ``ref_rejected_logps`` of shape [B].
    """

    def __init__(self, model, processor, *, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, lr: float = 1e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 0, schedule: str = "constant", max_steps: int = 100,
                 sft_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.processor = processor
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.max_steps = max_steps
        self.sft_weight = sft_weight

    def sequence_logps(self, batch: dict, *, average: bool = False) -> torch.Tensor:
        """Summed completion log-probs [N] of a collated batch under the current policy."""
        return sequence_logps(self.model, batch, average=average)

    def generate(self, records, settings: SamplingSettings):
        """Sample responses from the current policy: a generator of `Rollout`s."""
        return generate(self.model, self.processor, records, settings)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch.get("empty"):
            # No pair on this rank this round: a zero loss still touching every trainable
            # parameter keeps DDP's gradient all-reduce in step with the other ranks.
            return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
        # IPO regresses length-averaged log-ratios (as TRL does); the others use sums.
        average = self.loss_type == "ipo"
        logps = self.sequence_logps(batch["sequences"], average=average)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        n_chosen, n_rejected = batch["sequences"]["completion_mask"][:, 1:].sum(1).chunk(2)
        if average:
            ref_chosen, ref_rejected = ref_chosen / n_chosen, ref_rejected / n_rejected
        out = dpo_loss(chosen, rejected, ref_chosen.to(chosen), ref_rejected.to(rejected),
                       beta=self.beta, loss_type=self.loss_type,
                       label_smoothing=self.label_smoothing)
        loss = out.loss
        values = {}
        if self.sft_weight:
            # RPO (Pang et al., 2024): a length-normalised NLL term on the chosen responses keeps
            # DPO from lowering the likelihood of chosen and rejected alike ("likelihood
            # displacement"), which collapses small policies into degenerate text.
            chosen_sum = chosen * n_chosen if average else chosen
            nll = -(chosen_sum / n_chosen.clamp(min=1)).mean()
            loss = loss + self.sft_weight * nll
            values["nll"] = nll.detach()
        values |= {
            "loss": loss.detach(), "dpo_loss": out.loss.detach(), "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards, "rewards/margins": out.margins,
            "rewards/accuracy": out.accuracy, "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
        }
        for name, value in values.items():
            # Lightning averages the step values over each round (epoch), weighted by batch
            # size, and across ranks (sync_dist).
            self.log(f"train/{name}", value.float().mean(), prog_bar=name in ("loss", "rewards/accuracy"),
                     on_step=True, on_epoch=True, batch_size=chosen.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            if self.schedule == "cosine":
                progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
