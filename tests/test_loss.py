"""DPO losses against values computed by hand with `math`."""

import math

import pytest
import torch

from rdpo.engine.loss import LOSSES, dpo_loss

BETA = 0.1


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def logps(pc, pr, rc, rr, grad=False):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=grad) for v in (pc, pr, rc, rr)]


# Example 0: chosen ratio +1, rejected ratio -1, so h = 2 and βh = 0.2.
# Example 1: chosen ratio -0.5, rejected ratio +2.5, so h = -3 and βh = -0.3.
PC, PR, RC, RR = [-1.0, -4.0], [-3.0, -1.5], [-2.0, -3.5], [-2.0, -4.0]
H = [2.0, -3.0]


def test_loss_types_are_the_four_documented():
    assert set(LOSSES) == {"sigmoid", "robust", "hinge", "ipo"}


def test_sigmoid_is_ln2_when_policy_equals_reference():
    x = torch.tensor([-12.3, -4.0, -57.0], dtype=torch.float64)
    y = torch.tensor([-11.0, -9.5, -3.25], dtype=torch.float64)
    out = dpo_loss(x, y, x.clone(), y.clone(), beta=BETA)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2), dtype=torch.float64))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert torch.equal(out.chosen_rewards, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(out.margins, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(out.accuracy, torch.zeros(3))  # a tie is not a win


@pytest.mark.parametrize(
    ("loss_type", "eps", "expected"),
    [
        ("sigmoid", 0.0, [softplus(-0.2), softplus(0.3)]),
        # cDPO: (1-ε)·(-log σ(βh)) + ε·(-log σ(-βh))
        ("sigmoid", 0.1, [0.9 * softplus(-0.2) + 0.1 * softplus(0.2),
                          0.9 * softplus(0.3) + 0.1 * softplus(-0.3)]),
        # robust DPO: ((1-ε)·(-log σ(βh)) - ε·(-log σ(-βh))) / (1 - 2ε)
        ("robust", 0.1, [(0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8,
                         (0.9 * softplus(0.3) - 0.1 * softplus(-0.3)) / 0.8]),
        ("robust", 0.0, [softplus(-0.2), softplus(0.3)]),
        ("hinge", 0.0, [1 - 0.2, 1 + 0.3]),
        ("hinge", 0.3, [1 - 0.2, 1 + 0.3]),  # label smoothing does not touch SLiC
        # IPO: (h - 1/(2β))², 1/(2β) = 5
        ("ipo", 0.0, [(2 - 5) ** 2, (-3 - 5) ** 2]),
    ],
)
def test_loss_values_by_hand(loss_type, eps, expected):
    out = dpo_loss(*logps(PC, PR, RC, RR), beta=BETA, loss_type=loss_type, label_smoothing=eps)
    assert out.losses.shape == (2,)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, abs=1e-12)


def test_hinge_is_zero_past_the_margin():
    # βh = 0.5 · 4 = 2 > 1
    out = dpo_loss(*logps([0.0], [-4.0], [0.0], [0.0]), beta=0.5, loss_type="hinge")
    assert out.losses.tolist() == [0.0]


def test_ipo_is_zero_at_its_target():
    # h = 1/(2β) = 2.5 with β = 0.2
    out = dpo_loss(*logps([1.0], [-1.5], [0.0], [0.0]), beta=0.2, loss_type="ipo")
    assert out.losses.item() == pytest.approx(0.0, abs=1e-12)


def test_rewards_margins_accuracy():
    out = dpo_loss(*logps(PC, PR, RC, RR), beta=BETA)
    # β·(policy - reference) per side
    assert out.chosen_rewards.tolist() == pytest.approx([0.1 * 1.0, 0.1 * -0.5], abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([0.1 * -1.0, 0.1 * 2.5], abs=1e-12)
    assert out.margins.tolist() == pytest.approx([0.2, -0.3], abs=1e-12)
    assert out.accuracy.tolist() == [1.0, 0.0]
    assert out.accuracy.mean().item() == 0.5


def test_rewards_are_detached():
    out = dpo_loss(*logps(PC, PR, RC, RR, grad=True), beta=BETA)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="kto"):
        dpo_loss(*logps(PC, PR, RC, RR), beta=BETA, loss_type="kto")


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    # h = 0.4 here: below the hinge margin (1/β = 10) and the IPO target (5), so every loss
    # pushes h up: d loss / d chosen < 0, d loss / d rejected > 0, and they are opposite.
    pc, pr, rc, rr = logps([-2.0], [-2.4], [-2.0], [-2.0], grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=0.0)
    out.loss.backward()
    assert pc.grad.item() < 0
    assert pr.grad.item() > 0
    assert pc.grad.item() == pytest.approx(-pr.grad.item(), abs=1e-12)
    # the reference enters with the opposite sign of the policy
    assert rc.grad.item() == pytest.approx(-pc.grad.item(), abs=1e-12)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("sigmoid", -BETA / (1 + math.exp(BETA * 0.4))),  # -β·σ(-βh)
        ("hinge", -BETA),
        ("ipo", 2 * (0.4 - 5)),
    ],
)
def test_chosen_gradient_values(loss_type, expected):
    pc, pr, rc, rr = logps([-2.0], [-2.4], [-2.0], [-2.0], grad=True)
    dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type).loss.backward()
    assert pc.grad.item() == pytest.approx(expected, abs=1e-12)


def test_loss_is_mean_over_batch_gradient():
    pc, pr, rc, rr = logps([-2.0, -2.0], [-2.4, -2.4], [-2.0, -2.0], [-2.0, -2.0], grad=True)
    dpo_loss(pc, pr, rc, rr, beta=BETA).loss.backward()
    assert pc.grad.tolist() == pytest.approx([-BETA / (1 + math.exp(0.04)) / 2] * 2, abs=1e-12)
