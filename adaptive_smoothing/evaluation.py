"""Evaluation of a composite model: clean accuracy, AutoAttack, PGD and the adaptive attack.

The attacked function is always the whole composite in eval mode with scale_alpha on
(docs/METHOD.md, "Evaluation"): AutoAttack sees it through :class:`LogProbClassifier`, our own
attacks through the composite itself (so they also see gamma). Results are persisted per batch
under ``output_dir/batches``: a run that is killed and restarted skips the finished batches, and within a
batch AutoAttack resumes from its own state file.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

import torch.distributed as dist

from adaptive_smoothing.attacks import Norm, PerImageRandom, adaptive_attack, apgd_cascade, pgd
from adaptive_smoothing.compat import import_autoattack, use_per_image_random_starts
from adaptive_smoothing.config import STANDARD_AUTOATTACK, EvaluationSettings, NonlinearSettings
from adaptive_smoothing.errors import UserError
from adaptive_smoothing.models import CompositeModel, LogProbClassifier
from adaptive_smoothing.models.composite import fixed_alpha_composite
from adaptive_smoothing.models.nonlinear import NonlinearComposite, SurrogateGradientClassifier
from adaptive_smoothing.config import Config
from adaptive_smoothing.data import build_dataset, load_tensors
from adaptive_smoothing.factory import (Composite, build_composite, checkpoint_paths,
                                        load_composite_weights, require_checkpoint_files)
from adaptive_smoothing.losses import AttackLossName
from adaptive_smoothing.fingerprint import optional_file_sha256, tensors_sha256
from adaptive_smoothing.persist import BatchStore, write_atomic, write_text_atomic
from adaptive_smoothing.rundir import RunLock
from adaptive_smoothing.runtime import (AutocastModule, autocast_context, barrier,
                                        distributed_rank_world, distributed_session,
                                        init_distributed, prepare_model, resolve_precision)

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
MANIFEST_FILE = "manifest.json"

# Per-batch counters; every reported number is a ratio of two of these sums.
_COUNTERS = ("n", "clean_correct", "autoattack_robust", "pgd_robust", "adaptive_robust",
             "robust", "gamma_clean_sum", "alpha_clean_sum", "gamma_adv_sum", "alpha_adv_sum",
             "adv_n", "gamma_nonfinite", "surrogate_robust", "transfer_rob_robust",
             "transfer_linear_robust", "square_robust", "square_n")
# The nonlinear composite's extra attacks (docs/METHOD.md, "Evaluating a nonlinear composite"):
# counter -> what the table calls it.
_NONLINEAR_ATTACKS = {
    "surrogate_robust": "APGD-CE/T steered by the surrogate's gradient",
    "transfer_rob_robust": "APGD-CE/T examples of ROB alone, transferred",
    "transfer_linear_robust": "APGD-CE/T examples of the linear mixture, transferred",
}
# Per-image outcomes kept for paired comparisons (analysis.paired_comparison): 1 = correct.
PER_IMAGE_FILE = "per_image.json"


class EvaluationError(UserError, RuntimeError):
    pass


def _plan(settings: EvaluationSettings, model_info: dict[str, Any]) -> dict[str, Any]:
    """What must match for finished batches of an earlier run to be reused."""
    fields = settings.model_dump()
    # Where and how fast it runs does not change results (beyond float rounding).
    for key in ("data_dir", "channels_last", "compile"):
        fields.pop(key, None)
    return {"settings": fields, "model": model_info}


def _strict(obj: Any) -> Any:
    """``obj`` with every NaN/Infinity float replaced by None: JSON has no such numbers, and a
    bare ``NaN`` in results.json breaks strict readers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _atomic_write_json(obj: Any, path: Path) -> None:
    write_text_atomic(path, _json_text(obj))


def _json_text(obj: Any) -> str:
    return json.dumps(_strict(obj), indent=2, sort_keys=True, allow_nan=False)


# What a difference in a manifest entry means, for the refusal message.
_FINGERPRINT_NAMES = {"std": "the STD checkpoint's content", "rob": "the ROB checkpoint's content",
                      "comp": "the mixer checkpoint's content",
                      "data": "the evaluated images or labels"}
# Everything a run writes into its folder; --overwrite deletes exactly these.
_RESULT_ENTRIES = ("batches", "adversarial", MANIFEST_FILE, RESULTS_FILE, TABLE_FILE,
                   PER_IMAGE_FILE)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise EvaluationError(f"{path}: unreadable {what} ({err}); delete this file (it is "
                              "recomputed), or rerun with --overwrite to start over") from None


