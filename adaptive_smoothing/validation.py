"""The training's periodic validation of the composite: clean and robust accuracy, mean gamma
and alpha (docs/TRAINING.md, "Validation"). Beside detection.py, which measures how well gamma
separates clean from attacked images; evaluation.py is the full, resumable evaluation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from adaptive_smoothing.attacks import Norm, apgd_cascade, pgd
from adaptive_smoothing.losses import AttackLossName
from adaptive_smoothing.models import CompositeModel
from adaptive_smoothing.runtime import autocast_context

__all__ = ["validate"]


def validate(composite: CompositeModel, x: torch.Tensor, y: torch.Tensor, *, eps: float,
             norm: Norm, n_iter: int, n_target: int, device: torch.device, dtype: torch.dtype,
             batch_size: int, generator: torch.Generator, use_apgd: bool = True,
             pgd_step_size: Optional[float] = None, pgd_loss: AttackLossName = "ce",
             pgd_bce_weight: float = 0.0) -> dict[str, float]:
    """Clean and robust accuracy and mean gamma/alpha of the composite on (x, y): the training's
    validation (docs/TRAINING.md).

    The composite is evaluated as deployed (eval mode, scale_alpha on). Robust accuracy: with
    ``use_apgd`` :func:`~adaptive_smoothing.attacks.apgd_cascade` (APGD-CE on all points, then
    APGD-T with ``n_target`` targets on the points still robust, ``n_iter`` iterations each,
    plain CE/DLR losses: AutoAttack's first two attacks); otherwise PGD (``n_iter``,
    ``pgd_step_size``, ``pgd_loss``, ``pgd_bce_weight``). "Attacked" gamma/alpha are measured on
    the first attack's output for every point (the first adversarial example found, else the
    highest-loss point), so they describe attacked inputs whether or not the attack succeeded.

    Under torch.distributed each process takes every world-th example (``generator`` is this
    process's); the sums are all-reduced.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    x, y = x[rank::world], y[rank::world]
    sums = torch.zeros(7, dtype=torch.float64)
    with composite.mode(False), autocast_context(device, dtype):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            with torch.no_grad():
                clean = composite(xb)
            correct = clean.log_probs.argmax(1) == yb
            if use_apgd:
                result = apgd_cascade(composite, xb, yb, eps, norm=norm, n_iter=n_iter,
                                      n_target=n_target, generator=generator,
                                      clean_correct=correct, first_on_all=True)
                robust, x_first = result.robust, result.first_x_adv
            else:
                first = pgd(composite, xb, yb, eps, norm=norm, n_iter=n_iter,
                            step_size=pgd_step_size, loss=pgd_loss, bce_weight=pgd_bce_weight,
                            generator=generator)
                robust, x_first = correct & ~first.fooled, first.x_adv
            with torch.no_grad():
                attacked = composite(x_first)
            sums += torch.tensor([len(yb), correct.sum().item(), robust.sum().item(),
                                  clean.gamma.float().sum().item(),
                                  attacked.gamma.float().sum().item(),
                                  clean.alpha.float().sum().item(),
                                  attacked.alpha.float().sum().item()], dtype=torch.float64)
    if world > 1:
        reduced = sums.to(device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    n = max(sums[0].item(), 1.0)
    keys = ("clean_acc", "robust_acc", "gamma_clean", "gamma_adv", "alpha_clean", "alpha_adv")
    return {"n": sums[0].item(), **{k: (sums[i + 1] / n).item() for i, k in enumerate(keys)}}
