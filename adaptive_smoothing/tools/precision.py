"""The one comparison of an attack across speed settings: clean and robust accuracy of a
composite on the same points in fp32 and in faster settings (bf16 or fp16 autocast,
channels_last, torch.compile), attacked by the evaluation's own batch code (pyautoattack's
APGD through ``evaluation.evaluate_batch``, as every evaluation runs it).

Used by the device check's ``bf16_attack_agreement`` (``gpu_check.py``), the GPU-readiness
``precision`` check (``readiness.py``) and ``tests/test_attack_strength.py``: a lower precision
may only be used for evaluations if it finds what fp32 finds.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Sequence

import torch

from adaptive_smoothing.config import EvaluationSettings
from adaptive_smoothing.models import CompositeModel
from adaptive_smoothing.runtime import prepare_model, resolve_precision
from adaptive_smoothing.tools.speed import SpeedSetting

logger = logging.getLogger(__name__)

__all__ = ["apgd_ce_settings", "accuracies", "compare_settings", "robust_accuracy"]


def apgd_ce_settings(evaluation: EvaluationSettings, *, eps: float, iterations: int,
                     batch_size: int) -> EvaluationSettings:
    """``evaluation`` reduced to AutoAttack's APGD-CE alone at Linf ``eps``: no PGD, no
    adaptive attack (the attack the comparisons run)."""
    return evaluation.model_copy(update=dict(
        attacks_to_run=("apgd-ce",), norm="Linf", eps=eps, autoattack_iterations=iterations,
        pgd=False, adaptive_attack=False, batch_size=batch_size))


def accuracies(composite: CompositeModel, x: torch.Tensor, y: torch.Tensor,
               settings: EvaluationSettings, setting: SpeedSetting, *, device: torch.device,
               seed: int = 0) -> dict[str, float]:
    """Clean and robust accuracy of ``composite`` on (x, y) under ``settings`` (attacks,
    iterations, eps, batch size), through the evaluation's own batch code in the precision and
    memory format of ``setting``. ``composite`` is modified (channels_last, compile)."""
    from adaptive_smoothing.evaluation import evaluate_batch

    model = prepare_model(composite, channels_last=setting.channels_last, compile=setting.compile)
    dtype = resolve_precision(setting.precision, device)
    clean = robust = 0
    for start in range(0, len(y), settings.batch_size):
        counters, _ = evaluate_batch(model, x[start:start + settings.batch_size],
                                     y[start:start + settings.batch_size], settings,
                                     device=device, dtype=dtype, seed=seed + start)
        clean += counters["clean_correct"]
        robust += counters["robust"]
    return {"clean_accuracy": clean / len(y), "robust_accuracy": robust / len(y)}


def robust_accuracy(composite: CompositeModel, x: torch.Tensor, y: torch.Tensor,
                    settings: EvaluationSettings, setting: SpeedSetting, *,
                    device: torch.device, seed: int = 0) -> float:
    """The robust accuracy of :func:`accuracies`."""
    return accuracies(composite, x, y, settings, setting, device=device,
                      seed=seed)["robust_accuracy"]


def compare_settings(composite: CompositeModel, x: torch.Tensor, y: torch.Tensor,
                     settings: EvaluationSettings, compared: Sequence[SpeedSetting], *,
                     device: torch.device, seed: int = 0) -> dict[str, dict[str, Any]]:
    """:func:`accuracies` in each of ``compared`` on a fresh copy of ``composite`` (so that
    one setting's channels_last or compile does not reach the next), with the seconds each
    took, keyed by the setting's label. The same points and random starts in every setting."""
    results: dict[str, dict[str, Any]] = {}
    for setting in compared:
        start = time.perf_counter()
        result: dict[str, Any] = accuracies(copy.deepcopy(composite), x, y, settings, setting,
                                            device=device, seed=seed)
        result["seconds"] = time.perf_counter() - start
        logger.info("eps %.4f, %s: robust accuracy %.4f (%.1f s)", settings.eps, setting.label,
                    result["robust_accuracy"], result["seconds"])
        results[setting.label] = result
    return results