def _check_manifest(output_dir: Path, plan: dict[str, Any]) -> None:
    path = output_dir / MANIFEST_FILE
    new = json.loads(json.dumps(plan))
    if path.exists():
        old = _read_json(path, "evaluation manifest")
        if old != new:
            diffs = _first_differences(old, new)
            raise EvaluationError(
                f"{output_dir} holds results of a different evaluation ({'; '.join(diffs)}), so "
                "its finished batches cannot be reused; choose a new --output-dir, or rerun "
                "with --overwrite to delete them and start over")
        return
    if (output_dir / "batches").is_dir() and any((output_dir / "batches").glob("*.json")):
        raise EvaluationError(
            f"{output_dir} holds batch results without a {MANIFEST_FILE} (from an older "
            "version or another tool), so what produced them is unknown; choose a new "
            "--output-dir, or rerun with --overwrite to delete them and start over")
    _atomic_write_json(plan, path)


def clear_results(output_dir: Path) -> None:
    """Delete the results an earlier evaluation wrote into ``output_dir`` (``--overwrite``)."""
    import shutil

    for name in _RESULT_ENTRIES:
        entry = output_dir / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()


def _first_differences(old: Any, new: Any, prefix: str = "", limit: int = 3) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _first_differences(old.get(key), new.get(key), f"{prefix}{key}.", limit)
            if len(out) >= limit:
                break
        return out[:limit]
    if old == new:
        return []
    key = prefix.rstrip(".")
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] == "fingerprints" and parts[-1] in _FINGERPRINT_NAMES:
        short = [v[:12] if isinstance(v, str) else v for v in (old, new)]
        return [f"{_FINGERPRINT_NAMES[parts[-1]]} changed (sha256 {short[0]} -> {short[1]})"]
    return [f"{key}: was {old!r}, now {new!r}"]


def _read_batch(path: Path) -> dict[str, Any]:
    counters = _read_json(path, "batch result")
    if not isinstance(counters, dict) or any(
            not isinstance(counters.get(k, 0.0), (int, float, type(None))) for k in _COUNTERS) or \
            "n" not in counters:
        raise EvaluationError(f"{path}: not a batch result of this project (expected a JSON "
                              f"object with counters {list(_COUNTERS)}); delete this file (it "
                              "is recomputed), or rerun with --overwrite to start over")
    return counters


def _wait_for_files(paths: Sequence[Path], poll_seconds: float = 1.0,
                    report_seconds: float = 600.0) -> None:
    """Wait until every file exists (other processes write them atomically).

    The rendezvous at the end of a sharded evaluation: a process that finished its batches can
    wait here for hours (one more batch of full AutoAttack, or a resume where its own batches
    were already done) without a collective, which NCCL's watchdog would abort after its timeout
    (10 minutes by default). A process that dies makes torchrun stop the others.
    """
    waited = 0.0
    while True:
        missing = [path for path in paths if not path.exists()]
        if not missing:
            return
        if waited >= report_seconds:
            logger.info("waiting for %d batch result(s) of other processes, e.g. %s",
                        len(missing), missing[0])
            waited = 0.0
        time.sleep(poll_seconds)
        waited += poll_seconds


