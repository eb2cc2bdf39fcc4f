"""Speed measurement of a config's composite (``scripts/benchmark.py``, ``scripts/gpu_check.sh``).

Three workloads, each timed after a warm-up:

- ``attack``: one attack step = forward of the whole composite (mixer included, eval mode, as
  the evaluation's attacks see it) + cross-entropy + backward to the input;
- ``train``: one training iteration of the mixer at the config's attack settings (the randomized
  APGD attacks, then forward/backward of the buffer's mini-batches and an AdamW step);
- ``eval``: the standard AutoAttack pipeline (``evaluation.evaluate_batch``) on ``n`` images.

Inputs are random images with the composite's own clean predictions as labels, so the composite
is measured without data and, when its checkpoints are absent, without weights (random weights:
the speed of the published architectures does not depend on them). Reported: images per second
(clean images for ``train``), peak memory (CUDA: peak allocated; CPU: the process's peak RSS so
far), FLOPs per image of one attack step (``torch.utils.flop_counter``: convolutions and matrix
products, forward + backward) and the TFLOP/s that implies.

``--compare`` (``compare``) times the fp32 NCHW eager baseline and the fast path on separate
copies of the model in the same process, alternating rounds, so that machine load affects both.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F

from adaptive_smoothing.config import (CompLossParams, Config, ConfigError, EvaluationSettings,
                                       RandomizedAttackSettings)
from adaptive_smoothing.models import CompositeModel
from adaptive_smoothing.persist import write_text_atomic
from adaptive_smoothing.runtime import (autocast_context, native_bf16, prepare_model,
                                        resolve_precision)

logger = logging.getLogger(__name__)

Mode = Literal["attack", "train", "eval"]  # the CLI's --mode choices (tools/cli/benchmark.py)

__all__ = ["BASELINE", "Mode", "SpeedResult", "SpeedSetting", "Work", "append_record",
           "build_benchmark_composite",
           "compare", "flops_per_attack_step", "format_record", "machine_info", "measure",
           "random_batch", "run_benchmark"]


@dataclass(frozen=True)
class SpeedSetting:
    """How the model runs: autocast precision, memory format, torch.compile."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        parts = [self.precision, "channels_last" if self.channels_last else "NCHW"]
        return " + ".join(parts + (["compile"] if self.compile else ["eager"]))


BASELINE = SpeedSetting()


@dataclass(frozen=True)
class Work:
    """What the timed units need besides the model: the training attacks and loss (``train``:
    one mixer training iteration) and the evaluation settings (``eval``)."""

    attack: RandomizedAttackSettings
    loss: CompLossParams
    evaluation: EvaluationSettings

    @classmethod
    def of(cls, config: Config) -> "Work":
        """The config's sections for these."""
        return cls(config.randomized_attack_settings, config.training_settings.comp_loss_params,
                   config.evaluation_settings)


@dataclass
class SpeedResult:
    setting: SpeedSetting
    mode: Mode
    batch_size: int
    iterations: int
    seconds: list[float]           # per timed round
    images_per_s: float            # median over rounds
    peak_memory_bytes: int
    peak_memory_kind: str          # 'cuda_max_allocated' or 'cpu_peak_rss_of_process'
    flops_per_image: Optional[float]
    tflops_per_s: Optional[float]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["setting"] = dict(dataclasses.asdict(self.setting), label=self.setting.label)
        return out


def build_benchmark_composite(config: Config, device: torch.device) -> CompositeModel:
    """The config's composite on ``device``: with its weights when every checkpoint file exists,
    else with random weights (logged), so that architectures can be timed without weights."""
    from adaptive_smoothing.factory import build_composite, load_composite_weights
    from adaptive_smoothing.prepare import resolve_checkpoints

    composite = build_composite(config.forward_settings,
                                config.dataset_settings.num_classes, device, source=config.source)
    paths = [config.model_path(which) for which in ("std", "rob", "comp")]
    if all(p is None or p.exists() or p.with_suffix(".pt").exists() for p in paths):
        load_composite_weights(composite, resolve_checkpoints(config))
    else:
        logger.warning("checkpoints of %s not found: timing the architecture with random "
                       "weights", config.source)
    return composite.eval()


def random_batch(composite: CompositeModel, batch: int, device: torch.device,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] and the composite's own predictions as their labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=generator).to(device)
    with torch.no_grad():
        y = composite(x).log_probs.argmax(1)
    return x, y


def _attack_step(model: CompositeModel, x: torch.Tensor, y: torch.Tensor,
                 setting: SpeedSetting, device: torch.device) -> None:
    x = x.detach().requires_grad_(True)
    with autocast_context(device, resolve_precision(setting.precision, device)):
        out = model(x)
    F.nll_loss(out.log_probs.float(), y).backward()  # the base models' weights are frozen
    x.grad.sign_()  # the step's own cost is negligible, but the gradient must be materialised


