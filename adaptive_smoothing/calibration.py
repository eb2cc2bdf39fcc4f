"""Calibrating a composite on held-out images (docs/METHOD.md, "Calibration").

- The nonlinear composite's (s, p, c) and alpha, as the MixedNUTS authors choose them: attack ROB
  alone with a minimum-margin APGD-CE + APGD-T (:func:`min_margin_attack`), keep ROB's logits on
  its attacked points that stay correct ("atk_corr") and on its clean mistakes ("cln_incorr"),
  and search a grid of ROB maps (:func:`grid_search`): for each, the cutoff is the
  (100 - beta) percentile of atk_corr's transformed margins (so that a share beta of ROB's
  robust points keeps its decision) and the objective is the share of cln_incorr whose gap
  clears the cutoff (clean mistakes that STD then cannot fix); alpha = 1 / (1 + cutoff).
  The margins are taken at the label (:func:`label_margins`): a robust point whose transform
  changes ROB's decision counts as lost, and a mistake is unfixable when the wrong class leads
  the true one by the cutoff (the authors take top-1 minus top-2 for both, which is the same
  where the transform keeps ROB's decision and the true class is the runner-up).
- The fixed linear mixture's alpha for a target beta (:func:`linear_alpha`): the same cutoff
  for ROB's plain softmax.
- A trained mixer's alpha range for a target clean accuracy (:func:`mixer_alpha_bias`).

:func:`collect_margin_data` runs the attack batch by batch into a folder, resumably.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from adaptive_smoothing.analysis import probability_margin
from adaptive_smoothing.attacks import Norm, PerImageRandom, apgd
from adaptive_smoothing.config import provenance
from adaptive_smoothing.errors import UserError
from adaptive_smoothing.models.nonlinear import Clamp, rob_map
from adaptive_smoothing.persist import BatchStore, write_text_atomic

logger = logging.getLogger(__name__)


class CalibrationError(UserError, RuntimeError):
    """A calibration that cannot run as asked (overlap with evaluated images, a folder of
    another calibration, no data of a kind)."""


# -- the minimum-margin attack --------------------------------------------------------------------
def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit(y) - max_{j != y} logit(j) per row (negative: misclassified); the same formula as
    the probability margin, on logits."""
    return probability_margin(logits, y)


@dataclass(frozen=True)
class MinMarginResult:
    x_min: torch.Tensor    # each image's lowest-margin point over all runs and iterates
    margin: torch.Tensor   # ROB's logit margin there
    fooled: torch.Tensor   # misclassified at some evaluated point


def min_margin_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                      norm: Norm = "Linf", n_iter: int = 100, n_target: int = 9,
                      generator: Optional[PerImageRandom] = None) -> MinMarginResult:
    """APGD-CE, then APGD-T on each of the ``n_target`` runner-up classes, keeping every image's
    lowest-margin point: at every iterate of every run, not only where an image is
    misclassified, so the images ROB never gets wrong end at their hardest point found.

    An image once misclassified leaves the later runs (it is no robust point; only those are
    calibrated on). ``model`` returns logits; its mode and autocast are the caller's.
    """
    x = x.detach()
    with torch.no_grad():
        logits = model(x).float()
    margin = logit_margin(logits, y)
    x_min = x.clone()
    fooled = margin < 0

    runs = [("ce", 0)] + [("dlr_targeted", rank) for rank in range(2, n_target + 2)]
    for loss, rank in runs:
        idx = (~fooled).nonzero().squeeze(1)
        if idx.numel() == 0 or rank > logits.shape[1]:
            break
        y_target = None
        if loss == "dlr_targeted":
            with torch.no_grad():
                y_target = model(x[idx]).float().sort(dim=1)[1][:, -rank]

        def keep_lowest(x_it: torch.Tensor, logits_it: torch.Tensor,
                        idx: torch.Tensor = idx) -> None:
            m = logit_margin(logits_it.float(), y[idx])
            lower = m < margin[idx]
            margin[idx] = torch.where(lower, m, margin[idx])
            x_min[idx] = torch.where(lower.view(-1, 1, 1, 1), x_it.detach(), x_min[idx])

        result = apgd(model, x[idx], y[idx], eps, norm=norm, n_iter=n_iter, loss=loss,
                      y_target=y_target, return_adversarial=True,
                      generator=generator.subset(idx.cpu()) if generator is not None else None,
                      on_iterate=keep_lowest)
        fooled[idx] |= result.fooled
    return MinMarginResult(x_min, margin, fooled | (margin < 0))


