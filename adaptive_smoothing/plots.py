"""Figures of an alpha sweep (``run.py --eval --alpha-sweep``): the accuracy-robustness trade-off
and the distribution of alpha on clean vs attacked inputs; and the held-out validation curves of a
mixer training (its TensorBoard folder)."""
from __future__ import annotations

import json
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


def plot_tradeoff(sweep: dict, path: Path, title: str = "") -> None:
    """Clean vs robust accuracy: the fixed-alpha curve, both bases and the adaptive composite."""
    fixed = fixed_alpha_entries(sweep)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([100 * v["clean_accuracy"] for _, v in fixed],
            [100 * v["robust_accuracy"] for _, v in fixed], "o-", color="tab:gray",
            label="fixed alpha (mixture)")
    for alpha, v in fixed:
        ax.annotate(f"{alpha:g}", (100 * v["clean_accuracy"], 100 * v["robust_accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8, color="tab:gray")
    marks = {0.0: ("STD (alpha 0)", "tab:blue", "s"), 1.0: ("ROB (alpha 1)", "tab:green", "s")}
    for alpha, v in fixed:
        if alpha in marks:
            label, color, marker = marks[alpha]
            ax.plot(100 * v["clean_accuracy"], 100 * v["robust_accuracy"], marker, color=color,
                    markersize=9, label=label)
    if "adaptive" in sweep:
        v = sweep["adaptive"]
        ax.plot(100 * v["clean_accuracy"], 100 * v["robust_accuracy"], "*", color="tab:red",
                markersize=15, label="adaptive smoothing")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title or "accuracy-robustness trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
