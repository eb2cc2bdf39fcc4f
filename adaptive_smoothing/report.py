"""The evaluation's report: per-batch counters summed into the reported numbers (results.json),
every image's outcome (per_image.json), the Markdown table (results.md) and the alpha sweep's
table. evaluation.py runs the attacks and writes these files; nothing here touches a model.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from adaptive_smoothing.config import EvaluationSettings

if TYPE_CHECKING:  # the engine imports this module; the type is only read here
    from adaptive_smoothing.evaluation import ExtraAttacks

__all__ = ["COUNTERS", "EXTRA_ATTACKS", "format_table", "per_image", "percent", "summarize",
           "sweep_table"]

# Per-batch counters; every reported number is a ratio of two of these sums.
COUNTERS = ("n", "clean_correct", "autoattack_robust", "pgd_robust", "adaptive_robust",
            "robust", "gamma_clean_sum", "alpha_clean_sum", "gamma_adv_sum", "alpha_adv_sum",
            "adv_n", "gamma_nonfinite", "surrogate_robust", "transfer_rob_robust",
            "transfer_linear_robust", "square_robust", "square_n")
# The extra attacks of a nonlinear composite and of a rob_logits gate's (docs/METHOD.md,
# "Evaluating a nonlinear composite", "Mixer inputs"): counter -> what the table calls it.
EXTRA_ATTACKS = {
    "surrogate_robust": "APGD-CE/T steered by the surrogate's gradient",
    "transfer_rob_robust": "APGD-CE/T examples of ROB alone, transferred",
    "transfer_linear_robust": "APGD-CE/T examples of the linear mixture, transferred",
}


def percent(value: Optional[float]) -> str:
    """A ratio as a percentage; "-" where it was not measured (None: no attack was run)."""
    return "-" if value is None else f"{100 * value:.2f}%"


def _number(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(summary: Mapping[str, Any], name: str, digits: int) -> str:
    """The mean ``name`` (gamma or alpha) on clean / attacked images."""
    return (f"{_number(summary[f'mean_{name}_clean'], digits)} / "
            f"{_number(summary[f'mean_{name}_adv'], digits)}")


def per_image(counters: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every image's outcome per attack, in image order (1 correct, 0 fooled, -1 not
    attacked); batches from before these were recorded leave ``complete`` false."""
    ordered = sorted(counters, key=lambda c: c.get("start", 0))
    complete = all("per_image" in c and "start" in c for c in ordered)
    out: dict[str, Any] = {"complete": complete, "image_ids": [], "outcomes": {}}
    if not complete:
        return out
    for batch in ordered:
        out["image_ids"] += list(range(int(batch["start"]), int(batch["end"])))
        for name, flags in batch["per_image"].items():
            out["outcomes"].setdefault(name, []).extend(flags)
    return out


def _ran(extra: Optional[ExtraAttacks], name: str) -> bool:
    """Whether the extra attack ``name`` (a counter) was run."""
    if extra is None:
        return False
    return {"surrogate_robust": extra.surrogate,
            "transfer_rob_robust": extra.transfer,
            "transfer_linear_robust": extra.transfer,
            "square": extra.square_examples > 0}[name]