def _mixing_stats(composite: CompositeModel, x: torch.Tensor,
                  model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predictions, gamma, alpha) of the composite on x (no grad)."""
    with torch.no_grad():
        out = model(x)
    return out.log_probs.argmax(1), out.gamma.float(), out.alpha.float()


def _check_outputs_finite(log_probs: torch.Tensor, where: str) -> None:
    """Refuse to report numbers computed from NaN/Inf outputs (e.g. NaN mixer or Inf base
    weights), which would otherwise show up as a plausible-looking accuracy."""
    bad = torch.isnan(log_probs).any(1) | torch.isposinf(log_probs).any(1) | \
        ~torch.isfinite(log_probs).any(1)
    if bool(bad.any()):
        raise EvaluationError(
            f"the model's outputs on the clean images of {where} are not finite (NaN or Inf for "
            f"{int(bad.sum())} of {len(bad)} images), so no accuracy can be reported; check the "
            "checkpoints (a NaN/Inf weight, e.g. from a diverged training) and the precision")


def _sum_finite(values: torch.Tensor) -> tuple[float, int]:
    finite = torch.isfinite(values)
    return float(values[finite].sum()), int((~finite).sum())


def _use_standard_parameters(adversary: Any, apgd_iterations: int) -> None:
    """Give every attack of a custom list the parameters of AutoAttack's standard version,
    taken from pyautoattack itself (its ``_set_version('standard')``: one restart of APGD and
    FAB, 9 target classes, Square's 5,000 queries), and ``apgd_iterations`` APGD iterations.

    pyautoattack's 'custom' version otherwise keeps its constructor defaults (5 restarts of
    APGD and FAB), which is neither the standard evaluation nor what a subset of it should mean.
    """
    attacks = list(adversary.attacks_to_run)
    adversary._set_version("standard")  # pyautoattack 0.2.0's name; it resets the attack list
    adversary.attacks_to_run = attacks
    adversary.apgd.n_iter = apgd_iterations
    adversary.apgd_targeted.n_iter = apgd_iterations


def _autoattack(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                settings: EvaluationSettings, attacks: Sequence[str], *, device: torch.device,
                random: PerImageRandom, seed: int, square_queries: int = 5000) -> torch.Tensor:
    """pyautoattack's AutoAttack (``attacks``, standard parameters, per-image random starts)
    on ``classifier``; returns its adversarial images (x where it found none)."""
    pyautoattack = import_autoattack()
    standard = set(attacks) == set(STANDARD_AUTOATTACK)
    adversary = pyautoattack.AutoAttack(
        classifier, norm=settings.norm, eps=settings.eps, seed=seed, device=device,
        version="standard" if standard else "custom", attacks=None if standard else list(attacks))
    _use_standard_parameters(adversary, settings.autoattack_iterations)
    adversary.square.n_queries = square_queries
    use_per_image_random_starts(adversary, random, x)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(y))
    return x_adv.to(device)


def _nonlinear_attacks(composite: NonlinearComposite, forward: nn.Module, x: torch.Tensor,
                       y: torch.Tensor, settings: EvaluationSettings, nonlinear: NonlinearSettings,
                       *, device: torch.device, dtype: torch.dtype, seed: int,
                       ids: Sequence[int]) -> dict[str, Any]:
    """The attacks that gradient masking cannot fool (docs/METHOD.md, "Evaluating a nonlinear
    composite"), each judged on the true output: {counter name: (B,) bool robust}, and under
    'square' (subset image positions, their robust flags) or None.

    Hard max has no gradient and a saturated ROB map has almost none, so AutoAttack on the
    output alone can miss adversarial examples that exist: the surrogate attack follows the
    gradient of the differentiable linear-mixture surrogate; the transfer attacks carry over
    examples found on ROB alone and on that linear mixture; Square needs no gradient at all.
    """
    def still_correct(x_adv: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return forward(x_adv).log_probs.argmax(1) == y

    gradient_attacks = ("apgd-ce", "apgd-t")
    out: dict[str, Any] = {}
    if nonlinear.surrogate_attack:
        classifier = AutocastModule(SurrogateGradientClassifier(composite), device, dtype)
        out["surrogate_robust"] = still_correct(_autoattack(
            classifier, x, y, settings, gradient_attacks, device=device, seed=seed,
            random=PerImageRandom(seed, ids, "surrogate")))
    if nonlinear.transfer_attacks:
        sources = {"transfer_rob_robust": fixed_alpha_composite(composite, 1.0),
                   "transfer_linear_robust": fixed_alpha_composite(composite,
                                                                   composite.surrogate_alpha)}
        for name, source in sources.items():
            classifier = AutocastModule(LogProbClassifier(source), device, dtype)
            out[name] = still_correct(_autoattack(
                classifier, x, y, settings, gradient_attacks, device=device, seed=seed,
                random=PerImageRandom(seed, ids, name.removesuffix("_robust"))))
    out["square"] = None
    in_subset = torch.tensor([i < nonlinear.square_examples for i in ids], device=y.device)
    if bool(in_subset.any()):
        positions = in_subset.nonzero().squeeze(1)
        classifier = AutocastModule(LogProbClassifier(composite), device, dtype)
        square_ids = [ids[i] for i in positions.tolist()]
        x_sq = _autoattack(classifier, x[positions], y[positions], settings, ("square",),
                           device=device, seed=seed,
                           random=PerImageRandom(seed, square_ids, "square"),
                           square_queries=nonlinear.square_queries)
        with torch.no_grad():
            robust_sq = forward(x_sq).log_probs.argmax(1) == y[positions]
        out["square"] = (positions, robust_sq)
    return out


def evaluate_batch(composite: Composite, x: torch.Tensor, y: torch.Tensor,
                   settings: EvaluationSettings, *, device: torch.device, dtype: torch.dtype,
                   seed: int = 0, image_ids: Optional[Sequence[int]] = None,
                   where: str = "this batch", nonlinear: Optional[NonlinearSettings] = None
                   ) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """Evaluate one batch; returns its counters and the adversarial images (AutoAttack's, else
    those of the last attack run). A nonlinear composite also gets the attacks of
    ``nonlinear`` (its config section), and its robust accuracy is the worst case over all.

    Every random start is drawn per image from ``(seed, image_ids[i])`` (default: positions in
    this batch), so an image's result does not depend on the batch it is evaluated in.
    ``where`` names the batch in error messages.
    """
    ids = list(range(len(y))) if image_ids is None else [int(i) for i in image_ids]
    composite.eval()  # scale_alpha on: the published evaluation behaviour
    forward = AutocastModule(composite, device, dtype)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        clean_out = forward(x)
    _check_outputs_finite(clean_out.log_probs, where)
    pred, gamma, alpha = (clean_out.log_probs.argmax(1), clean_out.gamma.float(),
                          clean_out.alpha.float())
    clean_correct = pred == y
    robust = clean_correct.clone()
    counters: dict[str, Any] = {k: 0.0 for k in _COUNTERS}
    counters["n"] = len(y)
    counters["clean_correct"] = int(clean_correct.sum())
    counters["gamma_clean_sum"], nonfinite = _sum_finite(gamma)
    counters["alpha_clean_sum"] = float(alpha.sum())
    # Per-image alphas, for histograms of clean vs attacked (scripts/plot_results.py).
    counters["alpha_clean"] = alpha.cpu().tolist()
    x_adv_report: Optional[torch.Tensor] = None

    per_image: dict[str, list[int]] = {"clean": clean_correct.int().cpu().tolist()}
    if settings.attacks_to_run:
        classifier = AutocastModule(LogProbClassifier(composite), device, dtype)
        x_adv_report = _autoattack(classifier, x, y, settings, settings.attacks_to_run,
                                   device=device, random=PerImageRandom(seed, ids, "autoattack"),
                                   seed=seed)
        pred_aa, gamma_adv, alpha_adv = _mixing_stats(composite, x_adv_report, forward)
        aa_robust = pred_aa == y
        counters["autoattack_robust"] = int(aa_robust.sum())
        per_image["autoattack"] = aa_robust.int().cpu().tolist()
        robust &= aa_robust

    if settings.pgd:
        result = pgd(forward, x, y, settings.eps, norm=settings.norm, n_iter=settings.pgd_iters,
                     step_size=settings.pgd_step_size,
                     loss="ce" if settings.pgd_loss == "comp" else settings.pgd_loss,
                     bce_weight=settings.adaptive_attack_weight if settings.pgd_loss == "comp"
                     else 0.0, generator=PerImageRandom(seed, ids, "pgd"))
        pred_pgd, _, _ = _mixing_stats(composite, result.x_adv, forward)
        pgd_robust = clean_correct & (pred_pgd == y)
        counters["pgd_robust"] = int(pgd_robust.sum())
        robust &= pgd_robust
        x_adv_report = x_adv_report if x_adv_report is not None else result.x_adv

    if settings.adaptive_attack:
        result = adaptive_attack(forward, x, y, settings.eps, norm=settings.norm,
                                 n_iter=settings.adaptive_attack_iterations,
                                 bce_weight=settings.adaptive_attack_weight,
                                 generator=PerImageRandom(seed, ids, "adaptive"))
        counters["adaptive_robust"] = int(result.robust.sum())
        robust &= result.robust
        x_adv_report = x_adv_report if x_adv_report is not None else result.x_adv

    if isinstance(composite, NonlinearComposite) and nonlinear is not None:
        for name, attack_robust in _nonlinear_attacks(
                composite, forward, x, y, settings, nonlinear, device=device, dtype=dtype,
                seed=seed, ids=ids).items():
            if name == "square":  # a subset: -1 marks the images Square did not attack
                flags = [-1] * len(y)
                if attack_robust is not None:
                    positions, square_robust = attack_robust
                    counters["square_n"] = len(positions)
                    counters["square_robust"] = int(square_robust.sum())
                    robust[positions] &= square_robust
                    for i, r in zip(positions.tolist(), square_robust.tolist()):
                        flags[i] = int(r)
                per_image["square"] = flags
                continue
            counters[name] = int(attack_robust.sum())
            per_image[name.removesuffix("_robust")] = attack_robust.int().cpu().tolist()
            robust &= attack_robust

    counters["robust"] = int(robust.sum())
    per_image["robust"] = robust.int().cpu().tolist()
    counters["per_image"] = per_image
    if x_adv_report is not None:
        if not settings.attacks_to_run:  # the stats of AutoAttack's images are already there
            _, gamma_adv, alpha_adv = _mixing_stats(composite, x_adv_report, forward)
        counters["gamma_adv_sum"], nonfinite_adv = _sum_finite(gamma_adv)
        counters["alpha_adv_sum"] = float(alpha_adv.sum())
        counters["alpha_adv"] = alpha_adv.cpu().tolist()
        counters["adv_n"] = len(y)
        nonfinite += nonfinite_adv
    counters["gamma_nonfinite"] = nonfinite
    return counters, x_adv_report


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


def _per_image(counters: Sequence[dict[str, Any]]) -> dict[str, Any]:
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


def _ran(nonlinear: Optional[NonlinearSettings], name: str) -> bool:
    """Whether a nonlinear composite's extra attack ``name`` (a counter) was run."""
    if nonlinear is None:
        return False
    return {"surrogate_robust": nonlinear.surrogate_attack,
            "transfer_rob_robust": nonlinear.transfer_attacks,
            "transfer_linear_robust": nonlinear.transfer_attacks,
            "square": nonlinear.square_examples > 0}[name]


def summarize(counters: Iterable[dict[str, float]], settings: EvaluationSettings,
              model_info: dict[str, Any],
              nonlinear: Optional[NonlinearSettings] = None) -> dict[str, Any]:
    """Aggregate per-batch counters into the reported numbers (``nonlinear``: the section of a
    nonlinear composite, whose extra attacks are then reported)."""
    total = {k: 0.0 for k in _COUNTERS}
    for batch in counters:
        for k in _COUNTERS:
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
            ratio(total[name], n) if _ran(nonlinear, name) else None)
           for name in _NONLINEAR_ATTACKS},
        "square_examples": int(total["square_n"]) if _ran(nonlinear, "square") else None,
        "square_queries": nonlinear.square_queries if _ran(nonlinear, "square") else None,
        "square_robust_accuracy": (ratio(total["square_robust"], total["square_n"])
                                   if _ran(nonlinear, "square") else None),
        "robust_accuracy": (ratio(total["robust"], n) if adv_n else None),
        "mean_gamma_clean": ratio(total["gamma_clean_sum"], n) if gamma_ok else None,
        "mean_alpha_clean": ratio(total["alpha_clean_sum"], n),
        "mean_gamma_adv": ratio(total["gamma_adv_sum"], adv_n) if gamma_ok else None,
        "mean_alpha_adv": ratio(total["alpha_adv_sum"], adv_n),
        "model": model_info,
        "kind": "nonlinear" if nonlinear is not None else "mixture",
        # Output-only gradients of a nonlinear composite can be masked (hard max has none): its
        # robust accuracy counts only with the surrogate attack.
        "valid": not model_info.get("unsafe_detach_mixer_inputs", False) and not (
            nonlinear is not None and settings.attacks_to_run and not nonlinear.surrogate_attack),
    }


