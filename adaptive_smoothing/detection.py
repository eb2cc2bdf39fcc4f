"""Held-out detection metrics of the mixing network: does gamma separate clean from attacked?

The training loss's own "mixer accuracy" (P[gamma > 0 | attacked], P[gamma <= 0 | clean] on the
training buffer) can stay at 0.5 while the mixer learns, because the gamma BatchNorm re-centres
every training batch. The ranking of gamma on a fixed held-out set does not depend on any
threshold: its ROC AUC (clean = negative, attacked = positive) is the progress signal used here.

Two attacks give the "attacked" images:

- *fixed*: APGD-CE against a fixed-alpha mixture of the same base models (no mixer, so the images
  do not depend on the mixer and are computed once per run);
- *adaptive*: APGD with the composite loss (1 - w) CE + w BCE(gamma, 1) against the current
  composite in eval mode, i.e. an attacker who also pushes gamma down.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from adaptive_smoothing.attacks import Norm, apgd
from adaptive_smoothing.models.composite import CompositeModel, fixed_alpha_composite
from adaptive_smoothing.runtime import autocast_context

logger = logging.getLogger(__name__)

__all__ = ["detection_metrics", "fixed_attack_images", "roc_auc"]


def roc_auc(negative: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of scores, P[positive > negative] + 0.5 P[positive == negative].

    The Mann-Whitney statistic from average ranks (ties share their mean rank), so it equals the
    trapezoidal area under the ROC curve. NaN if either group is empty.
    """
    neg = negative.detach().double().flatten().cpu()
    pos = positive.detach().double().flatten().cpu()
    if neg.numel() == 0 or pos.numel() == 0:
        return float("nan")
    scores = torch.cat([neg, pos])
    if scores.isnan().any():
        raise ValueError("roc_auc: the scores contain NaN")
    sorted_scores, order = torch.sort(scores, stable=True)
    # Average rank (1-based) of each run of equal scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True,
                                                  return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    n_neg, n_pos = neg.numel(), pos.numel()
    rank_sum_pos = ranks[n_neg:].sum().item()
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_neg * n_pos)


def fixed_attack_images(composite: CompositeModel, x: torch.Tensor, y: torch.Tensor, *,
                        alpha: float, eps: float, norm: Norm, n_iter: int, batch_size: int,
                        device: torch.device, dtype: torch.dtype,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """APGD-CE examples against the fixed mixture (1 - alpha) STD + alpha ROB, on the CPU.

    The mixture has no mixer, so these images stay valid for the whole training run.
    """
    fixed = fixed_alpha_composite(composite, alpha)
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        with autocast_context(device, dtype):
            result = apgd(fixed, xb, yb, eps, norm=norm, n_iter=n_iter, loss="ce",
                          return_adversarial=True, generator=generator)
        out.append(result.x_adv.detach().float().cpu())
    return torch.cat(out) if out else x.clone()


@torch.no_grad()
def _gamma_alpha(composite: CompositeModel, x: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast_context(device, dtype):
        out = composite(x.to(device))
    return out.gamma.float().cpu(), out.alpha.float().cpu()


def detection_metrics(composite: CompositeModel, x: torch.Tensor, y: torch.Tensor,
                      x_fixed_adv: torch.Tensor, *, eps: float, norm: Norm, n_iter: int,
                      bce_weight: float, batch_size: int, device: torch.device,
                      dtype: torch.dtype, generator: Optional[torch.Generator] = None
                      ) -> dict[str, float]:
    """AUC of gamma (clean vs attacked) and mean alpha, under the fixed and the adaptive attack.

    The composite is evaluated as deployed (eval mode, alpha scaling on); its mode is restored.
    Every image counts as attacked whether or not the attack fooled the classifier (the first
    misclassified iterate, else the highest-loss point).
    """
    g_clean, a_clean, g_fixed, a_fixed, g_ada, a_ada = ([] for _ in range(6))
    with composite.mode(False):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            g, a = _gamma_alpha(composite, xb, device, dtype)
            g_clean.append(g)
            a_clean.append(a)
            g, a = _gamma_alpha(composite, x_fixed_adv[start:start + batch_size], device, dtype)
            g_fixed.append(g)
            a_fixed.append(a)
            with autocast_context(device, dtype):
                result = apgd(composite, xb, yb, eps, norm=norm, n_iter=n_iter, loss="ce",
                              bce_weight=bce_weight, return_adversarial=True,
                              generator=generator)
            g, a = _gamma_alpha(composite, result.x_adv, device, dtype)
            g_ada.append(g)
            a_ada.append(a)
    clean, fixed, ada = torch.cat(g_clean), torch.cat(g_fixed), torch.cat(g_ada)
    return {"auc_fixed": roc_auc(clean, fixed), "auc_adaptive": roc_auc(clean, ada),
            "det_alpha_clean": torch.cat(a_clean).mean().item(),
            "det_alpha_fixed": torch.cat(a_fixed).mean().item(),
            "det_alpha_adaptive": torch.cat(a_ada).mean().item()}