# -- the cached data, resumable per batch ---------------------------------------------------------
@dataclass(frozen=True)
class MarginData:
    """ROB's logits on its robust points at their lowest-margin attacked iterate (atk_corr) and
    on its clean mistakes (cln_incorr), with their labels, over ``n`` held-out images."""

    atk_corr: torch.Tensor
    atk_labels: torch.Tensor
    cln_incorr: torch.Tensor
    cln_labels: torch.Tensor
    n: int
    clean_correct: int

    @property
    def robust(self) -> int:
        return len(self.atk_corr)


MANIFEST = "manifest.json"


def _read_batch(path: Path) -> dict[str, torch.Tensor]:
    try:
        batch = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CalibrationError(f"{path}: unreadable calibration batch ({err}); delete it (it is "
                               "recomputed)") from None
    if not isinstance(batch, dict) or not {"clean", "attacked", "y", "fooled"} <= set(batch):
        raise CalibrationError(f"{path}: not a calibration batch of this project (expected "
                               "clean, attacked, y, fooled); delete it (it is recomputed)")
    return batch


def _check_manifest(folder: Path, plan: dict[str, Any]) -> None:
    path = folder / MANIFEST
    new = provenance.flat(json.loads(json.dumps(plan)))
    if path.exists():
        changed = provenance.differences(provenance.flat(json.loads(path.read_text())), new)
        if changed:
            raise CalibrationError(
                f"{folder} holds the attack of another calibration (changed: "
                f"{'; '.join(provenance.describe(k, *v) for k, v in changed.items())}); choose "
                "another --output-dir or delete its batches/")
        return
    write_text_atomic(path, json.dumps(plan, indent=2, sort_keys=True))


def collect_margin_data(rob: nn.Module, x: torch.Tensor, y: torch.Tensor, image_ids: Sequence[int],
                        folder: Path, *, eps: float, norm: Norm, n_iter: int, n_target: int,
                        batch_size: int, seed: int, identity: dict[str, Any],
                        device: torch.device) -> MarginData:
    """Run :func:`min_margin_attack` on ROB batch by batch into ``folder/batches`` (a killed run
    resumes at the first unfinished batch) and gather the calibration data. ``identity`` (the
    ROB checkpoint's fingerprint, the images) must match the folder's manifest."""
    plan = {"eps": eps, "norm": norm, "n_iter": n_iter, "n_target": n_target, "seed": seed,
            "batch_size": batch_size, "n_images": len(y), **identity}
    folder.mkdir(parents=True, exist_ok=True)
    _check_manifest(folder, plan)
    store = BatchStore(folder / "batches", ".pt", read=_read_batch,
                       write=lambda value, file: torch.save(value, file))
    starts = range(0, len(y), batch_size)
    batches = []
    reused = 0
    for index, start in enumerate(tqdm(starts, desc="min-margin attack on ROB", unit="batch")):
        batch = store.load(index)
        if batch is None:
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            ids = list(image_ids[start:start + batch_size])
            result = min_margin_attack(rob, xb, yb, eps, norm=norm, n_iter=n_iter,
                                       n_target=n_target,
                                       generator=PerImageRandom(seed, ids, "min_margin"))
            with torch.no_grad():
                batch = {"clean": rob(xb).float().cpu(), "attacked": rob(result.x_min).float().cpu(),
                         "y": yb.cpu(), "fooled": result.fooled.cpu()}
            store.save(index, batch)
        else:
            reused += 1
        batches.append(batch)
    if reused:
        logger.info("reused %d finished attack batch(es) of %s", reused, folder)
    clean = torch.cat([b["clean"] for b in batches])
    attacked = torch.cat([b["attacked"] for b in batches])
    labels = torch.cat([b["y"] for b in batches])
    fooled = torch.cat([b["fooled"] for b in batches])
    correct = clean.argmax(1) == labels
    # A robust point: correct on the clean image and at every attacked iterate (the kept one
    # included, which is checked again here on the stored logits).
    robust = correct & ~fooled & (attacked.argmax(1) == labels)
    return MarginData(atk_corr=attacked[robust].double(), atk_labels=labels[robust],
                      cln_incorr=clean[~correct].double(), cln_labels=labels[~correct],
                      n=len(labels), clean_correct=int(correct.sum()))