def format_table(summary: dict[str, Any]) -> str:
    """A Markdown table of the reported numbers."""
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    def num(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.4f}"

    rows = [("examples", str(summary["n_examples"])),
            ("threat model", f"{summary['norm']}, eps = {summary['eps']:.5f}"),
            ("clean accuracy", pct(summary["clean_accuracy"]))]
    if summary["autoattack"]:
        rows.append((f"AutoAttack {summary['autoattack_version']} "
                     f"({', '.join(summary['autoattack'])}; "
                     f"{summary['autoattack_iterations']} APGD iterations)",
                     pct(summary["autoattack_robust_accuracy"])))
    if summary["pgd"]:
        rows.append((f"PGD-{summary['pgd']['iterations']} ({summary['pgd']['loss']})",
                     pct(summary["pgd_robust_accuracy"])))
    if summary["adaptive_attack_weight"] is not None:
        rows.append((f"adaptive APGD-CE/T (w = {summary['adaptive_attack_weight']})",
                     pct(summary["adaptive_robust_accuracy"])))
    for name, label in _NONLINEAR_ATTACKS.items():
        value = summary.get(f"{name.removesuffix('_robust')}_robust_accuracy")
        if value is not None:
            rows.append((label, pct(value)))
    if summary.get("square_examples") is not None:
        rows.append((f"Square ({summary['square_queries']} queries; first "
                     f"{summary['square_examples']} images)", pct(summary["square_robust_accuracy"])))
    rows += [("robust accuracy (worst case over attacks)", pct(summary["robust_accuracy"])),
             ("mean gamma clean / attacked",
              f"{num(summary['mean_gamma_clean'])} / {num(summary['mean_gamma_adv'])}"),
             ("mean alpha clean / attacked",
              f"{num(summary['mean_alpha_clean'])} / {num(summary['mean_alpha_adv'])}")]
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    if not summary["valid"]:
        lines.append("\n**NOT VALID**: " + (
            "a nonlinear composite evaluated without the surrogate attack; output-only "
            "gradients can be masked" if summary.get("kind") == "nonlinear" else
            "the mixer's inputs were detached (unsafe_detach_mixer_inputs)")
            + "; robust accuracy is overstated.")
    return "\n".join(lines) + "\n"


