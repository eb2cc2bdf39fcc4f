"""The prepared device check (``scripts/gpu_check.sh``): named sub-checks, each writing one JSON
file ``OUT/<name>.json`` with its parameters, the machine, its result or its error, and the time
it took, so that a check that fails or runs out of time loses only itself.

To add a check: write ``def check_<name>(options: CheckOptions) -> dict`` below, add it to
``CHECKS``, and add a line to ``scripts/gpu_check.sh``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from adaptive_smoothing.config import Config, EvaluationSettings, apply_overrides, load_config
from adaptive_smoothing.persist import write_text_atomic
from adaptive_smoothing.runtime import resolve_device
from adaptive_smoothing.tools import precision, speed

logger = logging.getLogger(__name__)

__all__ = ["CHECKS", "CheckOptions", "run_check", "summarize"]


@dataclass(frozen=True)
class CheckOptions:
    """Every sub-check's parameters (each check reads the ones it needs)."""

    config: str = "configs/cifar10_edm.yaml"
    overrides: tuple[tuple[str, Any], ...] = ()
    device: str = "auto"
    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    batch_sizes: tuple[int, ...] = (128, 256, 512, 1024)
    iters: int = 5
    warmup: int = 2
    n_examples: int = 256
    attack_iters: int = 50
    eps: tuple[float, ...] = (0.0, 8 / 255)  # 0: calibrated (about half the points robust)
    logit_spread: float = 4.0
    extra: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        return apply_overrides(load_config(self.config), **dict(self.overrides))


def check_speed(options: CheckOptions) -> dict[str, Any]:
    """Attack steps per second of the config's composite (random weights when its checkpoints
    are absent) at each batch size, in the setting of ``options``."""
    device = resolve_device(options.device)
    config = options.load()
    setting = speed.SpeedSetting(options.precision, options.channels_last, options.compile)
    composite = speed.build_benchmark_composite(config, device)
    flops = speed.flops_per_attack_step(composite, device)
    work = speed.Work.of(config)
    results = []
    for batch in options.batch_sizes:
        try:
            result = speed.measure(composite, work, setting, mode="attack", batch=batch,
                                   iterations=options.iters, warmup=options.warmup,
                                   device=device, flops=flops)
            results.append(result.to_dict())
            logger.info("%s batch %d: %.1f img/s", setting.label, batch, result.images_per_s)
        except torch.OutOfMemoryError as err:
            results.append({"batch_size": batch, "error": f"out of memory: {err}"})
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    best = max((r["images_per_s"] for r in results if "images_per_s" in r), default=None)
    return {"setting": setting.label, "flops_per_image_attack_step": flops,
            "results": results, "best_images_per_s": best}


def _sharpen(composite: Any, x: torch.Tensor, spread: float) -> dict[str, float]:
    """Set the logit scales so that each base model's logits spread by about ``spread`` across
    classes: random-weight heads are nearly flat, which would make any attack succeed at once."""
    scales = {}
    with torch.no_grad():
        for which in ("std", "rob"):
            logits = getattr(composite, f"{which}_model")(x).float()
            scale = spread / max(float(logits.std(dim=1).mean()), 1e-12)
            setattr(composite, f"{which}_scale", scale)
            scales[which] = scale
    return scales


def _calibrate_eps(composite: Any, x: torch.Tensor, y: torch.Tensor,
                   evaluation: EvaluationSettings, options: CheckOptions, device: torch.device,
                   steps: int = 6) -> float:
    """The radius at which fp32 APGD-CE (10 iterations, 64 points) leaves about half of the
    points robust (bisection in log space between 1/1024 and 16/255): at a radius where every
    point or none is robust, any two attacks agree and the comparison would prove nothing."""
    import copy
    import math

    n = min(64, len(y))
    low, high = math.log(1 / 1024), math.log(16 / 255)
    model = copy.deepcopy(composite)
    for _ in range(steps):
        middle = (low + high) / 2
        settings = precision.apgd_ce_settings(evaluation, eps=math.exp(middle),
                                              iterations=min(10, options.attack_iters),
                                              batch_size=n)
        accuracy = precision.robust_accuracy(model, x[:n], y[:n], settings, speed.BASELINE,
                                             device=device)
        low, high = (middle, high) if accuracy > 0.5 else (low, middle)
    eps = math.exp((low + high) / 2)
    logger.info("calibrated eps: %.5f (%.3f/255)", eps, eps * 255)
    return eps


