"""Training the mixing network (docs/METHOD.md, "Training"); docs/TRAINING.md is the user's guide.

One *iteration* takes B clean training images and builds the buffer

    B clean (label 0) + n_target * B extra clean (label 0) + (1 + n_target) * B attacked (label 1)

then shuffles it, splits it into 2 * (n_target + 1) mini-batches of B images and takes one
optimizer step per ``accum_grad`` mini-batches. Only the mixing network's parameters (and the BN
statistics of the mixer and of gamma) change; the base models are frozen and checked to be.

Reproducibility and exact resumption: every random choice of an iteration (data order,
augmentation, attack draws, buffer shuffle) comes from a generator seeded by
``(seed, purpose, epoch or iteration, rank)`` (seeding.py; the batches are data.py's). A run therefore needs no random state besides its
position (epoch, iteration) to continue exactly where it stopped; checkpoints also store the global
torch RNG states for completeness. Checkpoints are written at iteration boundaries only.

Configuration flows one way: :func:`build_trainer` (and :func:`run_training`, which calls it) is
the one place that reads a :class:`~adaptive_smoothing.config.Config`; :class:`Trainer` takes the
built composite, the data and the settings sections as explicit arguments.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import pytorch_warmup
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from adaptive_smoothing.attacks import Norm, RandomizedAttackSettings, generate_training_attacks
from adaptive_smoothing.checkpoints import mixer_checkpoint, read_checkpoint, save_checkpoint
from adaptive_smoothing.config import Config, ConfigError, TrainingSettings, config_to_dict
from adaptive_smoothing.data import (IterationData, as_float_images, augment_batch,
                                     build_dataset, endless_indices, load_tensors)
from adaptive_smoothing.detection import detection_metrics, fixed_attack_images
from adaptive_smoothing.errors import UserError
from adaptive_smoothing.evaluation import validate
from adaptive_smoothing.factory import (build_composite, checkpoint_paths, load_composite_weights,
                                        require_checkpoint_files)
from adaptive_smoothing.fingerprint import optional_file_sha256
from adaptive_smoothing.losses import AttackLossName, CompLoss
from adaptive_smoothing.models import CompositeModel
from adaptive_smoothing.models.composite import base_weight_sums
from adaptive_smoothing.persist import write_text_atomic
from adaptive_smoothing.pre_attack import PreAttacked, load_pre_attacked
from adaptive_smoothing.rundir import RunLock
from adaptive_smoothing.runtime import (autocast_context, barrier, distributed_rank_world,
                                        distributed_session, init_distributed, prepare_model,
                                        resolve_precision)
from adaptive_smoothing.seeding import stream

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_DIR", "LAST_CHECKPOINT", "TrainingDivergedError", "TrainingResumeError",
           "Trainer", "ValidationAttack", "build_trainer", "optimizer_steps_per_iteration",
           "run_training", "training_identity"]

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
MIXER_CHECKPOINT = "mixer.pt"
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "train.log"
RESULTS_FILE = "training_results.json"
DEBUG_DIR = "debug"
CHECKPOINT_VERSION = 1

GRAD_CLIP_NORM = 10.0          # docs/METHOD.md, "Training" step 4
WARMUP_FRACTION = 25           # exponential warm-up over the first 1/25 of the optimizer steps
DEBUG_ITERATIONS = 2
DEBUG_VAL_EXAMPLES = 8


class TrainingDivergedError(UserError, RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class TrainingResumeError(UserError, RuntimeError):
    """The checkpoint to resume from cannot continue this run (wrong file or changed config)."""


# -- small pure helpers ---------------------------------------------------------------------------
def optimizer_steps_per_iteration(n_target: int, accum_grad: int) -> int:
    """Optimizer steps per buffer of 2 * (n_target + 1) mini-batches (accum_grad -1: one)."""
    n_mini = 2 * (n_target + 1)
    return 1 if accum_grad == -1 else math.ceil(n_mini / accum_grad)


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


@dataclass(frozen=True)
class ValidationAttack:
    """The attacks of the periodic validation (:func:`~adaptive_smoothing.evaluation.validate`)
    and of the held-out detection AUCs (docs/TRAINING.md, "Validation").

    ``n_target``: APGD-T's target classes after APGD-CE (0: APGD-CE alone); ``use_apgd`` false:
    PGD with ``pgd_step_size``, ``pgd_loss`` and ``pgd_bce_weight`` instead.
    ``detection_bce_weight``: the weight of the BCE(gamma, 1) term of the adaptive detection
    attack.
    """

    eps: float
    norm: Norm
    iterations: int
    n_target: int = 0
    use_apgd: bool = True
    pgd_step_size: Optional[float] = None
    pgd_loss: AttackLossName = "ce"
    pgd_bce_weight: float = 0.0
    detection_bce_weight: float = 0.5


# -- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """The mixer's training loop. ``Trainer(...).fit()`` trains and returns last.pt's path;
    :func:`build_trainer` makes one from a config.

    Args:
        composite: the model to train, on ``device``, with a mixing network; its base models'
            weights loaded (they stay frozen) and the mixer initialised (from the seed, or a
            checkpoint).
        train_set / val_set: ``(float CHW image in [0, 1], int label)`` without augmentation
            (applied here); ``val_set`` may also be an ``(x, y)`` pair of tensors. The first
            ``settings.n_val_examples`` validation images are used.
        settings, attack, validation: the training settings, the randomised training attacks,
            the validation's attacks.
        seed: the seed of every random draw (seeding.py).
        output_dir: where checkpoints, logs and results go (``debug``: its ``debug`` folder).
        device: this process's device (under torch.distributed, the process group is joined
            already: ``runtime.init_distributed``).
        identity: what shapes the trained weights, ``{dotted key: value}``; a checkpoint whose
            identity differs is not resumed except in the keys of ``allow_config_change``.
        config_record: the run's configuration as plain data, stored in every checkpoint.
        shuffle: shuffle the training data each epoch.
        pre_attacked: pre-attacked data joined to every buffer
            (:func:`~adaptive_smoothing.pre_attack.load_pre_attacked`).
        resume: continue from ``output_dir/checkpoints/last.pt`` when it exists.
        debug: two iterations and a few validation images into ``output_dir/debug``, no resume.
    """

    def __init__(self, composite: CompositeModel, train_set: Dataset,
                 val_set: Union[Dataset, tuple[torch.Tensor, torch.Tensor]], *,
                 settings: TrainingSettings, attack: RandomizedAttackSettings,
                 validation: ValidationAttack, seed: int, output_dir: Union[str, Path],
                 device: torch.device, identity: Mapping[str, Any],
                 config_record: Mapping[str, Any], shuffle: bool = True,
                 pre_attacked: Optional[PreAttacked] = None, resume: bool = True,
                 debug: bool = False, allow_config_change: Iterable[str] = ()) -> None:
        if composite.mixer is None:
            raise ValueError("training needs a composite with a mixing network")
        self.settings, self.attack_settings, self.validation = settings, attack, validation
        self.seed, self.debug = seed, debug
        self.identity = dict(identity)
        self.config_record = dict(config_record)
        self.allow_config_change = tuple(allow_config_change)
        self.config_changes: list[dict[str, Any]] = []
        ts = settings
        self.rank, self.world = distributed_rank_world()
        if self.world == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Each process would train alone as rank 0, all writing the same checkpoints.
            raise RuntimeError("started by torchrun (WORLD_SIZE > 1) outside a process group: "
                               "join it first with runtime.init_distributed (build_trainer "
                               "does)")
        self.device = device
        self.dtype = resolve_precision(ts.precision, self.device)
        self.output_dir = Path(output_dir)
        if debug:
            self.output_dir = self.output_dir / DEBUG_DIR
            resume = False
        self.checkpoint_path = self.output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        self.pre_attacked = pre_attacked

        # Models.
        self.composite = composite
        prepare_model(self.composite, channels_last=ts.channels_last, compile=ts.compile)
        self.mixer = self.composite.mixer
        self.ddp_mixer: Optional[nn.Module] = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # Per-process batch statistics would make the run depend on the number of processes.
            self.composite.use_global_batch_statistics()
            self.ddp_mixer = DistributedDataParallel(
                self.mixer, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.base_fingerprint = base_weight_sums(self.composite)

        # Data.
        self.n_target = attack.n_target
        self.batch = ts.per_process_batch_size(self.world)
        # With pre-attacked data (the authors' recipe): a clean batch of batch * 5 // blocks and,
        # per buffer, a pre-attacked slice as large as the online attacks at the full batch.
        self.pa_slice = 0
        if self.pre_attacked is not None:
            self.pa_slice = (self.n_target + 1) * self.batch
            self.batch = max(1, self.batch * 5 // self.pre_attacked["blocks"])
        if self.device.type == "cuda":
            # Every mini-batch and attack batch has the same shape, so cuDNN's autotuning pays.
            torch.backends.cudnn.benchmark = True
        self.data = IterationData(train_set, self.batch, self.n_target * self.batch, self.seed,
                                  shuffle, self.rank, self.world, self.device)
        n_val = min(ts.n_val_examples, DEBUG_VAL_EXAMPLES) if debug else ts.n_val_examples
        self.x_val, self.y_val = (val_set if isinstance(val_set, tuple)
                                  else load_tensors(val_set, n_val))
        self.x_val, self.y_val = self.x_val[:n_val], self.y_val[:n_val]
        # Detection AUCs: the first validation images; their fixed-attack images are made once.
        self.n_detection = min(ts.n_detection_examples, len(self.x_val))
        self.x_det_fixed: Optional[torch.Tensor] = None
        # The last training buffer (images, mini-batch index lists): re-estimating the gamma BN
        # on it needs no extra attacks, and a checkpoint always follows a training iteration.
        self.last_buffer: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None

        # Schedule, in optimizer steps.
        self.n_mini = 2 * (self.n_target + 1)
        self.accum = self.n_mini if ts.accum_grad == -1 else ts.accum_grad
        self.steps_per_iteration = optimizer_steps_per_iteration(self.n_target, ts.accum_grad)
        self.total_iterations = (DEBUG_ITERATIONS if debug
                                 else ts.epochs * self.data.iterations_per_epoch)
        self.total_steps = self.total_iterations * self.steps_per_iteration
        if ts.max_steps is not None:
            self.total_steps = min(self.total_steps, ts.max_steps)
        # Iterations actually run: max_steps may end the run long before the last epoch.
        self.planned_iterations = min(self.total_iterations,
                                      math.ceil(self.total_steps / self.steps_per_iteration))

        # Optimisation.
        cl = ts.comp_loss_params
        self.loss_fn = CompLoss(cl.consts.bce, cl.consts.ce, cl.consts.prod,
                                clean_scale=cl.scale.clean, adv_scale=cl.scale.ada)
        self.scales = (cl.scale.clean, cl.scale.ada, cl.scale.pa)
        self.optimizer = torch.optim.AdamW(self.mixer.parameters(), lr=ts.lr,
                                           weight_decay=ts.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=self.total_steps)
        self.warmup = pytorch_warmup.ExponentialWarmup(
            self.optimizer, warmup_period=max(1, self.total_steps // WARMUP_FRACTION))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        # Position.
        self.epoch = 0               # current epoch
        self.iteration_in_epoch = 0  # iterations of the current epoch already done
        self.iteration = 0           # iterations done in total
        self.global_step = 0         # optimizer-step slots done (skipped ones included)
        self.nonfinite_streak = 0
        self.last_validation: dict[str, float] = {}
        if resume and self.checkpoint_path.exists():
            self._load(self.checkpoint_path)
        elif self.checkpoint_path.exists():
            logger.warning("%s exists but resume is off: starting over; it will be overwritten",
                           self.checkpoint_path)
        self.writer: Any = None

    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # "model" + "bn": the authors' mixer checkpoint (docs/METHOD.md, "Published models"),
        # loadable as such.
        return mixer_checkpoint(
            self.composite,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            warmup=self.warmup.state_dict(), scaler=self.scaler.state_dict(),
            rng=rng, epoch=self.epoch, batch=self.iteration_in_epoch,
            iteration=self.iteration, global_step=self.global_step,
            nonfinite_streak=self.nonfinite_streak,
            iterations_per_epoch=self.data.iterations_per_epoch,
            total_steps=self.total_steps, world_size=self.world,
            validation=dict(self.last_validation), config=self.config_record,
            identity=self.identity, config_changes=list(self.config_changes),
            format_version=CHECKPOINT_VERSION)

    def _check_resumable(self, path: Path, state: Any) -> dict[str, list[Any]]:
        """Refuse a file that is not this project's training checkpoint, or one whose run had
        another config; returns the allowed changes {key: [old, new]}."""
        if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_VERSION:
            keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
            raise TrainingResumeError(
                f"{path}: not a training checkpoint of this version (format_version "
                f"{CHECKPOINT_VERSION} with optimizer state; it holds {keys}, e.g. a mixer-only "
                "file such as epoch_NNN.pt or a published mixer); move it away, or use "
                "--no-resume to start over (it will be overwritten)")
        old = state.get("identity")
        if old is None:  # written before identities were recorded: compare the config only
            old = _recorded_config_identity(state.get("config", {}))
            logger.warning("%s records no fingerprints of its base models and data (an older "
                           "version); only its config is compared", path)
        old = {k: v for k, v in old.items() if _in_identity(k)}
        changed = {k: [old.get(k), self.identity.get(k)]
                   for k in sorted(set(old) | set(self.identity))
                   if k in old and old.get(k) != self.identity.get(k)}
        refused = {k: v for k, v in changed.items() if k not in self.allow_config_change}
        if refused:
            listed = "; ".join(_describe_change(k, *v) for k, v in refused.items())
            raise TrainingResumeError(
                f"{path}: cannot resume, the config changed in what shapes the trained weights "
                f"({listed}); apply the change with --allow-config-change "
                f"{','.join(refused)} (recorded in the checkpoint), or start over with a new "
                "--output-dir or --no-resume")
        return changed

    def _load(self, path: Path) -> None:
        state = read_checkpoint(path, "a training checkpoint written by adaptive_smoothing")
        changed = self._check_resumable(path, state)
        for key, now in (("iterations_per_epoch", self.data.iterations_per_epoch),
                         ("total_steps", self.total_steps), ("world_size", self.world)):
            if state[key] != now:
                logger.warning("resuming %s: %s was %s, now %s; the data order or learning-rate "
                               "schedule will differ from an uninterrupted run", path, key,
                               state[key], now)
        try:
            self.mixer.load_state_dict(state["model"])
            self.composite.gamma_bn.load_state_dict(state["bn"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise TrainingResumeError(
                f"{path}: its mixer or optimizer state does not fit this run's mixing network "
                f"({first}); move it away, or start over with a new --output-dir or "
                "--no-resume") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.warmup.load_state_dict(state["warmup"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        elif self.scaler.is_enabled():
            # A disabled scaler (bf16/fp32) saves an empty state, which load_state_dict refuses.
            logger.info("resuming %s in fp16 from a run without a gradient scaler (bf16/fp32): "
                        "the scaler starts afresh", path)
        self.config_changes = list(state.get("config_changes", []))
        # The lr in force when it was saved, from the optimizer (the scheduler's initial_lr, which
        # _apply_schedule_settings keeps at the configured lr), not from the config record: a
        # Trainer built without a config records whatever its caller passes.
        self._apply_schedule_settings(float(state["optimizer"]["param_groups"][0]["initial_lr"]))
        if changed:
            self.config_changes.append({"iteration": int(state["iteration"]),
                                        "global_step": int(state["global_step"]),
                                        "changes": changed})
            logger.warning("resuming %s with config changes (allowed): %s", path,
                           "; ".join(_describe_change(k, *v) for k, v in changed.items()))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        _restore_cuda_rng(state["rng"].get("cuda"), path)
        self.epoch, self.iteration_in_epoch = int(state["epoch"]), int(state["batch"])
        self.iteration, self.global_step = int(state["iteration"]), int(state["global_step"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.last_validation = dict(state["validation"])
        logger.info("resuming from %s: epoch %d, iteration %d, optimizer step %d", path,
                    self.epoch, self.iteration, self.global_step)

    def _apply_schedule_settings(self, checkpoint_lr: float) -> None:
        """Make the restored optimizer and schedules follow the config in force: the loaded
        states carry the old lr, weight decay and schedule length, which would otherwise
        silently win over an (allowed) change."""
        ts = self.settings
        ratio = ts.lr / checkpoint_lr
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            group["initial_lr"] = ts.lr
            group["weight_decay"] = ts.weight_decay
        self.warmup.lrs = [lr * ratio for lr in self.warmup.lrs]
        self.scheduler.base_lrs = [ts.lr for _ in self.optimizer.param_groups]
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.scheduler.T_max = self.total_steps
        period = max(1, self.total_steps // WARMUP_FRACTION)
        self.warmup.warmup_params = [{"warmup_period": period}
                                     for _ in self.optimizer.param_groups]

    def _sync_gamma_bn(self) -> None:
        # The gamma BN is outside DDP, so its running statistics drift apart between processes;
        # saving their average keeps the checkpoint independent of which process wrote it.
        if self.world > 1:
            for buf in (self.composite.gamma_bn.running_mean, self.composite.gamma_bn.running_var):
                dist.all_reduce(buf)
                buf /= self.world

    def _checkpoint(self) -> None:
        """Validate, log and save last.pt and mixer.pt (and epoch_NNN.pt at epoch ends)."""
        if base_weight_sums(self.composite) != self.base_fingerprint:
            raise RuntimeError("a base model's weights changed during training; only the mixer "
                               "may learn (this is a bug)")
        if self.settings.reestimate_gamma_bn:
            self._reestimate_gamma_bn()
        self._sync_gamma_bn()
        v = self.validation
        self.last_validation = validate(
            self.composite, self.x_val, self.y_val, eps=v.eps, norm=v.norm, n_iter=v.iterations,
            n_target=v.n_target, device=self.device, dtype=self.dtype,
            batch_size=self.settings.batch_size_test_per_gpu,
            generator=stream(self.seed, "validate", self.rank), use_apgd=v.use_apgd,
            pgd_step_size=v.pgd_step_size, pgd_loss=v.pgd_loss, pgd_bce_weight=v.pgd_bce_weight)
        if self.rank == 0:
            self.last_validation.update(self._detection())
            v = self.last_validation
            logger.info("validation at step %d (%d images): clean %.2f%%, robust %.2f%%, gamma "
                        "clean %.3f / attacked %.3f", self.global_step, int(v["n"]),
                        100 * v["clean_acc"], 100 * v["robust_acc"], v["gamma_clean"],
                        v["gamma_adv"])
            if "auc_adaptive" in v:
                logger.info("detection (%d held-out images): AUC of gamma, clean vs attacked: "
                            "fixed attack %.3f, adaptive attack %.3f; mean alpha clean %.3f, "
                            "fixed-attacked %.3f, adaptive-attacked %.3f", self.n_detection,
                            v["auc_fixed"], v["auc_adaptive"], v["det_alpha_clean"],
                            v["det_alpha_fixed"], v["det_alpha_adaptive"])
            for key, value in v.items():
                if key != "n":
                    self.writer.add_scalar(f"val/{key}", value, self.global_step)
            self.writer.flush()
            state = self._state()
            save_checkpoint(state, self.checkpoint_path)
            # The mixer alone (a twelfth of last.pt with AdamW's moments): what evaluation and
            # sharing need, always the latest, and kept at epoch ends.
            mixer_only = mixer_checkpoint(self.composite, **{
                k: state[k] for k in ("epoch", "global_step", "validation", "config")})
            save_checkpoint(mixer_only, self.checkpoint_path.parent / MIXER_CHECKPOINT)
            if self.iteration_in_epoch == 0 and self.epoch > 0 and not self.debug:
                save_checkpoint(mixer_only, self.checkpoint_path.parent /
                                f"epoch_{self.epoch:03d}.pt")
            logger.info("saved %s", self.checkpoint_path)
        barrier()

    def _pre_attacked_slice(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This iteration's pre-attacked images (augmented), labels and mixer labels.

        The (block, image) pairs are read as an endless chain of seeded permutations indexed by
        the global iteration (like the extra clean stream), so a resumed run reads the same
        slices; every process reads its own chain.
        """
        pa = self.pre_attacked
        total = pa["x"].shape[0]
        idx = endless_indices(
            total, self.iteration * self.pa_slice, self.pa_slice,
            lambda cycle: torch.randperm(
                total, generator=stream(self.seed, "pre_attacked", cycle, self.rank)))
        x = augment_batch(as_float_images(pa["x"][idx].to(self.device)),
                          stream(self.seed, "pa_augment", self.iteration, self.rank))
        return x, pa["y"][idx].to(self.device), pa["label"][idx].to(self.device)

    def _write_results(self) -> None:
        """The final validation (detection AUCs included) as JSON beside the checkpoints."""
        if self.rank != 0:
            return
        results = {"iteration": self.iteration, "global_step": self.global_step,
                   "epoch": self.epoch, "validation": dict(self.last_validation),
                   "checkpoint": str(self.checkpoint_path)}
        path = write_text_atomic(self.output_dir / RESULTS_FILE,
                                 json.dumps(results, indent=2) + "\n")
        logger.info("final validation written to %s", path)

    def _reestimate_gamma_bn(self) -> None:
        if self.last_buffer is None:
            logger.warning("no training buffer yet: the gamma BN's running statistics are kept")
            return
        xs, minibatches = self.last_buffer
        with autocast_context(self.device, self.dtype):
            count = self.composite.reestimate_gamma_bn(xs[idx] for idx in minibatches)
        bn = self.composite.gamma_bn
        logger.info("gamma BN re-estimated on %d training mini-batches: running mean %.4f, var "
                    "%.4f", count, bn.running_mean.item(), bn.running_var.item())

    def _detection(self) -> dict[str, float]:
        """Held-out detection AUCs (rank 0 only; eval-mode forwards need no collectives)."""
        if self.n_detection == 0:
            return {}
        v, ts = self.validation, self.settings
        x, y = self.x_val[:self.n_detection], self.y_val[:self.n_detection]
        if self.x_det_fixed is None:
            self.x_det_fixed = fixed_attack_images(
                self.composite, x, y, alpha=ts.detection_alpha, eps=v.eps, norm=v.norm,
                n_iter=v.iterations, batch_size=ts.batch_size_test_per_gpu,
                device=self.device, dtype=self.dtype,
                generator=stream(self.seed, "detection_fixed"))
        return detection_metrics(
            self.composite, x, y, self.x_det_fixed, eps=v.eps, norm=v.norm, n_iter=v.iterations,
            bce_weight=v.detection_bce_weight, batch_size=ts.batch_size_test_per_gpu,
            device=self.device, dtype=self.dtype,
            generator=stream(self.seed, "detection_adaptive"))

    # -- one optimizer step ------------------------------------------------------------------
    def _all_true(self, flag: torch.Tensor) -> bool:
        """One host-device synchronisation (and one all-reduce) per optimizer step."""
        flag = flag.float()
        if self.world > 1:  # every process must take the same decision, or DDP would hang
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _optimizer_step(self, xs: torch.Tensor, ys: torch.Tensor, labels: torch.Tensor,
                        groups: list[torch.Tensor], stats: torch.Tensor,
                        scales: Optional[torch.Tensor] = None) -> None:
        """Forward/backward the mini-batches of one accumulation group and take one step.

        The finiteness of the losses is collected on the device and decided once per step: a
        non-finite loss makes the gradients non-finite and the step is skipped, so no mini-batch
        needs its own all-reduce and ``.item()``.
        """
        buffers = [b.detach().clone() for b in self._mixer_buffers()]
        losses_finite = torch.ones((), dtype=torch.bool, device=self.device)
        with self.composite.mode(True, scale_alpha=False):
            for j, idx in enumerate(groups):
                last = j == len(groups) - 1
                no_sync = (self.ddp_mixer.no_sync() if self.ddp_mixer is not None and not last
                           else contextlib.nullcontext())
                with no_sync:
                    with autocast_context(self.device, self.dtype):
                        out = self.composite(xs[idx], mixer=self.ddp_mixer)
                    loss = self.loss_fn(out.log_probs, out.gamma, ys[idx], labels[idx],
                                        scale=None if scales is None else scales[idx],
                                        accum_count=len(groups))
                    finite_loss = torch.isfinite(loss.detach())
                    losses_finite &= finite_loss
                    self.scaler.scale(loss).backward()
                gamma, label = out.gamma.detach().double(), labels[idx]
                adv, clean = label > 0.5, label <= 0.5
                zero = torch.zeros_like(gamma)
                batch_stats = torch.stack([
                    loss.detach().double() * len(groups), torch.ones_like(gamma[0]),
                    torch.where(adv, gamma, zero).sum(), adv.sum(), (adv & (gamma > 0)).sum(),
                    torch.where(clean, gamma, zero).sum(), clean.sum(),
                    (clean & (gamma <= 0)).sum()]).to(stats)
                # Masked by where (not multiplied): a NaN loss must not reach the statistics.
                stats[:8] += torch.where(finite_loss, batch_stats, torch.zeros_like(batch_stats))

        grad_norm = torch.zeros((), device=self.device)
        if self.scaler.is_enabled():
            # inf/NaN gradients are the scaler's business (it skips the step, lowers the scale).
            finite = self._all_true(losses_finite)
            if finite:
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.mixer.parameters(),
                                                           GRAD_CLIP_NORM)
        else:
            # Without a scaler, non-finite gradients mean the step is unusable (they leave the
            # norm non-finite; the clipped gradients are then discarded).
            grad_norm = torch.nn.utils.clip_grad_norm_(self.mixer.parameters(), GRAD_CLIP_NORM)
            finite = self._all_true(losses_finite & torch.isfinite(grad_norm))
        if not finite:
            self.nonfinite_streak += 1
            logger.warning("non-finite loss or gradient at iteration %d, optimizer step %d: step "
                           "skipped (%d in a row; the limit is %d)", self.iteration,
                           self.global_step, self.nonfinite_streak,
                           self.settings.max_nonfinite_steps)
            self.optimizer.zero_grad(set_to_none=True)
            # The forward passes already moved the BN running statistics towards the bad batch.
            for buf, saved in zip(self._mixer_buffers(), buffers):
                buf.copy_(saved)
            self.global_step += 1
            if self.nonfinite_streak >= self.settings.max_nonfinite_steps:
                raise TrainingDivergedError(
                    f"{self.nonfinite_streak} consecutive optimizer steps had a non-finite loss "
                    f"or gradient (last at iteration {self.iteration}, step "
                    f"{self.global_step}); stopping. The last good checkpoint is "
                    f"{self.checkpoint_path} (unchanged). Try a lower learning rate, bf16/fp32 "
                    f"precision, or check the data and base models")
            return
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale_before:
            with self.warmup.dampening():
                self.scheduler.step()
        else:
            logger.info("gradient scaler skipped step %d (overflow); learning-rate schedule held",
                        self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak = 0
        self.global_step += 1
        stats[8] += grad_norm.detach().float().to(stats.device)

    def _mixer_buffers(self) -> list[torch.Tensor]:
        return [*self.mixer.buffers(), *self.composite.gamma_bn.buffers()]

    # -- one iteration -----------------------------------------------------------------------
    def _train_iteration(self, x: torch.Tensor, y: torch.Tensor, x_extra: torch.Tensor,
                         y_extra: torch.Tensor) -> dict[str, float]:
        """Attack, build and shuffle the buffer, and take its optimizer steps."""
        x, y = x.to(self.device), y.to(self.device)
        # A CPU generator on every device: the attacks' random draws (starts, eps, w) are made on
        # the CPU and moved, so a GPU run trains on the same attacks as a CPU run of the seed.
        attack_gen = stream(self.seed, "attack", self.iteration, self.rank)
        # Iteration counts from a generator without the rank: every process runs as many
        # attack iterations as the others (DDP waits for the slowest at the next all-reduce).
        iterations_gen = stream(self.seed, "attack_iterations", self.iteration)
        with autocast_context(self.device, self.dtype):
            adversarial = generate_training_attacks(self.composite, x, y, self.attack_settings,
                                                    attack_gen, iterations_gen)
        n_clean = len(x) + len(x_extra)
        xs = torch.cat([x, x_extra.to(self.device), *adversarial])
        ys = torch.cat([y, y_extra.to(self.device), *([y] * len(adversarial))])
        labels = torch.cat([torch.zeros(n_clean), torch.ones(len(xs) - n_clean)]).to(self.device)
        scales = None
        if self.pre_attacked is not None:
            x_pa, y_pa, label_pa = self._pre_attacked_slice()
            clean_s, ada_s, pa_s = self.scales
            scales = torch.cat([torch.full((n_clean,), clean_s),
                                torch.full((len(xs) - n_clean,), ada_s),
                                torch.full((len(x_pa),), pa_s)]).to(self.device)
            xs = torch.cat([xs, x_pa])
            ys = torch.cat([ys, y_pa])
            labels = torch.cat([labels, label_pa])
        order = torch.randperm(len(xs), generator=stream(self.seed, "buffer", self.iteration,
                                                         self.rank)).to(self.device)
        minibatches = list(order.chunk(self.n_mini))
        self.last_buffer = (xs, minibatches)
        stats = torch.zeros(9, dtype=torch.float64, device=self.device)
        steps = 0
        for start in range(0, len(minibatches), self.accum):
            self._optimizer_step(xs, ys, labels, minibatches[start:start + self.accum], stats,
                                 scales)
            steps += 1
            if self.global_step >= self.total_steps:
                break
        if self.world > 1:
            dist.all_reduce(stats)
        s = stats.tolist()
        return {"loss": s[0] / max(s[1], 1), "gamma_adv": s[2] / max(s[3], 1),
                "p_gamma_pos_adv": s[4] / max(s[3], 1), "gamma_clean": s[5] / max(s[6], 1),
                "p_gamma_nonpos_clean": s[7] / max(s[6], 1),
                "grad_norm": s[8] / max(steps * self.world, 1)}

    def _log_iteration(self, metrics: dict[str, float], bar: Any) -> None:
        if self.rank != 0:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        scalars = {"train/loss": metrics["loss"], "train/gamma_mean_label1": metrics["gamma_adv"],
                   "train/gamma_mean_label0": metrics["gamma_clean"],
                   "train/p_gamma_pos_label1": metrics["p_gamma_pos_adv"],
                   "train/p_gamma_nonpos_label0": metrics["p_gamma_nonpos_clean"],
                   "train/lr": lr, "train/grad_scale": self.scaler.get_scale(),
                   "train/grad_norm": metrics["grad_norm"]}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, self.global_step)
        mixer_accuracy = (metrics["p_gamma_pos_adv"] + metrics["p_gamma_nonpos_clean"]) / 2
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}",
                        mixer_acc=f"{mixer_accuracy:.2f}")

    # -- the loop ----------------------------------------------------------------------------
    def _done(self) -> bool:
        return self.iteration >= self.total_iterations or self.global_step >= self.total_steps

    def fit(self) -> Path:
        """Train until the configured end (or the debug iterations); returns last.pt's path."""
        if self._done():
            logger.info("training already finished (%s); nothing to do", self.checkpoint_path)
            return self.checkpoint_path
        file_handler = self._open_logs()
        try:
            self._fit()
        finally:
            if self.writer is not None:
                self.writer.close()
            if file_handler is not None:
                logging.getLogger("adaptive_smoothing").removeHandler(file_handler)
                file_handler.close()
        return self.checkpoint_path

    def _open_logs(self) -> Optional[logging.Handler]:
        if self.rank != 0:
            return None
        from torch.utils.tensorboard import SummaryWriter
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops events a crashed run logged after its last checkpoint. The checkpoint
        # at step N is saved after step N's scalars (training and validation), so those stay:
        # purging from N would erase the validation at every resume point from the curves.
        self.writer = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR),
                                    purge_step=self.global_step + 1 if self.global_step else None)
        handler = logging.FileHandler(self.output_dir / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("adaptive_smoothing").addHandler(handler)
        ts = self.settings
        logger.info("training the mixer: %d iterations (%d per epoch) of %d clean + %d extra + %d "
                    "attacked images per process, %d processes, %d optimizer steps, %s on %s",
                    self.total_iterations, self.data.iterations_per_epoch, self.batch,
                    self.n_target * self.batch, (self.n_target + 1) * self.batch, self.world,
                    self.total_steps, self.dtype, self.device)
        logger.info("lr %g, weight decay %g, accum_grad %d, output %s", ts.lr, ts.weight_decay,
                    ts.accum_grad, self.output_dir)
        if self.pre_attacked is not None:
            logger.info("plus %d pre-attacked images per buffer (clean batch %d = batch * 5 // "
                        "%d blocks)", self.pa_slice, self.batch, self.pre_attacked["blocks"])
        return handler

    def _fit(self) -> None:
        eval_every = self.settings.eval_freq.iter
        eval_epochs = self.settings.eval_freq.epoch
        bar = tqdm(total=self.planned_iterations, initial=self.iteration, disable=self.rank != 0,
                   desc="mixer training", dynamic_ncols=True)
        checkpointed = False
        with bar:
            while not self._done():
                batches = self.data.epoch(self.epoch, self.iteration_in_epoch)
                for x, y, x_extra, y_extra in batches:
                    metrics = self._train_iteration(x, y, x_extra, y_extra)
                    self.iteration += 1
                    self.iteration_in_epoch += 1
                    epoch_end = self.iteration_in_epoch == self.data.iterations_per_epoch
                    if epoch_end:
                        self.epoch, self.iteration_in_epoch = self.epoch + 1, 0
                    self._log_iteration(metrics, bar)
                    bar.update(1)
                    checkpointed = False
                    if ((eval_every is not None and self.iteration % eval_every == 0)
                            or (epoch_end and self.epoch % eval_epochs == 0)):
                        self._checkpoint()
                        checkpointed = True
                    if self._done() or epoch_end:
                        break
            if not checkpointed:
                self._checkpoint()
        self._write_results()
        logger.info("training finished after %d iterations, %d optimizer steps: %s",
                    self.iteration, self.global_step, self.checkpoint_path)


# -- from a config: the one place that reads it --------------------------------------------------
# The resume identity lives here, beside the unpacking, because it is a statement about the
# config's keys (which of them shape the trained weights); the Trainer only compares identities,
# and checkpoints.py (file formats) knows nothing of the config.
#
# Config keys that do not shape the trained weights: where things are written and read from
# (contents are compared by fingerprint instead), what is validated and reported, and keys the
# training does not read. Everything else must match to resume.
_NOT_SHAPING_WEIGHTS = (
    "log_dir", "log_path", "model_load_path", "evaluation_settings", "dataset_settings.path",
    "dataset_settings.pa_path",
    "forward_settings.parallel", "forward_settings.ema_decay", "training_settings.eval_freq",
    "training_settings.n_val_examples", "training_settings.val_start",
    "training_settings.batch_size_test_per_gpu",
    "training_settings.save_eval_imgs", "training_settings.max_nonfinite_steps",
    "training_settings.use_fast_loader", "training_settings.gamma_consts.eval",
    "training_settings.n_detection_examples", "training_settings.detection_alpha",
    # How it computes, like the device: a resume in fp16 after bf16 (e.g. on another GPU) is
    # the same training.
    "training_settings.precision", "training_settings.channels_last", "training_settings.compile",
    "pgd_settings.iters_test", "pgd_settings.alpha_test", "pgd_settings.use_aa",
    "pgd_settings.pgd_eval_loss", "pgd_settings.attacks_to_run",
    "randomized_attack_settings.randomize",
    # Read by evaluation only (training refuses a nonlinear composite: it has nothing to train).
    "nonlinear_settings")
_FINGERPRINT_KEYS = {"model_load_path.std": "the STD checkpoint's content",
                     "model_load_path.rob": "the ROB checkpoint's content",
                     "model_load_path.comp": "the initial mixer checkpoint's content",
                     "dataset_settings.train_data": "the training data's content",
                     "dataset_settings.pa_data": "the pre-attacked data's content"}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def _shapes_weights(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in _NOT_SHAPING_WEIGHTS)


def _in_identity(key: str) -> bool:
    """Whether ``key`` of a recorded identity still counts: one that a checkpoint recorded but
    that has joined ``_NOT_SHAPING_WEIGHTS`` since must not block its resume as a change."""
    return key in _FINGERPRINT_KEYS or _shapes_weights(key)


def training_identity(config: Config) -> dict[str, Any]:
    """Everything that shapes the trained weights: the config keys (dotted) except those of
    ``_NOT_SHAPING_WEIGHTS``, plus content fingerprints of the base/initial-mixer checkpoints
    and of the training data (under the keys of ``_FINGERPRINT_KEYS``)."""
    identity = {k: v for k, v in _flatten(config_to_dict(config)).items() if _shapes_weights(k)}
    for which, path in checkpoint_paths(config).items():
        identity[f"model_load_path.{which}"] = optional_file_sha256(path)
    ds = config.dataset_settings
    data = None
    if ds.format == "npz":
        split = "test" if ds.train_with_test else "train"
        path = Path(ds.path)
        data = optional_file_sha256(path if path.is_file() else path / f"{split}.npz")
    # Folders (torchvision, imagefolder) are too large to hash on every start: their path stands
    # in for their content.
    identity["dataset_settings.train_data"] = data or f"path {ds.path}"
    if ds.pa_path is not None:
        pa = Path(ds.pa_path)
        identity["dataset_settings.pa_data"] = (optional_file_sha256(pa) if pa.is_file()
                                                else f"path {ds.pa_path}")
    return _json_safe(identity)


def _recorded_config_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config part of the identity, from a checkpoint's recorded config (file layout)."""
    return {k: v for k, v in _flatten(_json_safe(dict(config))).items() if _shapes_weights(k)}


def _json_safe(tree: Any) -> Any:
    """Tuples -> lists, so that identities compare equal after a checkpoint round trip."""
    if isinstance(tree, dict):
        return {k: _json_safe(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_json_safe(v) for v in tree]
    return tree


def _describe_change(key: str, old: Any, new: Any) -> str:
    if key in _FINGERPRINT_KEYS:
        short = [v[:12] if isinstance(v, str) else v for v in (old, new)]
        return f"{key} ({_FINGERPRINT_KEYS[key]}): {short[0]} -> {short[1]}"
    return f"{key}: {old!r} -> {new!r}"


def build_trainer(config: Config, *, resume: bool = True, debug: bool = False,
                  train_set: Optional[Dataset] = None,
                  val_set: Union[Dataset, tuple[torch.Tensor, torch.Tensor], None] = None,
                  allow_config_change: Iterable[str] = ()) -> Trainer:
    """The :class:`Trainer` that ``config`` describes: joins the process group under torchrun,
    loads the pre-attacked data (``pa_path``), builds the composite on this process's device
    (base weights loaded, the mixer initialised from the seed or ``model_load_path.comp``) and
    the datasets, and passes them with the config's sections.

    ``train_set`` / ``val_set`` replace the datasets the config names (tests, custom data); see
    :class:`Trainer`. A ``val_set`` given here is used from its first image
    (``training_settings.val_start`` selects within the config's test set only). ``resume``, ``debug``, ``allow_config_change``: as in :func:`run_training`.
    """
    fwd, ds, pgd = config.forward_settings, config.dataset_settings, config.pgd_settings
    _, _, device = init_distributed(config.run.device)
    pre_attacked = None
    if ds.pa_path is not None:
        pre_attacked = load_pre_attacked(ds.pa_path, ds.gamma_0, ds.blocks, source=config.source)

    if not fwd.use_policy:
        raise ConfigError("expected true: training needs the mixing network",
                          key="forward_settings.use_policy", value=False, file=config.source)
    if config.nonlinear_settings.enabled:
        raise ConfigError("expected false: the nonlinear composite has no mixing network to "
                          "train; calibrate it with scripts/calibrate.py and evaluate it with "
                          "run.py --eval", key="nonlinear_settings.enabled", value=True,
                          file=config.source)
    require_checkpoint_files(config)
    torch.manual_seed(config.seed)  # the mixer's initial weights follow the seed
    composite = build_composite(fwd, ds.num_classes, device, source=config.source)
    load_composite_weights(composite, config)

    if train_set is None:
        train_set = build_dataset(ds.name, "test" if ds.train_with_test else "train",
                                  ds.format, ds.path, augment=False)
    if val_set is None:
        val_set = build_dataset(ds.name, "test", ds.format, ds.path, augment=False)
        start = config.training_settings.val_start
        if start >= len(val_set):
            raise ConfigError(f"expected less than the {len(val_set)} test images",
                              key="training_settings.val_start", value=start, file=config.source)
        val_set = Subset(val_set, range(start, len(val_set)))
    attack = config.randomized_attack_settings
    validation = ValidationAttack(
        eps=pgd.eps, norm=pgd.norm, iterations=pgd.iters_test,
        n_target=attack.n_target if "apgd-t" in pgd.attacks_to_run else 0,
        use_apgd=pgd.use_aa, pgd_step_size=pgd.alpha_test,
        pgd_loss="dlr" if pgd.pgd_eval_loss == "dlr" else "ce",
        pgd_bce_weight=0.5 if pgd.pgd_eval_loss == "comp_simple" else 0.0,
        detection_bce_weight=config.evaluation_settings.adaptive_attack_weight)
    return Trainer(composite, train_set, val_set, settings=config.training_settings,
                   attack=attack, validation=validation, seed=config.seed,
                   output_dir=config.run.output_dir, device=device,
                   identity=training_identity(config), config_record=config_to_dict(config),
                   shuffle=ds.train_shuffle, pre_attacked=pre_attacked, resume=resume,
                   debug=debug, allow_config_change=allow_config_change)


def run_training(config: Config, *, resume: bool = True, debug: bool = False,
                 allow_config_change: Iterable[str] = ()) -> Path:
    """Train the mixing network as ``config`` describes (docs/METHOD.md, "Training").

    Args:
        resume: continue from ``output_dir/checkpoints/last.pt`` when it exists.
        debug: two iterations end to end (attacks, optimizer steps, validation on a few images,
            checkpoint) into ``output_dir/debug``, then stop.
        allow_config_change: dotted config keys that may differ from the checkpoint's on
            resume (applied, and recorded in the checkpoint's ``config_changes``).

    Returns:
        The path of the final checkpoint (``output_dir/checkpoints/last.pt``).

    The output folder is locked for the run's life: a second run into it is refused.
    """
    with distributed_session(config.run.device) as (rank, _, _):
        output_dir = Path(config.run.output_dir)
        lock = RunLock(output_dir / DEBUG_DIR if debug else output_dir) if rank == 0 else None
        if lock is not None:
            lock.acquire()
        try:
            return build_trainer(config, resume=resume, debug=debug,
                                 allow_config_change=allow_config_change).fit()
        finally:
            if lock is not None:
                lock.release()