def evaluate(composite: Composite, x_all: torch.Tensor, y_all: torch.Tensor,
             settings: EvaluationSettings, output_dir: Path, *, device: torch.device,
             dtype: torch.dtype = torch.float32,
             model_info: Optional[dict[str, Any]] = None,
             overwrite: bool = False,
             nonlinear: Optional[NonlinearSettings] = None) -> dict[str, Any]:
    """Evaluate on ``x_all, y_all`` (already the first n examples), batch by batch, resumably.

    Under torchrun each process takes every world_size-th batch; rank 0 then aggregates the
    batch files. Writes ``output_dir/results.json`` and ``results.md`` and returns the summary.
    Finished batches of an earlier run are reused only when its manifest (settings, model and
    the fingerprints in ``model_info``) is identical; ``overwrite`` deletes them first. The
    folder is locked for the run's life (one run per folder).
    """
    rank, _ = distributed_rank_world()
    lock = RunLock(output_dir) if rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _evaluate(composite, x_all, y_all, settings, output_dir, device=device,
                         dtype=dtype, model_info=model_info, overwrite=overwrite,
                         nonlinear=nonlinear if isinstance(composite, NonlinearComposite)
                         else None)
    finally:
        if lock is not None:
            lock.release()


def _evaluate(composite: Composite, x_all: torch.Tensor, y_all: torch.Tensor,
              settings: EvaluationSettings, output_dir: Path, *, device: torch.device,
              dtype: torch.dtype, model_info: Optional[dict[str, Any]],
              overwrite: bool, nonlinear: Optional[NonlinearSettings]) -> dict[str, Any]:
    if composite.unsafe_detach_mixer_inputs:
        logger.warning("the mixer's inputs are detached: this evaluation is NOT VALID "
                       "(gradient attacks cannot see the mixing network)")
    model_info = dict(model_info or {})
    model_info["unsafe_detach_mixer_inputs"] = composite.unsafe_detach_mixer_inputs
    rank, world_size = distributed_rank_world()
    batches_dir = output_dir / "batches"
    if rank == 0:
        if overwrite:
            clear_results(output_dir)
        batches_dir.mkdir(parents=True, exist_ok=True)
        _check_manifest(output_dir, _plan(settings, model_info))
        if settings.save_adversarial:
            (output_dir / "adversarial").mkdir(exist_ok=True)
    barrier()

    n = len(y_all)
    starts = list(range(0, n, settings.batch_size))
    mine = [(i, s) for i, s in enumerate(starts) if i % world_size == rank]
    batches = BatchStore(batches_dir, ".json", read=_read_batch,
                         write=lambda value, file: file.write(_json_text(value).encode()))
    counters: list[dict[str, float]] = []
    finished = [i for i, _ in mine if batches.path(i).exists()]
    if finished:  # say so: a resumed run's numbers partly come from an earlier process
        logger.info("%s: resuming, reusing %d of %d finished batches from an earlier run; "
                    "evaluating the other %d", output_dir, len(finished), len(mine),
                    len(mine) - len(finished))
    bar = tqdm(mine, desc="evaluating", unit="batch", disable=rank != 0)
    for index, start in bar:
        batch_counters = batches.load(index)
        if batch_counters is None:
            end = min(start + settings.batch_size, n)
            batch_counters, x_adv = evaluate_batch(
                composite, x_all[start:end], y_all[start:end], settings, device=device,
                dtype=dtype, seed=settings.seed, image_ids=range(start, end),
                where=f"batch {index} (images {start}..{end - 1})", nonlinear=nonlinear)
            if settings.save_adversarial and x_adv is not None:
                adversarial = x_adv.cpu()
                write_atomic(output_dir / "adversarial" / f"{index:05d}.pt",
                             lambda file: torch.save(adversarial, file))
            batch_counters.update(start=start, end=end)
            batches.save(index, batch_counters)
        counters.append(batch_counters)
        seen = sum(c["n"] for c in counters)
        postfix = {"clean": f"{sum(c['clean_correct'] for c in counters) / seen:.3f}"}
        if counters[-1].get("adv_n"):
            postfix["robust"] = f"{sum(c['robust'] for c in counters) / seen:.3f}"
        bar.set_postfix(postfix)

    if world_size > 1:
        batch_files = [batches.path(i) for i in range(len(starts))]
        _wait_for_files(batch_files)
        counters = [_read_batch(path) for path in batch_files]
    summary = summarize(counters, settings, model_info, nonlinear)
    if rank != 0:
        return summary
    _atomic_write_json(summary, output_dir / RESULTS_FILE)
    _atomic_write_json(_per_image(counters), output_dir / PER_IMAGE_FILE)
    write_text_atomic(output_dir / TABLE_FILE, format_table(summary))
    logger.info("results written to %s", output_dir / RESULTS_FILE)
    return summary