# -- choosing the constants -----------------------------------------------------------------------
def label_margins(logits: torch.Tensor, labels: torch.Tensor, **transform: Any) -> torch.Tensor:
    """q(y) - max_{j != y} q(j) for q = softmax(T(logits)) (``transform``: the arguments of
    ``rob_map``): ROB's transformed margin at the label, negative where it is wrong. The
    mixture keeps a robust point whatever STD says iff it is >= (1 - alpha) / alpha, and STD
    can fix a mistake iff minus it is < (1 - alpha) / alpha."""
    return probability_margin(torch.softmax(rob_map(logits, **transform), dim=1), labels)


def raw_label_margins(logits: torch.Tensor, labels: torch.Tensor,
                      rob_scale: float = 1.0) -> torch.Tensor:
    """The same margins for the linear mixture's ROB term, softmax(s_rob * h)."""
    return probability_margin(torch.softmax(logits * rob_scale, dim=1), labels)


# The smallest cutoff (about 1 - alpha) accepted: far above float32's resolution (6e-8) of the
# log-probabilities, so that STD's share of the mixture survives in the output.
MIN_CUTOFF = 1e-4


def _cutoff(margins: torch.Tensor, beta: float) -> float:
    # numpy's percentile (linear interpolation), as the authors compute it.
    return float(np.percentile(margins.cpu().numpy(), 100.0 - beta))


def _check_data(data: MarginData) -> None:
    if data.robust == 0:
        raise CalibrationError("ROB has no robust point on the calibration images (every one "
                               "was misclassified clean or under attack): nothing to keep")


@dataclass(frozen=True)
class GridResult:
    s: float
    p: float
    c: float
    alpha: float
    cutoff: float
    objective: float                  # share of cln_incorr with margin >= cutoff
    grid: dict[str, Any]              # s, p, c values; objective[s][c][p], cutoff[s][c][p]

    def record(self) -> dict[str, Any]:
        return {"s": self.s, "p": self.p, "c": self.c, "alpha": self.alpha,
                "cutoff": self.cutoff, "objective": self.objective, "grid": self.grid}


def default_grid(data: MarginData, size: int = 8, *, k: Optional[int] = None
                 ) -> tuple[list[float], list[float], list[float]]:
    """(s, p, c) values: s log-spaced in [0.1, 10], p linear in [1, 6], c linear from minus the
    median of the layer-normalised top logit (the shift that centres a typical winner at the
    clamp's knee) to 0: the region where the published constants lie for 10 and 100 classes."""
    logits = torch.cat([data.atk_corr, data.cln_incorr])
    top = logits if k is None or k >= logits.shape[1] else logits.topk(k, dim=1).values
    z_top = ((logits.max(1).values - top.mean(1)) / (top.var(1) + 1e-8).sqrt())
    c_low = -float(z_top.median())
    return (np.logspace(-1, 1, size).tolist(), np.linspace(1, 6, size).tolist(),
            np.linspace(c_low, 0.0, size).tolist())