def summarize(counters: Iterable[dict[str, float]], settings: EvaluationSettings,
              model_info: dict[str, Any],
              extra: Optional[ExtraAttacks] = None, *,
              nonlinear: bool = False) -> dict[str, Any]:
    """Aggregate per-batch counters into the reported numbers (``extra``: the extra attacks
    run, then reported; ``nonlinear``: the model is a nonlinear composite)."""
    total = {k: 0.0 for k in COUNTERS}
    for batch in counters:
        for k in COUNTERS:
            value = batch.get(k, 0.0)
            total[k] += math.nan if value is None else value  # None: a NaN written as JSON
    n, adv_n = total["n"], total["adv_n"]

    def ratio(num: float, den: float) -> Optional[float]:
        return None if den == 0 else num / den

    # With -inf/+inf gamma (one-model modes) a mean gamma is meaningless: report None.
    gamma_ok = total["gamma_nonfinite"] == 0
    return {
        "n_examples": int(n),
        "norm": settings.norm,
        "eps": settings.eps,
        "clean_accuracy": ratio(total["clean_correct"], n),
        "autoattack": list(settings.attacks_to_run),
        "autoattack_version": settings.autoattack_version if settings.attacks_to_run else None,
        "autoattack_iterations": (settings.autoattack_iterations if settings.attacks_to_run
                                  else None),
        "autoattack_robust_accuracy": (ratio(total["autoattack_robust"], n)
                                       if settings.attacks_to_run else None),
        "pgd_robust_accuracy": ratio(total["pgd_robust"], n) if settings.pgd else None,
        "pgd": ({"iterations": settings.pgd_iters, "step_size": settings.pgd_step_size,
                 "loss": settings.pgd_loss} if settings.pgd else None),
        "adaptive_robust_accuracy": (ratio(total["adaptive_robust"], n)
                                     if settings.adaptive_attack else None),
        "adaptive_attack_weight": (settings.adaptive_attack_weight
                                   if settings.adaptive_attack else None),
        **{f"{name.removesuffix('_robust')}_robust_accuracy": (
            ratio(total[name], n) if _ran(extra, name) else None)
           for name in EXTRA_ATTACKS},
        "square_examples": int(total["square_n"]) if _ran(extra, "square") else None,
        "square_queries": extra.square_queries if extra and _ran(extra, "square") else None,
        "square_robust_accuracy": (ratio(total["square_robust"], total["square_n"])
                                   if _ran(extra, "square") else None),
        "robust_accuracy": (ratio(total["robust"], n) if adv_n else None),
        "mean_gamma_clean": ratio(total["gamma_clean_sum"], n) if gamma_ok else None,
        "mean_alpha_clean": ratio(total["alpha_clean_sum"], n),
        "mean_gamma_adv": ratio(total["gamma_adv_sum"], adv_n) if gamma_ok else None,
        "mean_alpha_adv": ratio(total["alpha_adv_sum"], adv_n),
        "model": model_info,
        "kind": "nonlinear" if nonlinear else "mixture",
        # Output-only gradients of a nonlinear composite can be masked (hard max has none): its
        # robust accuracy counts only with the surrogate attack.
        "valid": not model_info.get("unsafe_detach_mixer_inputs", False) and not (
            nonlinear and settings.attacks_to_run and not (extra and extra.surrogate)),
    }


def format_table(summary: dict[str, Any]) -> str:
    """A Markdown table of the reported numbers."""
    rows = [("examples", str(summary["n_examples"])),
            ("threat model", f"{summary['norm']}, eps = {summary['eps']:.5f}"),
            ("clean accuracy", percent(summary["clean_accuracy"]))]
    if summary["autoattack"]:
        rows.append((f"AutoAttack {summary['autoattack_version']} "
                     f"({', '.join(summary['autoattack'])}; "
                     f"{summary['autoattack_iterations']} APGD iterations)",
                     percent(summary["autoattack_robust_accuracy"])))
    if summary["pgd"]:
        rows.append((f"PGD-{summary['pgd']['iterations']} ({summary['pgd']['loss']})",
                     percent(summary["pgd_robust_accuracy"])))
    if summary["adaptive_attack_weight"] is not None:
        rows.append((f"adaptive APGD-CE/T (w = {summary['adaptive_attack_weight']})",
                     percent(summary["adaptive_robust_accuracy"])))
    for name, label in EXTRA_ATTACKS.items():
        value = summary.get(f"{name.removesuffix('_robust')}_robust_accuracy")
        if value is not None:
            rows.append((label, percent(value)))
    if summary.get("square_examples") is not None:
        rows.append((f"Square ({summary['square_queries']} queries; first "
                     f"{summary['square_examples']} images)",
                     percent(summary["square_robust_accuracy"])))
    rows += [("robust accuracy (worst case over attacks)", percent(summary["robust_accuracy"])),
             ("mean gamma clean / attacked", _pair(summary, "gamma", 4)),
             ("mean alpha clean / attacked", _pair(summary, "alpha", 4))]
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    if not summary["valid"]:
        lines.append("\n**NOT VALID**: " + (
            "a nonlinear composite evaluated without the surrogate attack; output-only "
            "gradients can be masked" if summary.get("kind") == "nonlinear" else
            "the mixer's inputs were detached (unsafe_detach_mixer_inputs)")
            + "; robust accuracy is overstated.")
    return "\n".join(lines) + "\n"


def sweep_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The alpha sweep's Markdown table: one row per model, ``{name: summary}``."""
    lines = ["| model | clean | robust (worst case) | mean alpha clean / attacked |",
             "| --- | --- | --- | --- |"]
    for variant, summary in rows.items():
        lines.append(f"| {variant} | {percent(summary['clean_accuracy'])} | "
                     f"{percent(summary['robust_accuracy'])} | "
                     f"{_pair(summary, 'alpha', 3)} |")
    return "\n".join(lines) + "\n"