def _prepare(config: Config) -> tuple[Composite, torch.Tensor, torch.Tensor,
                                      torch.device, torch.dtype, dict[str, Any]]:
    """The configured composite with its weights, the first n_examples test images, and what
    identifies the model in the results."""
    settings = config.evaluation_settings
    _, _, device = init_distributed(config.run.device)
    dtype = resolve_precision(settings.precision, device)
    require_checkpoint_files(config)
    composite = build_composite(config.forward_settings,
                                config.dataset_settings.num_classes, device, source=config.source,
                                nonlinear=config.nonlinear_settings)
    load_composite_weights(composite, config)
    prepare_model(composite, channels_last=settings.channels_last, compile=settings.compile)
    data = config.dataset_settings
    dataset = build_dataset(data.name, "test", data.format, settings.data_dir, augment=False)
    x, y = load_tensors(dataset, settings.n_examples)
    if len(y) < settings.n_examples:
        logger.warning("the test set has %d images, fewer than n_examples = %d: evaluating %d",
                       len(y), settings.n_examples, len(y))
    # Contents, not paths: a checkpoint replaced at the same path, or relabelled data, must
    # not pass for what an earlier run into the same folder evaluated.
    fingerprints = {which: optional_file_sha256(path)
                    for which, path in checkpoint_paths(config).items()}
    fingerprints["data"] = tensors_sha256(x, y)
    forward = config.forward_settings.model_dump()
    if not any(str(forward[f"{which}_model_type"]).startswith("robustbench:")
               for which in ("std", "rob")):
        # Read only for a RobustBench zoo base; absent otherwise, so that the manifests of
        # evaluations made before the key existed still match.
        forward.pop("robustbench_model_dir", None)
    model_info = {"forward_settings": forward,
                  "model_load_path": config.model_load_path.model_dump(),
                  "dataset": data.name, "fingerprints": fingerprints}
    if config.nonlinear_settings.enabled:  # absent otherwise, so earlier manifests still match
        model_info["nonlinear_settings"] = config.nonlinear_settings.model_dump()
    return composite, x, y, device, dtype, json.loads(json.dumps(model_info, default=str))