def flops_per_attack_step(composite: CompositeModel, device: torch.device,
                          batch: int = 2) -> float:
    """FLOPs per image of one attack step (forward + backward to the input, fp32 eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = random_batch(composite, batch, device, seed=1)
    with FlopCounterMode(display=False) as counter:
        _attack_step(composite, x, y, BASELINE, device)
    return counter.get_total_flops() / batch


class _Workload:
    """One model copy prepared for one setting, and its timed unit of work."""

    def __init__(self, composite: CompositeModel, work: Work, setting: SpeedSetting,
                 mode: Mode, batch: int, device: torch.device, n_eval: int) -> None:
        self.model = prepare_model(composite, channels_last=setting.channels_last,
                                   compile=setting.compile)
        self.work, self.setting, self.mode, self.device = work, setting, mode, device
        self.batch = n_eval if mode == "eval" else batch
        self.x, self.y = random_batch(self.model, self.batch, device)
        self.dtype = resolve_precision(setting.precision, device)
        if mode == "train":
            from adaptive_smoothing.losses import CompLoss
            self.attack_settings = work.attack
            mixer = self.model.mixer
            if mixer is None:
                raise ValueError("timing training needs a composite with a mixing network")
            self.optimizer = torch.optim.AdamW(mixer.parameters(), lr=1e-6)
            cl = work.loss
            self.loss_fn = CompLoss(cl.consts.bce, cl.consts.ce, cl.consts.prod,
                                    clean_scale=cl.scale.clean, adv_scale=cl.scale.ada)

    def run(self) -> None:
        if self.mode == "attack":
            _attack_step(self.model, self.x, self.y, self.setting, self.device)
        elif self.mode == "train":
            self._train_iteration()
        else:
            self._evaluate()

    def _train_iteration(self) -> None:
        from adaptive_smoothing.attacks import generate_training_attacks
        generator = torch.Generator(self.device if self.device.type == "cuda" else "cpu")
        generator.manual_seed(0)
        with autocast_context(self.device, self.dtype):
            adversarial = generate_training_attacks(self.model, self.x, self.y,
                                                    self.attack_settings, generator)
        n_target = self.attack_settings.n_target
        # The clean part of the buffer: the batch and n_target extra clean batches.
        xs = torch.cat([self.x] * (1 + n_target) + adversarial)
        ys = torch.cat([self.y] * (2 * (1 + n_target)))
        labels = torch.cat([torch.zeros(len(xs) // 2), torch.ones(len(xs) // 2)]).to(self.device)
        self.model.train(True, scale_alpha=False)
        try:
            chunks = list(torch.randperm(len(xs), device=self.device).chunk(2 * (1 + n_target)))
            for idx in chunks:
                with autocast_context(self.device, self.dtype):
                    out = self.model(xs[idx])
                loss = self.loss_fn(out.log_probs, out.gamma, ys[idx], labels[idx],
                                    accum_count=len(chunks))
                loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.model.eval()

    def _evaluate(self) -> None:
        from adaptive_smoothing.config import STANDARD_AUTOATTACK
        from adaptive_smoothing.evaluation import evaluate_batch
        settings = self.work.evaluation.model_copy(update=dict(
            attacks_to_run=STANDARD_AUTOATTACK, autoattack_iterations=100, pgd=False,
            adaptive_attack=False))
        evaluate_batch(self.model, self.x, self.y, settings, device=self.device,
                       dtype=self.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    # Linux reports kilobytes, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "cpu_peak_rss_of_process"


def _time(workload: _Workload, iterations: int) -> float:
    _sync(workload.device)
    start = time.perf_counter()
    for _ in range(iterations):
        workload.run()
    _sync(workload.device)
    return time.perf_counter() - start


def _result(workload: _Workload, iterations: int, seconds: list[float],
            flops: Optional[float]) -> SpeedResult:
    per_round = workload.batch * iterations
    images_per_s = statistics.median(per_round / s for s in seconds)
    memory, kind = _peak_memory(workload.device)
    tflops = flops * images_per_s / 1e12 if flops is not None and workload.mode == "attack" \
        else None
    return SpeedResult(workload.setting, workload.mode, workload.batch, iterations, seconds,
                       images_per_s, memory, kind, flops, tflops)


def measure(composite: CompositeModel, work: Work, setting: SpeedSetting, *,
            mode: Mode = "attack", batch: int = 128, iterations: int = 10, warmup: int = 2,
            rounds: int = 1, device: torch.device = torch.device("cpu"), n_eval: int = 16,
            flops: Optional[float] = None) -> SpeedResult:
    """Time ``iterations`` units of ``mode`` (after ``warmup``) in each of ``rounds`` rounds.
    ``composite`` is modified (channels_last, compile); pass a copy to keep the original."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    workload = _Workload(composite, work, setting, mode, batch, device, n_eval)
    for _ in range(warmup):
        workload.run()
    seconds = [_time(workload, iterations) for _ in range(rounds)]
    return _result(workload, iterations, seconds, flops)


