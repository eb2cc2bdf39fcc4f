"""The training checkpoint: its state, the files written, and resuming from it.

A run needs no random state besides its position (epoch, iteration) to continue exactly where it
stopped (the draws are seeded by position, seeding.py); the checkpoint also stores the global
torch RNG states for completeness. A checkpoint is resumed only when the run's identity (what
shapes the trained weights) is unchanged, except in keys the user allows to change; the allowed
changes are applied to the restored optimizer and schedules and recorded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import pytorch_warmup
import torch

from adaptive_smoothing.errors import UserError
from adaptive_smoothing.checkpoints import (CheckpointError, check_mixer_inputs,
                                            mixer_checkpoint, read_checkpoint, save_checkpoint)
from adaptive_smoothing.config import MOVED, Config, provenance
from adaptive_smoothing.models import CompositeModel

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_VERSION", "LAST_CHECKPOINT", "MIXER_CHECKPOINT",
           "Position", "Resumed", "TrainingResumeError", "apply_schedule_settings",
           "check_resumable", "resume", "save_checkpoints", "training_state"]

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
MIXER_CHECKPOINT = "mixer.pt"
CHECKPOINT_VERSION = 1


class TrainingResumeError(UserError, RuntimeError):
    """The checkpoint to resume from cannot continue this run (wrong file or changed config)."""


@dataclass(frozen=True)
class Position:
    """Where a run stands, at an iteration boundary (the only place checkpoints are written)."""

    epoch: int = 0               # current epoch
    iteration_in_epoch: int = 0  # iterations of the current epoch already done
    iteration: int = 0           # iterations done in total
    global_step: int = 0         # optimizer-step slots done (skipped ones included)
    nonfinite_streak: int = 0    # consecutive skipped (non-finite) optimizer steps


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint restores besides the module, optimizer and schedule states."""

    position: Position
    validation: dict[str, float]
    config_changes: list[dict[str, Any]] = field(default_factory=list)


def _rng_states() -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _restore_cuda_rng(states: Optional[list[torch.Tensor]], path: Path) -> None:
    """Restore the saved per-GPU RNG states of the GPUs visible now (saved on a machine with
    more or fewer GPUs, only the common ones; set_rng_state_all would fail on a missing one)."""
    if not states or not torch.cuda.is_available():
        return
    visible = torch.cuda.device_count()
    if len(states) != visible:
        logger.warning("resuming %s: it holds RNG states of %d GPUs, %d are visible now; "
                       "restoring the first %d", path, len(states), visible,
                       min(len(states), visible))
    for index, rng_state in enumerate(states[:visible]):
        torch.cuda.set_rng_state(rng_state.cpu(), index)