def run_evaluation(config: Config, *, overwrite: bool = False) -> Optional[str]:
    """``run.py --eval``: build and load the configured model, evaluate it on the first
    ``n_examples`` test images, write the results, and return the table (None on the processes
    other than rank 0 under torchrun, so that the table is printed once). ``overwrite`` deletes
    an earlier evaluation's results in the output folder first."""
    with distributed_session(config.run.device) as (rank, _, _):
        composite, x, y, device, dtype, model_info = _prepare(config)
        settings = config.evaluation_settings
        summary = evaluate(composite, x, y, _settings_for(composite, settings),
                           Path(config.run.output_dir), device=device, dtype=dtype,
                           model_info=model_info, overwrite=overwrite,
                           nonlinear=config.nonlinear_settings)
    return format_table(summary) if rank == 0 else None


def _settings_for(composite: Composite, settings: EvaluationSettings) -> EvaluationSettings:
    """A model without a mixer has no gamma for the adaptive attack's extra term to push; there
    it would only repeat AutoAttack's cascade from other random starts, so it is not run."""
    if settings.adaptive_attack and composite.mixer is None:
        logger.info("no adaptive attack: the model has no mixing network for its BCE(gamma) "
                    "term to push (a nonlinear composite gets its surrogate, transfer and Square "
                    "attacks instead)")
        return settings.model_copy(update={"adaptive_attack": False})
    return settings


def run_alpha_sweep(config: Config, alphas: Sequence[float], *, overwrite: bool = False,
                    with_composite: bool = True) -> Optional[str]:
    """See :func:`_alpha_sweep`; the process group (torchrun) lasts for the sweep."""
    bad = [a for a in alphas if not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0)]
    if bad:
        raise EvaluationError(f"--alpha-sweep: {bad[0]!r} is outside [0, 1]; alpha is ROB's "
                              "weight in the mixture (0 = STD only, 1 = ROB only)")
    with distributed_session(config.run.device) as (rank, _, _):
        table = _alpha_sweep(config, alphas, overwrite=overwrite,
                             with_composite=with_composite)
    return table if rank == 0 else None


def matched_alpha(composite: Composite, x: torch.Tensor, y: torch.Tensor, target: float, *,
                  device: torch.device, dtype: torch.dtype, batch_size: int = 500,
                  grid: int = 1000, iterations: int = 30) -> float:
    """The largest fixed alpha whose mixture of the composite's base models has clean accuracy
    at least ``target`` on (x, y): the most robust fixed mixture that is as accurate as the
    composite (robust accuracy grows with alpha), so the comparison cannot flatter the
    composite. Clean accuracy is not monotone in alpha on a finite set, so a scan of ``grid``
    alphas finds the last one that qualifies and bisection refines it towards the next.
    Each base model runs once: the mixtures are formed from their cached log-probabilities."""
    fixed = fixed_alpha_composite(composite, 0.5)
    forward = AutocastModule(fixed.std_model, device, dtype), AutocastModule(fixed.rob_model,
                                                                             device, dtype)
    logs: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb = x[start:start + batch_size].to(device)
            for out, model, scale in zip(logs, forward, (fixed.std_scale, fixed.rob_scale)):
                out.append(torch.log_softmax(model(xb).float() * scale, 1).double().cpu())
    std_log, rob_log = torch.cat(logs[0]), torch.cat(logs[1])
    labels = y.cpu()

    def accuracy(alpha: float) -> float:
        if alpha <= 0 or alpha >= 1:
            pred = (std_log if alpha <= 0 else rob_log).argmax(1)
        else:
            pred = torch.logaddexp(math.log1p(-alpha) + std_log,
                                   math.log(alpha) + rob_log).argmax(1)
        return float((pred == labels).double().mean())

    alphas = [i / grid for i in range(grid + 1)]
    good = [a for a in alphas if accuracy(a) >= target]
    if not good:  # more accurate than every fixed mixture: the most accurate one is closest
        best = max(accuracy(a) for a in alphas)
        return max(a for a in alphas if accuracy(a) == best)
    low = max(good)
    if low >= 1.0:
        return 1.0
    high = low + 1 / grid  # accuracy below target here
    for _ in range(iterations):
        mid = (low + high) / 2
        if accuracy(mid) >= target:
            low = mid
        else:
            high = mid
    logger.info("fixed alpha %.6f matches clean accuracy %.4f (target %.4f)", low,
                accuracy(low), target)
    return low