def grid_search(data: MarginData, beta: float, *, s_values: Sequence[float],
                p_values: Sequence[float], c_values: Sequence[float], clamp: Clamp = "gelu",
                k: Optional[int] = None) -> GridResult:
    """The ROB map on the grid that minimises the share of clean mistakes kept while a share
    ``beta`` (in percent) of the robust points keeps ROB's decision; ties go to the smallest
    cutoff (the largest 1 - alpha, numerically the safest). Points whose cutoff is below
    ``MIN_CUTOFF`` are not considered: there STD's weight 1 - alpha is lost to float32
    round-off of the output, so STD could not decide anything."""
    _check_data(data)
    if not 0 < beta <= 100:
        raise CalibrationError(f"beta must lie in (0, 100] (a percentage), got {beta}")
    shape = (len(s_values), len(c_values), len(p_values))
    objective, cutoffs = np.empty(shape), np.empty(shape)
    for i, s in enumerate(s_values):
        for j, c in enumerate(c_values):
            for m, p in enumerate(p_values):
                transform = {"s": s, "p": p, "c": c, "clamp": clamp, "k": k}
                cutoff = _cutoff(label_margins(data.atk_corr, data.atk_labels, **transform), beta)
                cutoffs[i, j, m] = cutoff
                # A cutoff of 1 (every kept margin saturated) would make the objective 0 by
                # round-off: the authors cap it just below 1.
                cutoff = min(cutoff, 1 - 1e-9)
                gaps = -label_margins(data.cln_incorr, data.cln_labels, **transform)
                objective[i, j, m] = float((gaps >= cutoff).double().mean()) if len(gaps) else 0.0
    feasible = [ix for ix in np.ndindex(*shape) if cutoffs[ix] >= MIN_CUTOFF]
    if not feasible:
        raise CalibrationError(f"every (s, p, c) of the grid gives a cutoff below {MIN_CUTOFF} "
                               "(ROB's transformed margins all but vanish); widen --s-range "
                               "upwards")
    best = min(feasible, key=lambda ix: (objective[ix], cutoffs[ix]))
    i, j, m = best
    return GridResult(s=float(s_values[i]), p=float(p_values[m]), c=float(c_values[j]),
                      alpha=1.0 / (1.0 + float(cutoffs[best])), cutoff=float(cutoffs[best]),
                      objective=float(objective[best]),
                      grid={"s": list(map(float, s_values)), "p": list(map(float, p_values)),
                            "c": list(map(float, c_values)), "axes": ["s", "c", "p"],
                            "objective": objective.tolist(), "cutoff": cutoffs.tolist()})


def linear_alpha(data: MarginData, beta: float, rob_scale: float = 1.0) -> float:
    """The fixed linear mixture's alpha that keeps ROB's decision on a share ``beta`` (percent)
    of its robust points: 1 / (1 + cutoff) for the margins of softmax(s_rob * h)."""
    _check_data(data)
    return 1.0 / (1.0 + _cutoff(raw_label_margins(data.atk_corr, data.atk_labels, rob_scale),
                                beta))


def margin_summary(values: torch.Tensor) -> dict[str, float]:
    if len(values) == 0:
        return {}
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=values.dtype)
    return {f"q{int(100 * a)}": float(v) for a, v in zip(q, torch.quantile(values, q))}


# -- a trained mixer's alpha range ----------------------------------------------------------------
def mixer_alpha_bias(clean_accuracy_at: Callable[[float], float], target: float, *,
                     low: float, high: float, iterations: int = 20) -> float:
    """The alpha_bias in [low, high] at which the composite's clean accuracy (a function of the
    bias; it falls as more weight goes to ROB) is closest to ``target``, by bisection."""
    accuracy = {b: clean_accuracy_at(b) for b in (low, high)}
    lo, hi = low, high
    for _ in range(iterations):
        mid = (lo + hi) / 2
        accuracy[mid] = clean_accuracy_at(mid)
        if accuracy[mid] > target:
            lo = mid
        else:
            hi = mid
    return min(accuracy, key=lambda b: (abs(accuracy[b] - target), b))


def held_out_ids(start: int, n: int, available: int, evaluated: int) -> list[int]:
    """Test-image indices start..start+n-1, refused where they overlap the evaluated ones
    (0..evaluated-1) or run past the set."""
    if start < evaluated:
        raise CalibrationError(
            f"calibration images start at test index {start}, inside the {evaluated} images an "
            f"evaluation reports (evaluation_settings.n_examples); choose --start >= {evaluated} "
            "(e.g. training_settings.val_start) or --split train")
    if start + n > available:
        raise CalibrationError(f"images {start}..{start + n - 1} asked for, but the split has "
                               f"{available}; lower --n-images or --start")
    return list(range(start, start + n))




