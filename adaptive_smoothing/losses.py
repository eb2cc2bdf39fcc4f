"""Losses: DLR (Croce & Hein 2020), the mixer's training loss and the composite attack loss.

All per-sample functions return shape (B,) so that attacks can give every sample its own weight.

gamma is -inf/+inf when the composite runs one base model only, and constant (no gradient) when it
has no mixing network. A BCE on a non-finite gamma carries no information for training or attacking
the mixer and would turn into NaN (inf - inf inside BCEWithLogits), so :func:`mixer_bce` drops it
(contributes 0). NaN gamma is a bug upstream and is deliberately left to propagate.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

AttackLossName = Literal["ce", "dlr", "dlr_targeted"]
Weight = Union[float, torch.Tensor]

# Keeps the DLR denominators away from 0 (AutoAttack's constant, so the losses agree with it).
_DLR_EPS = 1e-12


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss per sample, as in AutoAttack (larger = more adversarial).

    -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12), z sorted descending as z_pi1 >= z_pi2 ...
    """
    z_sorted, ind_sorted = logits.sort(dim=1)
    y_is_top = (ind_sorted[:, -1] == y).to(logits.dtype)
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    z_other = z_sorted[:, -2] * y_is_top + z_sorted[:, -1] * (1.0 - y_is_top)
    return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + _DLR_EPS)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor,
                      y_target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss per sample, as in AutoAttack's APGD-T (needs at least 4 classes).

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)
    """
    if logits.shape[1] < 4:
        raise ValueError(f"targeted DLR needs at least 4 classes, got {logits.shape[1]}")
    z_sorted, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    z_t = logits.gather(1, y_target.unsqueeze(1)).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + _DLR_EPS)


def mixer_bce(gamma: torch.Tensor, label: Weight) -> torch.Tensor:
    """Per-sample BCEWithLogits(gamma, label); 0 where gamma is +-inf (see the module docstring).

    ``label``: 1 = "adversarial, trust the ROB model", 0 = "clean, trust the STD model"; a float or
    a (B,) tensor.
    """
    infinite = torch.isinf(gamma)
    # where() alone would still back-propagate NaN from the inf branch; feed BCE a finite value.
    safe_gamma = torch.where(infinite, torch.zeros_like(gamma), gamma)
    # A Python label becomes a fill on gamma's device (torch.as_tensor would copy from the host).
    target = (label.to(gamma.dtype).expand_as(gamma) if isinstance(label, torch.Tensor)
              else torch.full_like(gamma, float(label)))
    bce = F.binary_cross_entropy_with_logits(safe_gamma, target, reduction="none")
    return torch.where(infinite, torch.zeros_like(bce), bce)


def attack_base_loss(logits: torch.Tensor, y: torch.Tensor, loss: AttackLossName = "ce",
                     y_target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The classification part of an attack loss, per sample (larger = more adversarial)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "dlr":
        return dlr_loss(logits, y)
    if loss == "dlr_targeted":
        if y_target is None:
            raise ValueError("loss 'dlr_targeted' needs y_target")
        return dlr_targeted_loss(logits, y, y_target)
    raise ValueError(f"unknown attack loss {loss!r}; expected 'ce', 'dlr' or 'dlr_targeted'")


def composite_attack_loss(logits: torch.Tensor, gamma: Optional[torch.Tensor], y: torch.Tensor,
                          bce_weight: Weight = 0.0, loss: AttackLossName = "ce",
                          y_target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample attack loss (1 - w) * L(out, y) + w * BCEWithLogits(gamma, 1).

    L is CE, DLR or targeted DLR. Maximising the BCE term pushes gamma down, i.e. fools the mixer
    into trusting the STD model (docs/METHOD.md, "Training"). ``bce_weight`` w is a float or a
    (B,) tensor.
    ``gamma`` None (a plain classifier) or +-inf drops the BCE term.
    """
    base = attack_base_loss(logits, y, loss, y_target)
    # A Python weight stays a Python number (no host-to-device copy per attack step).
    w = bce_weight.to(base.dtype) if isinstance(bce_weight, torch.Tensor) else float(bce_weight)
    if gamma is None:
        return (1 - w) * base
    return (1 - w) * base + w * mixer_bce(gamma.to(base.dtype), 1.0)


class CompLoss(nn.Module):
    """The mixing network's training loss (docs/METHOD.md, "Training" step 3).

    Per sample:  scale * (c_bce * BCE(gamma, mixer_label) + c_ce * CE(out, y)
                          + c_prod * BCE * CE)

    Reduction (explicit, since gradients are accumulated over ``accum_count`` mini-batches per
    optimizer step):

    - ``reduction="mean"`` (default): sum_i(loss_i) / (batch_size * accum_count), i.e. the mean
      per mini-batch averaged over the accumulated mini-batches;
    - ``reduction="sum"``: sum_i(loss_i) / accum_count.

    Args:
        bce, ce, prod: the constants c_bce, c_ce, c_prod (published CIFAR-10: 1.5, 0, 0.3).
        clean_scale, adv_scale: per-group scales used when no per-sample ``scale`` is given
            (mixer label 0 = clean, 1 = adversarial).
    """

    def __init__(self, bce: float = 1.5, ce: float = 0.0, prod: float = 0.3, *,
                 clean_scale: float = 1.0, adv_scale: float = 1.0,
                 reduction: Literal["mean", "sum"] = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.c_bce, self.c_ce, self.c_prod = float(bce), float(ce), float(prod)
        self.clean_scale, self.adv_scale = float(clean_scale), float(adv_scale)
        self.reduction = reduction

    def per_sample(self, log_probs: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor,
                   mixer_label: torch.Tensor, scale: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """The scaled per-sample loss, shape (B,)."""
        label = mixer_label.to(gamma.dtype)
        bce = mixer_bce(gamma, label)
        ce = F.cross_entropy(log_probs.float(), y, reduction="none")
        loss = self.c_bce * bce + self.c_ce * ce + self.c_prod * bce * ce
        if scale is None:
            scale = self.group_scales(label)
        return loss * scale.to(loss.dtype)

    def group_scales(self, mixer_label: torch.Tensor) -> torch.Tensor:
        """The per-sample scales when none are given: ``adv_scale`` for attacked samples (mixer
        label 1), ``clean_scale`` for clean ones."""
        label = mixer_label if mixer_label.is_floating_point() else mixer_label.float()
        return torch.where(label > 0.5, torch.full_like(label, self.adv_scale),
                           torch.full_like(label, self.clean_scale))

    def forward(self, log_probs: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor,
                mixer_label: torch.Tensor, scale: Optional[torch.Tensor] = None,
                accum_count: int = 1) -> torch.Tensor:
        if accum_count < 1:
            raise ValueError(f"accum_count must be >= 1, got {accum_count}")
        loss = self.per_sample(log_probs, gamma, y, mixer_label, scale)
        total = loss.mean() if self.reduction == "mean" else loss.sum()
        return total / accum_count
