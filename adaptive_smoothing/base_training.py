"""Training the base classifiers: standard training and adversarial training (PGD-AT, FGSM-RS).

The paper mixes an accurate (standard) and a robust (adversarially trained) classifier; this module
produces both for the small-scale experiments. FGSM with a random start and step 1.25 * eps is the
"fast adversarial training" of Wong et al. (2020); PGD-AT is Madry et al. (2018).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from adaptive_smoothing.attacks import pgd
from adaptive_smoothing.checkpoints import (BASE_TRAINING_FORMAT, load_checked, read_entries,
                                            save_checkpoint)
from adaptive_smoothing.data import IterationData
from adaptive_smoothing.errors import UserError
from adaptive_smoothing.models import create_model, list_models
from adaptive_smoothing.runtime import (autocast_context, prepare_model, resolve_precision,
                                        select_device)

logger = logging.getLogger(__name__)

METHODS = ("standard", "pgd", "fgsm")


class BaseTrainingError(UserError, ValueError):
    """Base-training settings that cannot train (names the setting), or a checkpoint to resume
    that was trained under other settings."""


@dataclass(frozen=True)
class BaseTrainingSettings:
    """Everything one base-model training run needs (the CLI fills it from its flags)."""

    arch: str = "resnet18"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    method: str = "standard"          # standard | pgd | fgsm
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1                   # peak of the one-cycle schedule (SGD, Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 8 / 255              # Linf radius for adversarial training
    pgd_steps: int = 7
    pgd_step_size: float = 2 / 255
    fgsm_step_factor: float = 1.25    # FGSM-RS step = factor * eps (Wong et al. 2020)
    precision: str = "auto"           # auto | fp32 | bf16 | fp16
    channels_last: bool = True        # NHWC weights/activations (runtime.prepare_model)
    compile: bool = False             # torch.compile the model
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        # The registry's own message; checked here so that it is a BaseTrainingError (one line
        # in the CLI), not the registry's ValueError from deep inside the training.
        if not self.arch.startswith("robustbench:") and self.arch not in list_models():
            raise BaseTrainingError(f"unknown model {self.arch!r}; expected one of "
                                    f"{list_models()}")
        if self.method not in METHODS:
            raise BaseTrainingError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("epochs", "batch_size", "pgd_steps"):
            if getattr(self, name) < 1:
                raise BaseTrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "eps", "pgd_step_size", "fgsm_step_factor"):
            if not getattr(self, name) > 0:
                raise BaseTrainingError(f"{name} must be > 0, got {getattr(self, name)}")


def _adversarial_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       settings: BaseTrainingSettings) -> torch.Tensor:
    """Training inputs for this step: clean for standard training, else attacked."""
    if settings.method == "standard":
        return x
    # Attacks see the model in eval mode so BatchNorm statistics track only the training inputs.
    model.eval()
    try:
        if settings.method == "pgd":
            return pgd(model, x, y, settings.eps, n_iter=settings.pgd_steps,
                       step_size=settings.pgd_step_size, random_start=True).x_adv
        # FGSM-RS: one step from a uniform random start, projected back into the eps-ball.
        return pgd(model, x, y, settings.eps, n_iter=1,
                   step_size=settings.fgsm_step_factor * settings.eps, random_start=True).x_adv
    finally:
        model.train()


# Settings that do not change the weights: a run may resume on another device or worker count.
_RESUMABLE_CHANGES = frozenset({"device", "num_workers", "compile"})  # num_workers: old files


def _check_same_settings(path: Path, saved: dict[str, Any],
                         settings: BaseTrainingSettings) -> None:
    """Refuse to continue a checkpoint under settings that would train different weights."""
    current = dataclasses.asdict(settings)
    changed = [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in sorted(saved)
               if key in current and key not in _RESUMABLE_CHANGES and saved[key] != current[key]]
    if changed:
        raise BaseTrainingError(f"{path}: cannot resume, settings differ from the checkpoint's "
                         f"({'; '.join(changed)}); use another --output or --no-resume")


def _one_cycle(step: int, total: int) -> float:
    """Linear warm-up to the peak over the first 40% of steps, then linear decay to 0."""
    peak_at = 0.4 * total
    if step < peak_at:
        return min(1.0, (step + 1) / peak_at)
    return max(0.0, (total - step) / (total - peak_at))


def train_base_model(settings: BaseTrainingSettings, train_set: Dataset, output: Path,
                     resume: bool = True) -> nn.Module:
    """Train one base classifier, checkpointing atomically after every epoch.

    The checkpoint at ``output`` holds {"model", "arch", "arch_kwargs", "num_classes", "method",
    "optimizer", "epoch", "settings"}; its "model" entry is what the composite's STD/ROB loaders
    read. With ``resume`` an existing checkpoint is continued from its last finished epoch.
    """
    device = select_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    torch.manual_seed(settings.seed)
    model = create_model(settings.arch, num_classes=settings.num_classes,
                         **settings.arch_kwargs).to(device)
    prepare_model(model, channels_last=settings.channels_last, compile=settings.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay, nesterov=True)
    # Held as tensors on the device, each batch augmented there (crop + flip, data.py).
    data = IterationData(train_set, settings.batch_size, 0, settings.seed, shuffle=True,
                         device=device)
    steps_per_epoch = data.iterations_per_epoch
    total_steps = settings.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _one_cycle(step, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)

    start_epoch = 0
    cpu_seconds = 0.0
    if resume and output.exists():
        # Loaded on the CPU: torch.set_rng_state takes a CPU ByteTensor only (a CUDA map_location
        # made every resume on a GPU crash); load_state_dict copies the weights to the device.
        state = read_entries(output, ("model", "optimizer", "scheduler", "epoch", "rng_state"),
                             BASE_TRAINING_FORMAT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _check_same_settings(output, state.get("settings", {}), settings)
        start_epoch = int(state["epoch"])
        cpu_seconds = float(state.get("cpu_seconds", 0.0))
        torch.set_rng_state(state["rng_state"])
        logger.info("resuming %s from epoch %d (%.2f CPU-hours so far)", output, start_epoch,
                    cpu_seconds / 3600)

    for epoch in range(start_epoch, settings.epochs):
        model.train()
        epoch_cpu_start = time.process_time()
        correct = seen = 0
        loss_sum = 0.0
        # Each epoch's order and augmentation depend on (seed, epoch, step) alone, so a run
        # resumed from any epoch's checkpoint sees the same batches as one never stopped.
        bar = tqdm(data.epoch(epoch, 0), total=steps_per_epoch, leave=False,
                   desc=f"{settings.method} epoch {epoch + 1}/{settings.epochs}")
        for x, y, _, _ in bar:
            x_train = _adversarial_batch(model, x, y, settings)
            with autocast_context(device, precision):
                logits = model(x_train)
                loss = F.cross_entropy(logits.float(), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            lr=f"{scheduler.get_last_lr()[0]:.4f}")
        logger.info("epoch %d/%d: loss %.4f, %s accuracy %.4f", epoch + 1, settings.epochs,
                    loss_sum / max(seen, 1), "clean" if settings.method == "standard"
                    else "adversarial", correct / max(seen, 1))
        cpu_seconds += time.process_time() - epoch_cpu_start
        save_checkpoint({
            "model": model.state_dict(), "arch": settings.arch,
            "arch_kwargs": dict(settings.arch_kwargs), "num_classes": settings.num_classes,
            "method": settings.method, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
            "rng_state": torch.get_rng_state(), "cpu_seconds": cpu_seconds,
            "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        }, output)
    model.eval()
    return model


def load_base_model(path: Path, device: Optional[torch.device] = None) -> nn.Module:
    """Rebuild a model saved by :func:`train_base_model` (architecture from the checkpoint).

    A file that is not a base-training checkpoint, or whose weights do not fit the architecture
    it names, raises CheckpointError naming the file and what is missing.
    """
    state = read_entries(path, ("model", "arch", "num_classes"), BASE_TRAINING_FORMAT)
    model = create_model(state["arch"], num_classes=int(state["num_classes"]),
                         **dict(state.get("arch_kwargs", {})))
    load_checked(model, state["model"], source=path, expected=BASE_TRAINING_FORMAT)
    return model.to(device or "cpu").eval()