# -- the command ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationOptions:
    """What ``scripts/calibrate.py`` asks for (its flags, documented there and in the README)."""

    output_dir: Path
    n_images: int = 2000
    start: Optional[int] = None        # first test index; None = training_settings.val_start
    split: str = "test"
    beta: float = 98.5
    surrogate_beta: float = 95.0
    grid_size: int = 8
    s_range: Optional[tuple[float, float]] = None
    p_range: Optional[tuple[float, float]] = None
    c_range: Optional[tuple[float, float]] = None
    clamp: Clamp = "gelu"
    k: Optional[int] = None
    n_iter: int = 100
    n_target: int = 9
    batch_size: int = 250
    target_clean_accuracy: Optional[float] = None
    write_config: Optional[Path] = None


def _grid(options: CalibrationOptions, data: MarginData) -> tuple[list[float], list[float],
                                                                   list[float]]:
    s_values, p_values, c_values = default_grid(data, options.grid_size, k=options.k)
    size = options.grid_size
    if options.s_range:
        s_values = np.logspace(*np.log10(options.s_range), size).tolist()
    if options.p_range:
        p_values = np.linspace(*options.p_range, size).tolist()
    if options.c_range:
        c_values = np.linspace(*options.c_range, size).tolist()
    if options.clamp == "none":  # no clamp: the shift only moves every logit alike
        c_values = [0.0]
    return s_values, p_values, c_values


def run_calibration(config: Any, options: CalibrationOptions) -> dict[str, Any]:
    """Calibrate the composite of ``config`` (a validated Config) on held-out images; writes
    ``calibration.json``, ``calibration.png`` and (for the nonlinear composite) a config ready
    to evaluate into ``options.output_dir``; returns the record."""
    import yaml

    from adaptive_smoothing.config import config_to_dict
    from adaptive_smoothing.data import build_dataset, load_tensors
    from adaptive_smoothing.factory import build_composite, load_composite_weights
    from adaptive_smoothing.fingerprint import tensors_sha256
    from adaptive_smoothing.plots import plot_calibration
    from adaptive_smoothing.prepare import prepare
    from adaptive_smoothing.rundir import RunLock

    # The config itself is read for the config this writes; the model from the prepared run.
    run = prepare(config)
    device, ds = run.device, run.dataset
    composite = build_composite(run.forward, ds.num_classes, device, source=run.source)
    load_composite_weights(composite, run.checkpoints)
    composite.eval()
    dataset = build_dataset(ds.name, options.split, ds.format, ds.path, augment=False)
    start = config.training_settings.val_start if options.start is None else options.start
    if options.split == "test":
        ids = held_out_ids(start, options.n_images, len(dataset),
                           config.evaluation_settings.n_examples)
    else:
        ids = held_out_ids(start, options.n_images, len(dataset), 0)
    x_all, y_all = load_tensors(dataset, ids[-1] + 1)
    x, y = x_all[ids[0]:], y_all[ids[0]:]

    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(output_dir)
    lock.acquire()
    try:
        identity = {"rob_checkpoint": run.fingerprints["rob"],
                    "images": tensors_sha256(x, y), "split": options.split, "first_id": ids[0]}
        data = collect_margin_data(
            composite.rob_model, x, y, ids, output_dir, eps=config.evaluation_settings.eps,
            norm=config.evaluation_settings.norm, n_iter=options.n_iter,
            n_target=options.n_target, batch_size=options.batch_size, seed=config.seed,
            identity=identity, device=device)
        logger.info("ROB on %d held-out images: clean %.4f, robust %.4f (min-margin APGD-CE + "
                    "APGD-T, %d iterations); %d robust points, %d clean mistakes", data.n,
                    data.clean_correct / data.n, data.robust / data.n, options.n_iter,
                    data.robust, len(data.cln_incorr))
        s_values, p_values, c_values = _grid(options, data)
        best = grid_search(data, options.beta, s_values=s_values, p_values=p_values,
                           c_values=c_values, clamp=options.clamp, k=options.k)
        rob_scale = config.forward_settings.rob_model_scale
        surrogate_alpha = linear_alpha(data, options.surrogate_beta, rob_scale)
        transform = {"s": best.s, "p": best.p, "c": best.c, "clamp": options.clamp,
                     "k": options.k}
        # Robust points: their margin at the label; mistakes: by how much the wrong class leads.
        transformed = {"atk_corr": label_margins(data.atk_corr, data.atk_labels, **transform),
                       "cln_incorr": -label_margins(data.cln_incorr, data.cln_labels,
                                                    **transform)}
        raw = {"atk_corr": raw_label_margins(data.atk_corr, data.atk_labels, rob_scale),
               "cln_incorr": -raw_label_margins(data.cln_incorr, data.cln_labels, rob_scale)}
        record: dict[str, Any] = {
            "images": {"split": options.split, "first": ids[0], "last": ids[-1],
                       "n": data.n},
            "attack": {"kind": "min-margin APGD-CE + APGD-T on ROB", "iterations": options.n_iter,
                       "targets": options.n_target, "norm": config.evaluation_settings.norm,
                       "eps": config.evaluation_settings.eps},
            "rob_clean_accuracy": data.clean_correct / data.n,
            "rob_robust_accuracy": data.robust / data.n,
            "n_atk_corr": data.robust, "n_cln_incorr": len(data.cln_incorr),
            "beta": options.beta, "clamp": options.clamp, "k": options.k,
            "nonlinear": best.record(),
            "linear_alpha": {"beta": options.beta,
                             "alpha": linear_alpha(data, options.beta, rob_scale)},
            "surrogate_alpha": {"beta": options.surrogate_beta, "alpha": surrogate_alpha},
            "margins": {"definition": "atk_corr: q(y) - max_{j != y} q(j); cln_incorr: "
                                      "max_{j != y} q(j) - q(y); q = ROB's (transformed) softmax",
                        "transformed": {k: margin_summary(v) for k, v in transformed.items()},
                        "raw_softmax": {k: margin_summary(v) for k, v in raw.items()}},
        }
        if options.target_clean_accuracy is not None:
            record["mixer_alpha_range"] = _calibrate_mixer(composite, x, y, options, device)
        plot_calibration(best, transformed, output_dir / "calibration.png")
        if options.write_config is not None:
            tree = config_to_dict(config)
            tree["nonlinear_settings"] = dict(
                tree["nonlinear_settings"], enabled=True, s=best.s, p=best.p, c=best.c,
                clamp=options.clamp, k=options.k, alpha=best.alpha,
                surrogate_alpha=surrogate_alpha)
            header = (f"# Written by scripts/calibrate.py from {config.source}: the nonlinear "
                      f"composite calibrated on {options.split} images {ids[0]}..{ids[-1]} "
                      f"(beta {options.beta}); record in {output_dir / 'calibration.json'}.\n")
            write_text_atomic(options.write_config,
                              header + yaml.safe_dump(tree, sort_keys=False))
            record["config"] = str(options.write_config)
        write_text_atomic(output_dir / "calibration.json", json.dumps(record, indent=2))
    finally:
        lock.release()
    return record


