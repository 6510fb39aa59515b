"""DPO losses: pure functions of sequence log-probabilities.

All inputs are summed completion log-probs of shape [B]. With
``h = (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))``
the losses are those of TRL's DPOTrainer of the same name, so numbers carry over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DPOOutput:
    """Per-example loss and implicit rewards ``β·(log π - log π_ref)``, each of shape [B]."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float()


def _sigmoid(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Rafailov et al. (2023) eq. 7; label smoothing ε gives conservative DPO (cDPO):
    # -(1-ε)·log σ(βh) - ε·log σ(-βh).
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def _robust(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Chowdhury et al. (2024): an unbiased loss under preference-label noise rate ε.
    return (-F.logsigmoid(beta * h) * (1 - label_smoothing) + F.logsigmoid(-beta * h) * label_smoothing) / (
        1 - 2 * label_smoothing
    )


def _hinge(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # SLiC (Zhao et al., 2023): a margin loss on the log-ratio difference.
    return torch.relu(1 - beta * h)


def _ipo(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Azar et al. (2023) eq. 17, with β as τ: regress h to 1/(2τ). IPO expects length-averaged
    # log-probs (the caller passes them, as TRL does).
    return (h - 1 / (2 * beta)) ** 2


LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """DPO loss per example. All inputs have shape [B]; returns [B]-shaped losses and rewards.

    When the policy equals the reference, ``h = 0`` and the sigmoid loss is ``ln 2``.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {sorted(LOSSES)}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = LOSSES[loss_type](chosen_ratio - rejected_ratio, beta, label_smoothing)
    return DPOOutput(
        losses=losses,
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
    )


@dataclass(frozen=True)
class Objective:
    """The training objective of a batch: DPO plus the optional SFT term."""

    loss: torch.Tensor
    dpo: DPOOutput
    nll: torch.Tensor | None


def dpo_objective(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> Objective:
    """`dpo_loss` on summed log-probs [B] (IPO on length-averaged ones) plus ``sft_weight`` × NLL.

    As TRL's DPOTrainer: IPO regresses the length-averaged log-ratio difference while the
    rewards stay ``β·(log π - log π_ref)`` on sums; the SFT term (RPO, Pang et al., 2024) is
    the mean negative log-likelihood over all chosen tokens of the batch. It keeps DPO from
    lowering the likelihood of chosen and rejected alike ("likelihood displacement"), which
    collapses small policies into degenerate text.
    """
    if loss_type == "ipo":
        averaged = dpo_loss(policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths,
                            ref_chosen_logps / chosen_lengths, ref_rejected_logps / rejected_lengths,
                            beta=beta, loss_type="ipo")
        out = DPOOutput(averaged.losses, beta * (policy_chosen_logps - ref_chosen_logps).detach(),
                        beta * (policy_rejected_logps - ref_rejected_logps).detach())
    else:
        out = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                       ref_rejected_logps, beta=beta, loss_type=loss_type,
                       label_smoothing=label_smoothing)
    loss, nll = out.loss, None
    if sft_weight:
        nll = -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
        loss = loss + sft_weight * nll
    return Objective(loss, out, nll)
