"""Evaluation of a composite model: clean accuracy, AutoAttack, PGD and the adaptive attack.

The attacked function is always the whole composite in eval mode with scale_alpha on
(docs/METHOD.md, "Evaluation"): AutoAttack sees it through :class:`LogProbClassifier`, our own
attacks through the composite itself (so they also see gamma). Results are persisted per batch
under ``output_dir/batches``: a run that is killed and restarted skips the finished batches, and within a
batch AutoAttack resumes from its own state file.

This module is the engine (attacks, batches, manifest, resumption); the numbers and tables it
writes are report.py's, and the training's quick validation is validation.py's.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from adaptive_smoothing.attacks import PerImageRandom, adaptive_attack, pgd
from adaptive_smoothing.compat import import_autoattack, use_per_image_random_starts
from adaptive_smoothing.config import (MOVED, STANDARD_AUTOATTACK, Config, EvaluationSettings,
                                       ForwardSettings, NonlinearSettings, provenance)
from adaptive_smoothing.errors import UserError
from adaptive_smoothing.models import CompositeModel, LogProbClassifier
from adaptive_smoothing.models.composite import fixed_alpha_composite
from adaptive_smoothing.models.nonlinear import NonlinearComposite, SurrogateGradientClassifier
from adaptive_smoothing.data import build_dataset, load_tensors
from adaptive_smoothing.factory import Composite, build_composite, load_composite_weights
from adaptive_smoothing.fingerprint import tensors_sha256
from adaptive_smoothing.prepare import Run, prepared
# format_table is also read from here (``from adaptive_smoothing.evaluation import ...``).
from adaptive_smoothing.report import COUNTERS, format_table, per_image, summarize, sweep_table
from adaptive_smoothing.persist import BatchStore, write_atomic, write_text_atomic
from adaptive_smoothing.rundir import RunLock
from adaptive_smoothing.runtime import (AutocastModule, barrier,
                                        distributed_rank_world, prepare_model)

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
MANIFEST_FILE = "manifest.json"

# Per-image outcomes kept for paired comparisons (analysis.paired_comparison): 1 = correct.
PER_IMAGE_FILE = "per_image.json"


class EvaluationError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class ExtraAttacks:
    """The attacks beyond AutoAttack, PGD and the adaptive attack that a composite gets, each
    judged on its true output (docs/METHOD.md, "Evaluating a nonlinear composite"):

    - ``surrogate``: APGD-CE/T steered by a nonlinear composite's gradient surrogate (hard max
      has no gradient; a differentiable composite needs none);
    - ``transfer``: APGD-CE/T examples found against ROB alone and against the fixed linear
      mixture of alpha ``linear_alpha``, transferred;
    - Square (gradient-free) with ``square_queries`` on the images of index below
      ``square_examples`` (0: none).
    """

    surrogate: bool
    transfer: bool
    linear_alpha: float
    square_examples: int
    square_queries: int


def extra_attacks(composite: nn.Module,
                  nonlinear: Optional[NonlinearSettings]) -> Optional[ExtraAttacks]:
    """The extra attacks of ``composite`` under ``nonlinear`` (the config's
    ``nonlinear_settings``, whose evaluation keys they are), or None for a composite that gets
    none (the paper's mixing network, a fixed mixture).

    A nonlinear composite gets all of them. A ``rob_logits`` gate's composite (docs/METHOD.md,
    "Mixer inputs") gets the transfer attacks and Square, as checks that its gradient does not
    mislead: its linear mixture has ``nonlinear_settings.surrogate_alpha`` or, where that is
    None, the composite's alpha at the centre of its training gamma (gamma = the evaluation
    bias), alpha_bias + alpha_scale * sigmoid(bias). The gate is differentiable, so its
    gradient attack is the adaptive attack (``evaluation_settings.adaptive_attack``); the
    surrogate attack is for the hard max only.
    """
    if nonlinear is None:
        return None
    if isinstance(composite, NonlinearComposite):
        return ExtraAttacks(nonlinear.surrogate_attack, nonlinear.transfer_attacks,
                            composite.surrogate_alpha, nonlinear.square_examples,
                            nonlinear.square_queries)
    if (isinstance(composite, CompositeModel) and composite.mixer is not None
            and composite.mixer_inputs == "rob_logits"):
        alpha = nonlinear.surrogate_alpha
        if alpha is None:  # alpha at the centre of the evaluated gamma
            centre = composite.eval_gamma[1] if composite.gamma_norm == "batchnorm" else 0.0
            alpha = composite.alpha_bias + composite.alpha_scale / (1 + math.exp(-centre))
        return ExtraAttacks(False, nonlinear.transfer_attacks, float(alpha),
                            nonlinear.square_examples, nonlinear.square_queries)
    return None


def _plan(settings: EvaluationSettings, model_info: dict[str, Any]) -> dict[str, Any]:
    """What must match for finished batches of an earlier run to be reused: the keys of the
    settings and of the model's record declared to affect the results (config/provenance.py),
    the fingerprints, and whatever else the caller put in the record (a sweep's variant)."""
    record = {**provenance.flat(settings.model_dump(), "evaluation_settings."),
              **provenance.flat(model_info)}
    return provenance.restrict(record, "results", Config)


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
    if path.exists():
        old = provenance.migrate(_read_json(path, "evaluation manifest"), MOVED)
        changed = provenance.differences(provenance.restrict(old, "results", Config), plan,
                                         Config)
        if changed:
            diffs = [provenance.describe(k, *v) for k, v in list(changed.items())[:3]]
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


def _read_batch(path: Path) -> dict[str, Any]:
    counters = _read_json(path, "batch result")
    if not isinstance(counters, dict) or any(
            not isinstance(counters.get(k, 0.0), (int, float, type(None))) for k in COUNTERS) or \
            "n" not in counters:
        raise EvaluationError(f"{path}: not a batch result of this project (expected a JSON "
                              f"object with counters {list(COUNTERS)}); delete this file (it "
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


def _extra_attacks(composite: nn.Module, forward: nn.Module, x: torch.Tensor,
                   y: torch.Tensor, settings: EvaluationSettings, extra: ExtraAttacks,
                   *, device: torch.device, dtype: torch.dtype, seed: int,
                   ids: Sequence[int]) -> dict[str, Any]:
    """The attacks that gradient masking cannot fool (docs/METHOD.md, "Evaluating a nonlinear
    composite"), each judged on the true output: {counter name: (B,) bool robust}, and under
    'square' (subset image positions, their robust flags) or None.

    Hard max has no gradient and a saturated ROB map has almost none, so AutoAttack on the
    output alone can miss adversarial examples that exist: the surrogate attack follows the
    gradient of the differentiable linear-mixture surrogate; the transfer attacks carry over
    examples found on ROB alone and on a linear mixture; Square needs no gradient at all. For a
    differentiable composite (the rob_logits gate) the last two check that its gradient does
    not mislead.
    """
    def still_correct(x_adv: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return forward(x_adv).log_probs.argmax(1) == y

    gradient_attacks = ("apgd-ce", "apgd-t")
    out: dict[str, Any] = {}
    if extra.surrogate:
        assert isinstance(composite, NonlinearComposite)
        classifier = AutocastModule(SurrogateGradientClassifier(composite), device, dtype)
        out["surrogate_robust"] = still_correct(_autoattack(
            classifier, x, y, settings, gradient_attacks, device=device, seed=seed,
            random=PerImageRandom(seed, ids, "surrogate")))
    if extra.transfer:
        sources = {"transfer_rob_robust": fixed_alpha_composite(composite, 1.0),
                   "transfer_linear_robust": fixed_alpha_composite(composite,
                                                                   extra.linear_alpha)}
        for name, source in sources.items():
            classifier = AutocastModule(LogProbClassifier(source), device, dtype)
            out[name] = still_correct(_autoattack(
                classifier, x, y, settings, gradient_attacks, device=device, seed=seed,
                random=PerImageRandom(seed, ids, name.removesuffix("_robust"))))
    out["square"] = None
    in_subset = torch.tensor([i < extra.square_examples for i in ids], device=y.device)
    if bool(in_subset.any()):
        positions = in_subset.nonzero().squeeze(1)
        classifier = AutocastModule(LogProbClassifier(composite), device, dtype)
        square_ids = [ids[i] for i in positions.tolist()]
        x_sq = _autoattack(classifier, x[positions], y[positions], settings, ("square",),
                           device=device, seed=seed,
                           random=PerImageRandom(seed, square_ids, "square"),
                           square_queries=extra.square_queries)
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
    those of the last attack run). A nonlinear composite and a rob_logits gate's also get the
    extra attacks of ``nonlinear`` (the config's section; :func:`extra_attacks`), and the robust
    accuracy is the worst case over all.

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
    counters: dict[str, Any] = {k: 0.0 for k in COUNTERS}
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

    extra = extra_attacks(composite, nonlinear)
    if extra is not None:
        for name, attack_robust in _extra_attacks(
                composite, forward, x, y, settings, extra, device=device, dtype=dtype,
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
                         nonlinear=nonlinear)
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
    extra = extra_attacks(composite, nonlinear)
    if extra is not None and not isinstance(composite, NonlinearComposite):
        # A rob_logits gate's extra attacks shape its results. (A nonlinear composite's are in
        # its recorded nonlinear_settings; its manifests stay as they were.)
        model_info["extra_attacks"] = dataclasses.asdict(extra)
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
    summary = summarize(counters, settings, model_info, extra,
                        nonlinear=extra is not None and isinstance(composite, NonlinearComposite))
    if rank != 0:
        return summary
    _atomic_write_json(summary, output_dir / RESULTS_FILE)
    _atomic_write_json(per_image(counters), output_dir / PER_IMAGE_FILE)
    write_text_atomic(output_dir / TABLE_FILE, format_table(summary))
    logger.info("results written to %s", output_dir / RESULTS_FILE)
    return summary


def _load(run: Run) -> tuple[Composite, torch.Tensor, torch.Tensor, torch.dtype,
                              dict[str, Any]]:
    """The run's composite with its weights, the first n_examples test images, and the record
    that identifies the model in the results."""
    settings = run.evaluation
    dtype = run.eval_dtype
    composite = build_composite(run.forward, run.num_classes, run.device, source=run.source,
                                nonlinear=run.nonlinear)
    load_composite_weights(composite, run.checkpoints)
    prepare_model(composite, channels_last=settings.channels_last, compile=settings.compile)
    dataset = build_dataset(run.dataset.name, "test", run.dataset.format, settings.data_dir,
                            augment=False)
    x, y = load_tensors(dataset, settings.n_examples)
    if len(y) < settings.n_examples:
        logger.warning("the test set has %d images, fewer than n_examples = %d: evaluating %d",
                       len(y), settings.n_examples, len(y))
    # Relabelled or other images must not pass for what an earlier run evaluated.
    model_info = dict(run.model_record, fingerprints=dict(run.model_record["fingerprints"],
                                                          data=tensors_sha256(x, y)))
    return composite, x, y, dtype, model_info


def run_evaluation(config: Config, *, overwrite: bool = False) -> Optional[str]:
    """``run.py --eval``: build and load the configured model, evaluate it on the first
    ``n_examples`` test images, write the results, and return the table (None on the processes
    other than rank 0 under torchrun, so that the table is printed once). ``overwrite`` deletes
    an earlier evaluation's results in the output folder first."""
    with prepared(config) as run:
        composite, x, y, dtype, model_info = _load(run)
        summary = evaluate(composite, x, y, _settings_for(composite, run.evaluation),
                           run.output_dir, device=run.device, dtype=dtype,
                           model_info=model_info, overwrite=overwrite, nonlinear=run.nonlinear)
        rank, _ = distributed_rank_world()  # inside: the process group ends with the block
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
    with prepared(config) as run:
        table = _alpha_sweep(run, alphas, overwrite=overwrite, with_composite=with_composite)
        rank, _ = distributed_rank_world()
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


def _alpha_sweep(run: Run, alphas: Sequence[float], *, overwrite: bool = False,
                 with_composite: bool = True) -> str:
    """``run.py --eval --alpha-sweep``: the composite (the trained mixer's, ``adaptive``, or the
    nonlinear one, ``nonlinear``), fixed-alpha mixtures of the same base models (alpha 0 = STD,
    1 = ROB), and the fixed mixture whose clean accuracy on the same images matches the
    composite's (``matched_<name>``), all on the same images and attacks.

    Each model's results go to ``output_dir/<name>/`` (each resumable); the collected summaries
    to ``output_dir/sweep.json``. Returns a table, one row per model. ``with_composite``
    false evaluates the fixed mixtures only (e.g. while the mixer is still being trained).
    """
    composite, x, y, dtype, model_info = _load(run)
    settings, device, output_dir = run.evaluation, run.device, run.output_dir
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
    # Nor does it read what shapes the mixing (declared `mixer` on the schema): a sweep of a
    # composite configured otherwise reuses the fixed mixtures' finished results.
    mixing = provenance.mixer_keys(ForwardSettings)
    fixed_info["forward_settings"] = {k: v for k, v in fixed_info["forward_settings"].items()
                                      if k not in mixing}
    # The adaptive attack's extra term pushes the mixer's gamma; a fixed mixture has no mixer,
    # so there it would only be AutoAttack's cascade again from other random starts. Fixed
    # mixtures get the standard evaluation (AutoAttack, PGD if asked) and the composite all.
    fixed_settings = settings.model_copy(update={"adaptive_attack": False})

    def evaluate_variant(variant: str, model: nn.Module, info: dict[str, Any],
            model_settings: EvaluationSettings) -> dict[str, Any]:
        logger.info("evaluating %s", variant)
        return evaluate(model, x, y, model_settings, output_dir / variant, device=device,
                        dtype=dtype, model_info=dict(info, variant=variant), overwrite=overwrite,
                        nonlinear=run.nonlinear)

    for variant, model in models:
        rows[variant] = evaluate_variant(variant, model, fixed_info, fixed_settings)
    if with_composite:
        rows[name] = evaluate_variant(name, composite, model_info, _settings_for(composite, settings))
        # The comparison that cannot flatter: fixed mixing at the composite's clean accuracy
        # on the same images (cheap to find: clean accuracy only), attacked like the others.
        alpha = matched_alpha(composite, x, y, rows[name]["clean_accuracy"], device=device,
                              dtype=dtype, batch_size=settings.batch_size)
        matched = f"matched_{name}"
        rows[matched] = dict(evaluate_variant(matched, fixed_alpha_composite(composite, alpha),
                                 dict(fixed_info, fixed_alpha=alpha), fixed_settings),
                             fixed_alpha=alpha)
    rank, _ = distributed_rank_world()
    if rank == 0:
        _atomic_write_json(rows, output_dir / "sweep.json")
    return sweep_table(rows)