def _alpha_sweep(config: Config, alphas: Sequence[float], *, overwrite: bool = False,
                 with_composite: bool = True) -> str:
    """``run.py --eval --alpha-sweep``: the composite (the trained mixer's, ``adaptive``, or the
    nonlinear one, ``nonlinear``), fixed-alpha mixtures of the same base models (alpha 0 = STD,
    1 = ROB), and the fixed mixture whose clean accuracy on the same images matches the
    composite's (``matched_<name>``), all on the same images and attacks.

    Each model's results go to ``output_dir/<name>/`` (each resumable); the collected summaries
    to ``output_dir/sweep.json``. Returns a table, one row per model. ``with_composite``
    false evaluates the fixed mixtures only (e.g. while the mixer is still being trained).
    """
    composite, x, y, device, dtype, model_info = _prepare(config)
    settings = config.evaluation_settings
    output_dir = Path(config.run.output_dir)
    name = "nonlinear" if isinstance(composite, NonlinearComposite) else "adaptive"
    # The fixed mixtures first: an interrupted sweep then already holds the controls, which a
    # sweep of a later mixer reuses.
    models = [(f"alpha_{alpha:.3f}", fixed_alpha_composite(composite, alpha))
              for alpha in alphas]
    rows = {}
    # A fixed-alpha mixture uses neither the mixer nor the nonlinear map, so its finished
    # results stay valid when those change: a sweep of a newly trained mixer reuses them.
    fixed_info = dict(model_info, model_load_path=dict(model_info["model_load_path"], comp=None),
                      fingerprints=dict(model_info["fingerprints"], comp=None))
    fixed_info.pop("nonlinear_settings", None)
    # The adaptive attack's extra term pushes the mixer's gamma; a fixed mixture has no mixer,
    # so there it would only be AutoAttack's cascade again from other random starts. Fixed
    # mixtures get the standard evaluation (AutoAttack, PGD if asked) and the composite all.
    fixed_settings = settings.model_copy(update={"adaptive_attack": False})

    def run(variant: str, model: nn.Module, info: dict[str, Any],
            model_settings: EvaluationSettings) -> dict[str, Any]:
        logger.info("evaluating %s", variant)
        return evaluate(model, x, y, model_settings, output_dir / variant, device=device,
                        dtype=dtype, model_info=dict(info, variant=variant), overwrite=overwrite,
                        nonlinear=config.nonlinear_settings)

    for variant, model in models:
        rows[variant] = run(variant, model, fixed_info, fixed_settings)
    if with_composite:
        rows[name] = run(name, composite, model_info, _settings_for(composite, settings))
        # The comparison that cannot flatter: fixed mixing at the composite's clean accuracy
        # on the same images (cheap to find: clean accuracy only), attacked like the others.
        alpha = matched_alpha(composite, x, y, rows[name]["clean_accuracy"], device=device,
                              dtype=dtype, batch_size=settings.batch_size)
        matched = f"matched_{name}"
        rows[matched] = dict(run(matched, fixed_alpha_composite(composite, alpha),
                                 dict(fixed_info, fixed_alpha=alpha), fixed_settings),
                             fixed_alpha=alpha)
    rank, _ = distributed_rank_world()
    if rank == 0:
        _atomic_write_json(rows, output_dir / "sweep.json")
    lines = ["| model | clean | robust (worst case) | mean alpha clean / attacked |",
             "| --- | --- | --- | --- |"]
    def percent(value: Optional[float]) -> str:  # None: no attack was run
        return "-" if value is None else f"{100 * value:.2f}%"

    def mean(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    for variant, summary in rows.items():
        lines.append(f"| {variant} | {percent(summary['clean_accuracy'])} | "
                     f"{percent(summary['robust_accuracy'])} | "
                     f"{mean(summary['mean_alpha_clean'])} / {mean(summary['mean_alpha_adv'])} |")
    return "\n".join(lines) + "\n"