def training_state(composite: CompositeModel, *, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler,
                   warmup: pytorch_warmup.BaseWarmup, scaler: torch.amp.GradScaler,
                   position: Position, iterations_per_epoch: int, total_steps: int, world: int,
                   validation: Mapping[str, float], config_record: Mapping[str, Any],
                   identity: Mapping[str, Any],
                   config_changes: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """last.pt's content. Its "model" + "bn" are the authors' mixer checkpoint (docs/METHOD.md,
    "Published models"), loadable as such."""
    p = position
    return mixer_checkpoint(
        composite,
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        warmup=warmup.state_dict(), scaler=scaler.state_dict(),
        rng=_rng_states(), epoch=p.epoch, batch=p.iteration_in_epoch,
        iteration=p.iteration, global_step=p.global_step,
        nonfinite_streak=p.nonfinite_streak,
        iterations_per_epoch=iterations_per_epoch,
        total_steps=total_steps, world_size=world,
        validation=dict(validation), config=dict(config_record),
        identity=dict(identity), config_changes=list(config_changes),
        format_version=CHECKPOINT_VERSION)


def save_checkpoints(state: Mapping[str, Any], composite: CompositeModel, path: Path, *,
                     epoch_end: bool) -> None:
    """last.pt at ``path``, mixer.pt beside it, and epoch_NNN.pt at an ``epoch_end``."""
    save_checkpoint(dict(state), path)
    # The mixer alone (a twelfth of last.pt with AdamW's moments): what evaluation and sharing
    # need, always the latest, and kept at epoch ends.
    mixer_only = mixer_checkpoint(composite, **{
        k: state[k] for k in ("epoch", "global_step", "validation", "config")})
    save_checkpoint(mixer_only, path.parent / MIXER_CHECKPOINT)
    if epoch_end:
        save_checkpoint(mixer_only, path.parent / f"epoch_{state['epoch']:03d}.pt")
    logger.info("saved %s", path)


def check_resumable(path: Path, state: Any, identity: Mapping[str, Any],
                    allow_config_change: Iterable[str]) -> dict[str, list[Any]]:
    """Refuse a file that is not this project's training checkpoint, or one whose run had
    another identity outside ``allow_config_change``; returns the allowed changes
    {key: [old, new]}."""
    if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_VERSION:
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise TrainingResumeError(
            f"{path}: not a training checkpoint of this version (format_version "
            f"{CHECKPOINT_VERSION} with optimizer state; it holds {keys}, e.g. a mixer-only "
            "file such as epoch_NNN.pt or a published mixer); move it away, or use "
            "--no-resume to start over (it will be overwritten)")
    old = state.get("identity")
    if old is None:  # written before identities were recorded: compare the config only
        old = {k: v for k, v in provenance.flat(state.get("config", {})).items()
               if not k.startswith("model_load_path.")}  # paths, not fingerprints
        logger.warning("%s records no fingerprints of its base models and data (an older "
                       "version); only its config is compared", path)
    changed = provenance.differences(
        provenance.restrict(provenance.migrate(old, MOVED), "weights", Config),
        dict(identity), Config)
    allowed = set(provenance.migrate(dict.fromkeys(allow_config_change), MOVED))
    refused = {k: v for k, v in changed.items() if k not in allowed}
    if refused:
        listed = "; ".join(provenance.describe(k, *v) for k, v in refused.items())
        raise TrainingResumeError(
            f"{path}: cannot resume, the config changed in what shapes the trained weights "
            f"({listed}); apply the change with --allow-config-change "
            f"{','.join(refused)} (recorded in the checkpoint), or start over with a new "
            "--output-dir or --no-resume")
    return changed


def apply_schedule_settings(optimizer: torch.optim.Optimizer,
                            scheduler: torch.optim.lr_scheduler.CosineAnnealingLR,
                            warmup: pytorch_warmup.BaseWarmup, *, lr: float,
                            weight_decay: float, total_steps: int, warmup_period: int,
                            checkpoint_lr: float) -> None:
    """Make the restored optimizer and schedules follow the config in force: the loaded states
    carry the old lr (``checkpoint_lr``), weight decay and schedule length, which would
    otherwise silently win over an (allowed) change."""
    ratio = lr / checkpoint_lr
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        group["initial_lr"] = lr
        group["weight_decay"] = weight_decay
    warmup.lrs = [value * ratio for value in warmup.lrs]
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    scheduler.T_max = total_steps
    warmup.warmup_params = [{"warmup_period": warmup_period} for _ in optimizer.param_groups]


def resume(path: Path, composite: CompositeModel, *, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.CosineAnnealingLR,
           warmup: pytorch_warmup.BaseWarmup, scaler: torch.amp.GradScaler,
           identity: Mapping[str, Any], allow_config_change: Iterable[str], lr: float,
           weight_decay: float, iterations_per_epoch: int, total_steps: int,
           warmup_period: int, world: int) -> Resumed:
    """Load ``path`` into the composite's mixer and gamma BN, the optimizer, the schedules, the
    scaler and the torch RNGs; apply the settings in force (``lr``, ``weight_decay``,
    ``total_steps``, ``warmup_period``) to the restored schedules; return the rest."""
    state = read_checkpoint(path, "a training checkpoint written by adaptive_smoothing")
    changed = check_resumable(path, state, identity, allow_config_change)
    for key, now in (("iterations_per_epoch", iterations_per_epoch),
                     ("total_steps", total_steps), ("world_size", world)):
        if state[key] != now:
            logger.warning("resuming %s: %s was %s, now %s; the data order or learning-rate "
                           "schedule will differ from an uninterrupted run", path, key,
                           state[key], now)
    try:
        check_mixer_inputs(composite, state.get("model", {}), path)
    except CheckpointError as err:
        raise TrainingResumeError(f"{err}; or start over with a new --output-dir or "
                                  "--no-resume") from None
    try:
        composite.mixer.load_state_dict(state["model"])
        composite.gamma_bn.load_state_dict(state["bn"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise TrainingResumeError(
            f"{path}: its mixer or optimizer state does not fit this run's mixing network "
            f"({first}); move it away, or start over with a new --output-dir or "
            "--no-resume") from None
    scheduler.load_state_dict(state["scheduler"])
    warmup.load_state_dict(state["warmup"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    elif scaler.is_enabled():
        # A disabled scaler (bf16/fp32) saves an empty state, which load_state_dict refuses.
        logger.info("resuming %s in fp16 from a run without a gradient scaler (bf16/fp32): "
                    "the scaler starts afresh", path)
    config_changes = list(state.get("config_changes", []))
    # The lr in force when it was saved, from the optimizer (the scheduler's initial_lr, which
    # apply_schedule_settings keeps at the configured lr), not from the config record: a
    # Trainer built without a config records whatever its caller passes.
    apply_schedule_settings(
        optimizer, scheduler, warmup, lr=lr, weight_decay=weight_decay, total_steps=total_steps,
        warmup_period=warmup_period,
        checkpoint_lr=float(state["optimizer"]["param_groups"][0]["initial_lr"]))
    if changed:
        config_changes.append({"iteration": int(state["iteration"]),
                               "global_step": int(state["global_step"]),
                               "changes": {k: list(v) for k, v in changed.items()}})
        logger.warning("resuming %s with config changes (allowed): %s", path,
                       "; ".join(provenance.describe(k, *v) for k, v in changed.items()))
    torch.set_rng_state(state["rng"]["torch"].cpu())
    _restore_cuda_rng(state["rng"].get("cuda"), path)
    position = Position(epoch=int(state["epoch"]), iteration_in_epoch=int(state["batch"]),
                        iteration=int(state["iteration"]),
                        global_step=int(state["global_step"]),
                        nonfinite_streak=int(state["nonfinite_streak"]))
    logger.info("resuming from %s: epoch %d, iteration %d, optimizer step %d", path,
                position.epoch, position.iteration, position.global_step)
    return Resumed(position, dict(state["validation"]), config_changes)