def _calibrate_mixer(composite: Any, x: torch.Tensor, y: torch.Tensor,
                     options: CalibrationOptions, device: torch.device) -> dict[str, float]:
    """The trained mixer's alpha_bias (its range's top end kept) for the target clean accuracy
    on the held-out images."""
    if getattr(composite, "mixer", None) is None:
        raise CalibrationError("--target-clean-accuracy calibrates a trained mixer's alpha "
                               "range, but the config has no mixing network (use_policy false)")
    top = composite.alpha_bias + composite.alpha_scale
    accuracies: dict[float, float] = {}

    def accuracy(bias: float) -> float:
        composite.alpha_bias, composite.alpha_scale = bias, top - bias
        correct = 0
        with torch.no_grad():
            for start in range(0, len(y), options.batch_size):
                xb = x[start:start + options.batch_size].to(device)
                yb = y[start:start + options.batch_size].to(device)
                correct += int((composite(xb).log_probs.argmax(1) == yb).sum())
        accuracies[bias] = correct / len(y)
        return accuracies[bias]

    original = (composite.alpha_bias, composite.alpha_scale)
    try:
        bias = mixer_alpha_bias(accuracy, options.target_clean_accuracy, low=0.0, high=top)
    finally:
        composite.alpha_bias, composite.alpha_scale = original
    return {"alpha_bias": bias, "alpha_scale": top - bias, "clean_accuracy": accuracies[bias],
            "target_clean_accuracy": options.target_clean_accuracy}