def check_bf16_attack_agreement(options: CheckOptions) -> dict[str, Any]:
    """APGD-CE robust accuracy in fp32 and in the fast path on ``n_examples`` random images of
    a random-weight composite with sharpened heads, labelled by its own clean predictions; the
    two must agree within 1 point at each eps (an eps of 0 is replaced by a calibrated one)."""
    device = resolve_device(options.device)
    config = options.load()
    fast = speed.SpeedSetting(options.precision, options.channels_last, options.compile)
    torch.manual_seed(0)
    composite = speed.build_benchmark_composite(config, device)
    x, _ = speed.random_batch(composite, options.n_examples, device, seed=2)
    scales = _sharpen(composite, x[:64], options.logit_spread)
    with torch.no_grad():
        y = composite(x).log_probs.argmax(1)
    radii = [eps if eps > 0
             else _calibrate_eps(composite, x, y, config.evaluation_settings, options, device)
             for eps in options.eps]
    rows = []
    for eps in radii:
        settings = precision.apgd_ce_settings(
            config.evaluation_settings, eps=eps, iterations=options.attack_iters,
            batch_size=min(options.n_examples, max(options.batch_sizes)))
        results = precision.compare_settings(composite, x, y, settings, (speed.BASELINE, fast),
                                             device=device)
        accuracies = {label: r["robust_accuracy"] for label, r in results.items()}
        difference = accuracies[fast.label] - accuracies[speed.BASELINE.label]
        rows.append({"eps": eps, "robust_accuracy": accuracies,
                     "difference_points": 100 * difference,
                     "within_1_point": abs(difference) <= 0.01})
    return {"n": options.n_examples, "attack": "apgd-ce", "iterations": options.attack_iters,
            "logit_scales": scales, "rows": rows, "ok": all(r["within_1_point"] for r in rows)}


CHECKS: dict[str, Callable[[CheckOptions], dict[str, Any]]] = {
    "speed": check_speed,
    "bf16_attack_agreement": check_bf16_attack_agreement,
}


def run_check(kind: str, name: str, out_dir: Path, options: CheckOptions) -> dict[str, Any]:
    """Run check ``kind`` and write ``out_dir/<name>.json``; errors are recorded, not raised."""
    if kind not in CHECKS:
        raise ValueError(f"unknown check {kind!r}; expected one of {sorted(CHECKS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(options.device)
    record: dict[str, Any] = {"check": kind, "name": name,
                              "options": json.loads(json.dumps(dataclasses.asdict(options),
                                                               default=str)),
                              "machine": speed.machine_info(device)}
    start = time.perf_counter()
    try:
        record["result"] = CHECKS[kind](options)
        record["ok"] = bool(record["result"].get("ok", True))
    except Exception as err:  # noqa: BLE001 (the record must say what went wrong, then go on)
        logger.exception("check %s failed", name)
        record.update(ok=False, error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc())
    record["seconds"] = time.perf_counter() - start
    path = out_dir / f"{name}.json"
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    logger.info("check %s: %s in %.1f s -> %s", name, "ok" if record["ok"] else "FAILED",
                record["seconds"], path)
    return record


def summarize(out_dir: Path, expected: Optional[list[str]] = None) -> dict[str, Any]:
    """One summary of every ``out_dir/*.json`` check record (missing expected ones: timed out or
    killed), written to ``out_dir/summary.json``."""
    records = {}
    for path in sorted(out_dir.glob("*.json")):
        if path.name == "summary.json":
            continue
        data = json.loads(path.read_text())
        records[path.stem] = {"ok": data.get("ok"), "seconds": data.get("seconds"),
                              "error": data.get("error")}
    missing = [name for name in expected or [] if name not in records]
    summary = {"checks": records, "missing": missing,
               "all_ok": bool(records) and not missing and all(r["ok"] for r in records.values())}
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
