"""How much of the robust model's robustness a fixed mixture can keep (docs/METHOD.md,
"Certified robustness"), and how a composite compares with the fixed mixtures of its bases.

A mixture with weight alpha on ROB outputs log((1 - alpha) p_std + alpha p_rob). At a point where
ROB's probability margin d = p_rob(y) - max_{j != y} p_rob(j) exceeds (1 - alpha) / alpha, the
mixture predicts y whatever STD outputs there; where d is smaller, an STD output can flip it. So
the share of ROB's robust points whose margin clears that threshold tells how much of ROB's
robust accuracy a composite whose alpha never exceeds ``alpha`` can hope to keep, and the measured
fixed-alpha mixtures show how much it does keep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from adaptive_smoothing.attacks import apgd
from adaptive_smoothing.models.composite import (CompositeModel, LogProbClassifier,
                                                 fixed_alpha_composite)


def probability_margin(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p(y) - max_{j != y} p(j) per row; negative where the prediction is wrong."""
    true = probs.gather(1, y[:, None]).squeeze(1)
    others = probs.scatter(1, y[:, None], -math.inf)
    return true - others.max(dim=1).values


def margin_threshold(alpha: float) -> float:
    """The ROB margin above which a mixture with weight ``alpha`` on ROB cannot be flipped by STD."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    return (1 - alpha) / alpha


def _apgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_iter: int,
             seed: int) -> torch.Tensor:
    """APGD-CE points as an evaluation uses them: the first misclassified iterate, else the
    highest-loss one."""
    return apgd(model, x, y, eps, n_iter=n_iter, loss="ce", return_adversarial=True,
                generator=torch.Generator().manual_seed(seed)).x_adv


def _quantiles(values: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    # torch.quantile needs q on the device of the values (a CPU q fails for CUDA margins).
    q = torch.tensor(list(quantiles), dtype=values.dtype).to(values.device)
    return torch.quantile(values, q)


@dataclass(frozen=True)
class MarginReport:
    n: int
    rob_clean_accuracy: float
    rob_robust_accuracy: float
    margin_quantiles: dict[str, float]   # of ROB's margin at its robust adversarial points
    kept_at_alpha: dict[str, float]      # share of all n points: robust with margin > threshold


def rob_margin_report(rob_model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      alphas: Sequence[float], *, rob_scale: float = 1.0, eps: float = 8 / 255,
                      n_iter: int = 20, quantiles: Sequence[float] = (0.1, 0.25, 0.5),
                      seed: int = 0) -> MarginReport:
    """Attack ROB alone (APGD-CE, Linf) and measure its probability margins where it stays right."""
    rob_model.eval()
    with torch.no_grad():
        clean_correct = rob_model(x).argmax(1) == y
    # The highest-loss point where ROB is never fooled: the margin there is the one that counts.
    x_adv = _apgd_ce(rob_model, x, y, eps, n_iter, seed)
    with torch.no_grad():
        margin = probability_margin(torch.softmax(rob_model(x_adv).float() * rob_scale, 1), y)
    robust = (margin > 0) & clean_correct
    robust_margins = margin[robust]
    q = (_quantiles(robust_margins, quantiles).tolist()
         if len(robust_margins) else [math.nan] * len(quantiles))
    return MarginReport(
        n=len(y), rob_clean_accuracy=clean_correct.float().mean().item(),
        rob_robust_accuracy=robust.float().mean().item(),
        margin_quantiles={f"{k:g}": v for k, v in zip(quantiles, q)},
        kept_at_alpha={f"{a:g}": (margin > margin_threshold(a)).float().mean().item()
                       for a in alphas})


def fixed_mixture_accuracy(composite: CompositeModel, alpha: float, x: torch.Tensor,
                           y: torch.Tensor, *, eps: float = 8 / 255, n_iter: int = 20,
                           seed: int = 0) -> tuple[float, float]:
    """(clean, APGD-CE robust) accuracy of the fixed mixture with weight ``alpha`` on ROB."""
    model = LogProbClassifier(fixed_alpha_composite(composite, alpha)).eval()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    x_adv = _apgd_ce(model, x, y, eps, n_iter, seed)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    return clean, robust


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n images."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def fixed_alpha_entries(sweep: dict) -> list[tuple[float, dict]]:
    """The fixed mixtures of an alpha sweep (entries ``alpha_<alpha>``) as (alpha, entry), by
    alpha."""
    return sorted((float(name.split("_", 1)[1]), entry) for name, entry in sweep.items()
                  if name.startswith("alpha_"))


def compare_with_fixed_curve(sweep: dict) -> dict:
    """The composite of an alpha sweep (``sweep.json``) against its fixed-alpha curve.

    The curve's robust accuracy at the composite's clean accuracy is the linear interpolation
    between two fixed mixtures adjacent in alpha whose clean accuracies bracket the composite's
    (the highest such value where several pairs bracket it, so the composite is judged against
    the best the curve offers). Accuracies in points (%), with binomial standard errors.
    ``curve_robust`` is None where no pair brackets the composite's clean accuracy.
    """
    if "adaptive" not in sweep:
        raise ValueError("the sweep has no 'adaptive' entry (the composite): nothing to compare")
    fixed = fixed_alpha_entries(sweep)
    if len(fixed) < 2:
        raise ValueError(f"the sweep has {len(fixed)} fixed-alpha entries; need at least 2")
    comp = sweep["adaptive"]
    n = int(comp["n_examples"])
    clean, robust = 100 * comp["clean_accuracy"], 100 * comp["robust_accuracy"]
    best: Optional[tuple[float, float, float]] = None
    for (a0, e0), (a1, e1) in zip(fixed, fixed[1:]):
        c0, c1 = 100 * e0["clean_accuracy"], 100 * e1["clean_accuracy"]
        r0, r1 = 100 * e0["robust_accuracy"], 100 * e1["robust_accuracy"]
        if min(c0, c1) <= clean <= max(c0, c1):
            value = max(r0, r1) if c0 == c1 else r0 + (r1 - r0) * (clean - c0) / (c1 - c0)
            if best is None or value > best[0]:
                best = (value, a0, a1)
    rob = dict(fixed).get(1.0)
    return {
        "n_examples": n,
        "clean": clean, "clean_se": 100 * binomial_se(comp["clean_accuracy"], n),
        "robust": robust, "robust_se": 100 * binomial_se(comp["robust_accuracy"], n),
        "mean_alpha_clean": comp.get("mean_alpha_clean"),
        "mean_alpha_adv": comp.get("mean_alpha_adv"),
        "curve_robust": None if best is None else best[0],
        "bracket_alphas": None if best is None else [best[1], best[2]],
        "above_curve": None if best is None else robust - best[0],
        "clean_above_rob": None if rob is None else clean - 100 * rob["clean_accuracy"],
    }