def compare(composite: CompositeModel, work: Work, fast: SpeedSetting, *,
            mode: Mode = "attack", batch: int = 128, iterations: int = 10, warmup: int = 2,
            rounds: int = 3, device: torch.device = torch.device("cpu"), n_eval: int = 16,
            flops: Optional[float] = None) -> dict[str, Any]:
    """The fp32 NCHW eager baseline and ``fast`` on two copies of ``composite``, timed in
    alternating rounds; returns both results and the speed-up (fast / baseline)."""
    workloads = [_Workload(copy.deepcopy(composite), work, BASELINE, mode, batch, device,
                           n_eval),
                 _Workload(composite, work, fast, mode, batch, device, n_eval)]
    for workload in workloads:
        for _ in range(warmup):
            workload.run()
    seconds: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, workload in enumerate(workloads):
            seconds[i].append(_time(workload, iterations))
    baseline, fast_result = (_result(w, iterations, s, flops) for w, s in zip(workloads, seconds))
    # Peak memory is per process: with both copies alive it is not attributable to one setting.
    return {"baseline": baseline, "fast": fast_result,
            "speedup": fast_result.images_per_s / baseline.images_per_s}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a figure needs to be read: CPU, cores, threads, bf16 support, GPU, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device), "torch": torch.__version__,
        "python": platform.python_version(), "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(config: Config, setting: SpeedSetting, *, mode: Mode = "attack",
                  batch: int = 128, iterations: int = 10, warmup: int = 2, rounds: int = 3,
                  compare_baseline: bool = False, n_eval: int = 16,
                  device: torch.device = torch.device("cpu"),
                  count_flops: bool = True, **kwargs: Any) -> dict[str, Any]:
    """What ``scripts/benchmark.py`` runs: build the composite, count FLOPs, time ``setting``
    (and with ``compare_baseline`` the fp32 NCHW baseline, interleaved). Returns a JSON-ready
    record."""
    compare_baseline = kwargs.pop("compare", compare_baseline)
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)}")
    resolve_precision(setting.precision, device)  # refuse fp16 off CUDA before building
    composite = build_benchmark_composite(config, device)
    if mode == "train" and composite.mixer is None:
        raise ConfigError("expected true: --mode train needs the mixing network",
                          key="forward_settings.use_policy", value=False, file=config.source)
    work = Work.of(config)
    flops = flops_per_attack_step(composite, device) if count_flops else None
    common = dict(mode=mode, batch=batch, iterations=iterations, warmup=warmup, rounds=rounds,
                  device=device, n_eval=n_eval, flops=flops)
    record: dict[str, Any] = {"mode": mode, "machine": machine_info(device),
                              "flops_per_image_attack_step": flops}
    if compare_baseline:
        result = compare(composite, work, setting, **common)
        record.update(baseline=result["baseline"].to_dict(), fast=result["fast"].to_dict(),
                      speedup=result["speedup"])
    else:
        record["fast"] = measure(composite, work, setting, **common).to_dict()
    return record


def format_record(record: dict[str, Any]) -> str:
    """A few human-readable lines."""
    lines = []
    for key in ("baseline", "fast"):
        if key in record:
            r = record[key]
            tflops = f", {r['tflops_per_s']:.3f} TFLOP/s" if r["tflops_per_s"] else ""
            lines.append(f"{r['setting']['label']:>32}: {r['images_per_s']:9.1f} img/s "
                         f"({r['mode']}, batch {r['batch_size']}{tflops}), peak memory "
                         f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})")
    if record.get("flops_per_image_attack_step"):
        lines.append(f"FLOPs per image per attack step: "
                     f"{record['flops_per_image_attack_step'] / 1e9:.2f} GFLOP")
    if "speedup" in record:
        lines.append(f"speed-up of the fast path over fp32 NCHW eager: {record['speedup']:.2f}x")
    return "\n".join(lines)


def append_record(path: "os.PathLike[str] | str", record: dict[str, Any]) -> None:
    """Append ``record`` to the ``runs`` list of the JSON file ``path`` (created if absent)."""
    import json
    from pathlib import Path

    target = Path(path)
    data: dict[str, Any] = {"runs": []}
    if target.exists():
        data = json.loads(target.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise ValueError(f"{target}: expected a JSON object with a 'runs' list")
    data["runs"].append(record)
    write_text_atomic(target, json.dumps(data, indent=2) + "\n")
