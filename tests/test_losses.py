"""Losses against hand computations and against AutoAttack's own DLR implementations."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adaptive_smoothing.losses import (CompLoss, composite_attack_loss, dlr_loss,
                                       dlr_targeted_loss, mixer_bce)


def _bce(g: float, label: float) -> float:
    p = 1 / (1 + math.exp(-g))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def _ce(logits: list[float], y: int) -> float:
    return -logits[y] + math.log(sum(math.exp(v) for v in logits))


def test_dlr_by_hand() -> None:
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, 2.0],    # y = 0 on top
                           [4.0, 1.0, 3.0, 0.0, 2.0]])   # y = 2 not on top
    y = torch.tensor([0, 2])
    # sorted descending: 4, 3, 2, 1, 0 -> denominator z1 - z3 = 2
    expected = torch.tensor([-(4.0 - 3.0) / 2, -(3.0 - 4.0) / 2])
    torch.testing.assert_close(dlr_loss(logits, y), expected)


def test_dlr_targeted_by_hand() -> None:
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, 2.0]])
    y, t = torch.tensor([0]), torch.tensor([1])
    # denominator z1 - (z3 + z4) / 2 = 4 - (2 + 1) / 2 = 2.5
    torch.testing.assert_close(dlr_targeted_loss(logits, y, t), torch.tensor([-(4.0 - 1.0) / 2.5]))


def test_dlr_matches_autoattack() -> None:
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    logits = torch.randn(64, 10) * 3
    y = torch.randint(0, 10, (64,))
    t = torch.randint(0, 10, (64,))
    torch.testing.assert_close(dlr_loss(logits, y), APGDAttack.dlr_loss(None, logits, y))
    ref = APGDAttack_targeted.dlr_loss_targeted(SimpleNamespace(y_target=t), logits, y)
    torch.testing.assert_close(dlr_targeted_loss(logits, y, t), ref)


def test_mixer_bce_finite_and_infinite() -> None:
    gamma = torch.tensor([0.3, -1.2, math.inf, -math.inf], requires_grad=True)
    bce = mixer_bce(gamma, 1.0)
    assert bce[0].item() == pytest.approx(_bce(0.3, 1.0), rel=1e-6)
    assert bce[1].item() == pytest.approx(_bce(-1.2, 1.0), rel=1e-6)
    assert bce[2].item() == 0.0 and bce[3].item() == 0.0
    bce.sum().backward()
    assert torch.isfinite(gamma.grad).all()
    assert gamma.grad[2].item() == 0.0 and gamma.grad[3].item() == 0.0
    # NaN is a bug upstream: it must stay visible.
    assert torch.isnan(mixer_bce(torch.tensor([math.nan]), 1.0)).all()


def test_composite_attack_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    gamma = torch.tensor([0.7, -0.4])
    y = torch.tensor([0, 3])
    w = torch.tensor([0.25, 0.0])
    out = composite_attack_loss(logits, gamma, y, w, "ce")
    expected = [0.75 * _ce([2.0, 0.5, -1.0, 0.0], 0) + 0.25 * _bce(0.7, 1.0),
                _ce([0.1, 0.2, 0.3, 0.4], 3)]
    torch.testing.assert_close(out, torch.tensor(expected))

    t = torch.tensor([1, 0])
    out_t = composite_attack_loss(logits, gamma, y, 0.5, "dlr_targeted", t)
    expected_t = 0.5 * dlr_targeted_loss(logits, y, t) + 0.5 * mixer_bce(gamma, 1.0)
    torch.testing.assert_close(out_t, expected_t)


@pytest.mark.parametrize("gamma", [None, math.inf, -math.inf])
def test_composite_attack_loss_without_mixer(gamma: float | None) -> None:
    logits = torch.randn(3, 10, requires_grad=True)
    y = torch.tensor([1, 2, 3])
    g = None if gamma is None else torch.full((3,), gamma)
    out = composite_attack_loss(logits, g, y, torch.tensor([0.0, 0.3, 1.0]), "ce")
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(out, ce * torch.tensor([1.0, 0.7, 0.0]))
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_comp_loss_by_hand() -> None:
    log_probs = torch.log_softmax(torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]), dim=1)
    gamma = torch.tensor([0.8, -0.3])
    y = torch.tensor([0, 1])
    label = torch.tensor([1.0, 0.0])
    loss_fn = CompLoss(bce=1.5, ce=0.5, prod=0.3, clean_scale=2.0, adv_scale=1.0)
    per = []
    for i, scale in enumerate([1.0, 2.0]):  # sample 0 adversarial, sample 1 clean
        bce = _bce(gamma[i].item(), label[i].item())
        ce = -log_probs[i, y[i]].item()
        per.append(scale * (1.5 * bce + 0.5 * ce + 0.3 * bce * ce))
    torch.testing.assert_close(loss_fn.per_sample(log_probs, gamma, y, label), torch.tensor(per))
    torch.testing.assert_close(loss_fn(log_probs, gamma, y, label, accum_count=4),
                               torch.tensor(sum(per) / 2 / 4))
    summed = CompLoss(1.5, 0.5, 0.3, clean_scale=2.0, reduction="sum")
    torch.testing.assert_close(summed(log_probs, gamma, y, label, accum_count=4),
                               torch.tensor(sum(per) / 4))
    # An explicit per-sample scale replaces the group scales.
    scale = torch.tensor([3.0, 0.0])
    torch.testing.assert_close(loss_fn.per_sample(log_probs, gamma, y, label, scale),
                               torch.tensor([3 * per[0], 0.0]))


def test_comp_loss_infinite_gamma_is_finite() -> None:
    log_probs = torch.log_softmax(torch.randn(2, 10), dim=1)
    gamma = torch.tensor([math.inf, -math.inf])
    loss = CompLoss(1.5, 1.0, 0.3)(log_probs, gamma, torch.tensor([0, 1]), torch.tensor([1., 0.]))
    assert torch.isfinite(loss)
