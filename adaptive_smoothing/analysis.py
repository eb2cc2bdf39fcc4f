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

import json
import math
from dataclasses import dataclass
from pathlib import Path
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


COMPOSITES = ("adaptive", "nonlinear")  # the sweep entries of composites (evaluation.py)


def compare_with_fixed_curve(sweep: dict, name: str = "adaptive") -> dict:
    """The composite ``name`` of an alpha sweep (``sweep.json``) against its fixed-alpha curve.

    The curve's robust accuracy at the composite's clean accuracy is the linear interpolation
    between two fixed mixtures adjacent in alpha whose clean accuracies bracket the composite's
    (the highest such value where several pairs bracket it, so the composite is judged against
    the best the curve offers). Accuracies in points (%), with binomial standard errors.
    ``curve_robust`` is None where no pair brackets the composite's clean accuracy. The curve
    is concave, so sparse points understate it: the paired comparison with the matched fixed
    alpha (:func:`paired_comparison`) is the one to judge by.
    """
    if name not in sweep:
        raise ValueError(f"the sweep has no {name!r} entry (the composite): nothing to compare")
    fixed = fixed_alpha_entries(sweep)
    if len(fixed) < 2:
        raise ValueError(f"the sweep has {len(fixed)} fixed-alpha entries; need at least 2")
    comp = sweep[name]
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


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar test: the binomial probability, under no difference, of a split
    of the discordant pairs at least this uneven."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(a: Sequence[int], b: Sequence[int]) -> dict:
    """Model A against model B on the same images (1 = robust/correct, 0 = not): the paired
    difference of accuracy in points with its standard error, the discordant counts and the
    exact McNemar p-value."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes of different or no images: {len(a)} and {len(b)}")
    n = len(a)
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else float("nan")
    a_only, b_only = diffs.count(1), diffs.count(-1)
    return {"n": n, "difference": 100 * mean, "difference_se": 100 * math.sqrt(var / n),
            "a_only": a_only, "b_only": b_only, "mcnemar_p": mcnemar_p(a_only, b_only)}


def compare_with_matched(sweep_dir: Path, sweep: dict, name: str) -> Optional[dict]:
    """The composite ``name`` against ``matched_<name>``, the fixed mixture at its clean
    accuracy, image by image (their per_image.json files); None where the sweep has no match
    or the per-image outcomes are incomplete."""
    matched = f"matched_{name}"
    if matched not in sweep:
        return None
    files = [json.loads((sweep_dir / entry / "per_image.json").read_text())
             for entry in (name, matched)]
    if not all(f.get("complete") for f in files) or files[0]["image_ids"] != files[1]["image_ids"]:
        return None
    comp, fixed = (f["outcomes"] for f in files)
    entry = sweep[matched]
    n = int(entry["n_examples"])
    return {"fixed_alpha": entry.get("fixed_alpha"),
            "clean": 100 * entry["clean_accuracy"],
            "clean_se": 100 * binomial_se(entry["clean_accuracy"], n),
            "robust": 100 * entry["robust_accuracy"],
            "robust_se": 100 * binomial_se(entry["robust_accuracy"], n),
            "robust_paired": paired_comparison(comp["robust"], fixed["robust"]),
            "clean_paired": paired_comparison(comp["clean"], fixed["clean"])}


def compare_sweep(sweep_dir: Path) -> dict:
    """comparison.json of a sweep folder: per composite, the fixed curve and the matched fixed
    mixture (paired)."""
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    out = {}
    for name in COMPOSITES:
        if name in sweep:
            out[name] = dict(compare_with_fixed_curve(sweep, name),
                             matched=compare_with_matched(sweep_dir, sweep, name))
    if not out:
        raise ValueError(f"{sweep_dir / 'sweep.json'} has no composite ({', '.join(COMPOSITES)})")
    return out
