"""Figures of an alpha sweep (``run.py --eval --alpha-sweep``): the accuracy-robustness trade-off
and the distribution of alpha on clean vs attacked inputs; and the held-out validation curves of a
mixer training (its TensorBoard folder)."""
from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on these machines
import matplotlib.pyplot as plt  # noqa: E402

from adaptive_smoothing.analysis import fixed_alpha_entries  # noqa: E402
from adaptive_smoothing.persist import write_atomic  # noqa: E402


def _save_figure(fig: "plt.Figure", path: Path) -> None:
    # Through the atomic writer like every output: a full disk keeps the previous image whole.
    # The format is named because a file object has no suffix for matplotlib to go by.
    write_atomic(path, lambda file: fig.savefig(file, dpi=150,
                                                format=Path(path).suffix.lstrip(".") or "png"))


def _attack_label(entry: dict) -> str:
    """What 'robust' means in a sweep: the attacks, their iterations and n."""
    attacks = ", ".join(entry.get("autoattack") or []) or "no attack"
    iterations = entry.get("autoattack_iterations")
    return (f"robust accuracy (%): worst case of {attacks}"
            + (f", {iterations} it." if iterations else "") + "\n(+ the composites' own attacks)")


def plot_tradeoff(sweep: dict, path: Path, title: str = "") -> None:
    """Clean vs robust accuracy with binomial standard-error bars: the fixed-alpha curve, both
    bases, each composite (trained mixer, nonlinear) and its fixed mixture at matched clean
    accuracy."""
    from adaptive_smoothing.analysis import binomial_se

    def point(entry: dict) -> tuple[float, float, float, float]:
        n = int(entry["n_examples"])
        c, r = entry["clean_accuracy"], entry["robust_accuracy"]
        return 100 * c, 100 * r, 100 * binomial_se(c, n), 100 * binomial_se(r, n)

    fixed = [(a, v) for a, v in fixed_alpha_entries(sweep) if v.get("robust_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    if fixed:
        pts = [point(v) for _, v in fixed]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[p[2] for p in pts],
                    yerr=[p[3] for p in pts], fmt="o-", color="tab:gray", capsize=2,
                    label="fixed alpha (linear mixture)")
        # Labels alternate above and below the curve so that close points do not collide.
        # Points that coincide (e.g. alphas 0-0.5, all STD's decisions) share one label.
        labelled: list[tuple[float, float, list[str]]] = []
        for (alpha, _), p in zip(fixed, pts):
            near = next((l for l in labelled if abs(l[0] - p[0]) < 0.6 and abs(l[1] - p[1]) < 0.6),
                        None)
            if near is None:
                labelled.append((p[0], p[1], [f"{alpha:g}"]))
            else:
                near[2].append(f"{alpha:g}")
        for k, (x, y, names) in enumerate(labelled):
            ax.annotate(", ".join(names), (x, y), textcoords="offset points",
                        xytext=(5, 6 if k % 2 == 0 else -12), fontsize=7, color="tab:gray")
    marks = {0.0: ("STD (alpha 0)", "tab:blue"), 1.0: ("ROB (alpha 1)", "tab:green")}
    for alpha, v in fixed:
        if alpha in marks:
            label, color = marks[alpha]
            ax.plot(*point(v)[:2], "s", color=color, markersize=9, label=label)
    kinds = {"adaptive": ("adaptive smoothing (trained mixer)", "tab:red", "*"),
             "nonlinear": ("nonlinear mixing (MixedNUTS)", "tab:purple", "D")}
    for name, (label, color, marker) in kinds.items():
        if name not in sweep:
            continue
        c, r, ce, re = point(sweep[name])
        ax.errorbar(c, r, xerr=ce, yerr=re, fmt=marker, color=color, markersize=11,
                    capsize=3, label=f"{label}: {c:.1f} / {r:.1f}")
        matched = sweep.get(f"matched_{name}")
        if matched is not None and matched.get("robust_accuracy") is not None:
            mc, mr, mce, mre = point(matched)
            ax.errorbar(mc, mr, xerr=mce, yerr=mre, fmt=marker, color=color, mfc="none",
                        markersize=11, capsize=3,
                        label=f"fixed alpha {matched.get('fixed_alpha', float('nan')):.3f} at "
                              f"its clean accuracy: {mc:.1f} / {mr:.1f}")
    reference = next(iter(sweep.values()))
    ax.set_xlabel(f"clean accuracy (%), n = {reference.get('n_examples')} images")
    ax.set_ylabel(_attack_label(reference), fontsize=8)
    ax.set_title(title or "accuracy-robustness trade-off", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_alpha_histogram(batches_dir: Path, path: Path, title: str = "") -> None:
    """Histogram of the adaptive composite's alpha on clean and on attacked inputs."""
    clean, attacked = [], []
    for batch_file in sorted(batches_dir.glob("[0-9]*.json")):
        batch = json.loads(batch_file.read_text())
        clean += batch.get("alpha_clean", [])
        attacked += batch.get("alpha_adv", [])
    if not clean:
        raise ValueError(f"no per-image alphas in {batches_dir}; rerun the evaluation")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    bins = [i / 50 for i in range(51)]
    ax.hist(clean, bins=bins, alpha=0.6, label=f"clean (n={len(clean)})", color="tab:blue")
    if attacked:
        ax.hist(attacked, bins=bins, alpha=0.6, label=f"attacked (n={len(attacked)})",
                color="tab:red")
    ax.set_xlabel("alpha (weight of the robust model)")
    ax.set_ylabel("images")
    ax.set_title(title or "alpha on clean vs attacked inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


# The held-out validation curves of a mixer training (tensorboard tag -> label), in plot order.
VALIDATION_CURVES = {
    "val/auc_adaptive": "detection AUC, adaptive attack",
    "val/auc_fixed": "detection AUC, fixed attack",
    "val/clean_acc": "clean accuracy",
    "val/robust_acc": "robust accuracy (validation attack)",
    "val/det_alpha_clean": "mean alpha, clean",
    "val/det_alpha_adaptive": "mean alpha, adaptive-attacked",
}


def read_validation_curves(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The ``val/*`` scalars of a training's TensorBoard folder as {tag: [(step, value), ...]}.

    A resumed run appends a new event file and may repeat the steps after its last checkpoint;
    the value written last for a step is the one kept, as TensorBoard itself shows it.
    """
    # Imported here: tensorboard's event reader is only needed by this function.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(Path(tensorboard_dir).glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event file in {tensorboard_dir}; expected a "
                                "training's output folder/tensorboard")
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    curves = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("val/"):
            by_step = {e.step: e.value for e in events.Scalars(tag)}
            curves[tag] = sorted(by_step.items())
    if not curves:
        raise ValueError(f"{tensorboard_dir} holds no validation (val/*) scalars yet: the first "
                         "validation comes after training_settings.eval_freq iterations")
    return curves


def plot_validation_curves(curves: dict[str, list[tuple[int, float]]], path: Path,
                           title: str = "") -> None:
    """Detection AUCs (left) and accuracies / mean alphas (right) against the optimizer step."""
    fig, (auc_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for tag, label in VALIDATION_CURVES.items():
        if tag not in curves:
            continue
        steps, values = zip(*curves[tag])
        ax = auc_ax if tag.startswith("val/auc") else acc_ax
        ax.plot(steps, values, "o-", markersize=3, label=label)
    auc_ax.axhline(0.5, color="tab:gray", linestyle=":", linewidth=1)
    auc_ax.set_ylabel("AUC of gamma, clean vs attacked")
    acc_ax.set_ylabel("accuracy / alpha")
    for ax in (auc_ax, acc_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "held-out validation during mixer training")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_calibration(best: Any, margins: dict, path: Path) -> None:
    """The calibration's objective over (s, p) at the chosen c, and ROB's transformed margins
    of its robust points (atk_corr) and the leads of the wrong class over the true one on its
    clean mistakes (cln_incorr), with the cutoff (calibration.label_margins)."""
    import numpy as np

    grid = best.grid
    c_index = grid["c"].index(best.c)
    objective = 100 * np.asarray(grid["objective"])[:, c_index, :]  # (s, p)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    image = left.imshow(objective, origin="lower", aspect="auto", cmap="viridis")
    left.set_xticks(range(len(grid["p"])), [f"{v:.2g}" for v in grid["p"]], fontsize=7)
    left.set_yticks(range(len(grid["s"])), [f"{v:.2g}" for v in grid["s"]], fontsize=7)
    left.set_xlabel("power p")
    left.set_ylabel("scale s")
    left.set_title(f"clean mistakes kept (%) at c = {best.c:.3g}", fontsize=9)
    fig.colorbar(image, ax=left)
    # Log scale: the decisive margins are tiny (the cutoff is about 1 - alpha) and the rest
    # pile up at 1; margins <= 0 (lost points) are counted in the legend instead.
    bins = np.linspace(-8, 0, 65)
    for name, color in (("atk_corr", "tab:green"), ("cln_incorr", "tab:red")):
        values = margins[name].double().cpu().numpy()
        positive = values[values > 0]
        right.hist(np.log10(np.maximum(positive, 1e-8)), bins=bins, alpha=0.6, color=color,
                   label=f"{name} (n = {len(values)}, {len(values) - len(positive)} at or "
                         "below 0)")
    right.axvline(np.log10(max(best.cutoff, 1e-8)), color="black", linestyle="--",
                  label=f"cutoff {best.cutoff:.3g} = (1 - alpha) / alpha")
    right.set_xlabel("log10 of ROB's transformed margin (robust points: at the label; "
                     "mistakes: lead of the wrong class)", fontsize=7)
    right.set_ylabel("images")
    right.set_title(f"s {best.s:.3g}, p {best.p:.3g}, c {best.c:.3g}, alpha {best.alpha:.5f}",
                    fontsize=9)
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
