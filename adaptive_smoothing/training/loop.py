"""The mixer's training loop (docs/METHOD.md, "Training"); docs/TRAINING.md is the user's guide.

One *iteration* takes B clean training images and builds the buffer

    B clean (label 0) + n_target * B extra clean (label 0) + (1 + n_target) * B attacked (label 1)

then shuffles it, splits it into 2 * (n_target + 1) mini-batches of B images and takes one
optimizer step per ``accum_grad`` mini-batches. Only the mixing network's parameters (and the BN
statistics of the mixer and of gamma) change; the base models are frozen and checked to be.

Reproducibility: every random choice of an iteration (data order, augmentation, attack draws,
buffer shuffle) comes from a generator seeded by ``(seed, purpose, epoch or iteration, rank)``
(seeding.py; the batches are data.py's), so a checkpoint at an iteration boundary resumes
exactly (resume.py). What the run reports (validation, detection, TensorBoard, the log file) is
the :class:`~adaptive_smoothing.training.monitor.Monitor`'s; an iteration's statistics are
:class:`~adaptive_smoothing.training.steps.StepStatistics`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import pytorch_warmup
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from adaptive_smoothing.errors import UserError
from adaptive_smoothing.attacks import (RandomizedAttackSettings, curriculum_settings,
                                        generate_training_attacks)
from adaptive_smoothing.config import TrainingSettings
from adaptive_smoothing.data import (IterationData, as_float_images, augment_batch,
                                     endless_indices, load_tensors)
from adaptive_smoothing.losses import CompLoss
from adaptive_smoothing.models import CompositeModel
from adaptive_smoothing.models.composite import base_weight_sums
from adaptive_smoothing.pre_attack import PreAttacked
from adaptive_smoothing.runtime import (autocast_context, barrier, distributed_rank_world,
                                        prepare_model, resolve_precision)
from adaptive_smoothing.seeding import stream
from adaptive_smoothing.training.monitor import Monitor, ValidationAttack
from adaptive_smoothing.training.resume import (CHECKPOINT_DIR, LAST_CHECKPOINT, Position,
                                                save_checkpoints, training_state)
from adaptive_smoothing.training.resume import resume as resume_from
from adaptive_smoothing.training.steps import StepStatistics

logger = logging.getLogger(__name__)

__all__ = ["DEBUG_DIR", "Trainer", "TrainingDivergedError", "optimizer_steps_per_iteration"]

DEBUG_DIR = "debug"
GRAD_CLIP_NORM = 10.0          # docs/METHOD.md, "Training" step 4
WARMUP_FRACTION = 25           # exponential warm-up over the first 1/25 of the optimizer steps
DEBUG_ITERATIONS = 2
DEBUG_VAL_EXAMPLES = 8


class TrainingDivergedError(UserError, RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


def optimizer_steps_per_iteration(n_target: int, accum_grad: int) -> int:
    """Optimizer steps per buffer of 2 * (n_target + 1) mini-batches (accum_grad -1: one)."""
    n_mini = 2 * (n_target + 1)
    return 1 if accum_grad == -1 else math.ceil(n_mini / accum_grad)


# -- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """The mixer's training loop. ``Trainer(...).fit()`` trains and returns last.pt's path;
    :func:`~adaptive_smoothing.training.build.build_trainer` makes one from a prepared run.

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
        self.monitor = Monitor(
            self.composite, self.x_val, self.y_val, attack=validation,
            n_detection=ts.n_detection_examples, detection_alpha=ts.detection_alpha,
            batch_size=ts.batch_size_test_per_gpu, seed=seed, rank=self.rank, device=device,
            dtype=self.dtype, output_dir=self.output_dir)
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
        self.warmup_period = max(1, self.total_steps // WARMUP_FRACTION)
        self.warmup = pytorch_warmup.ExponentialWarmup(self.optimizer,
                                                       warmup_period=self.warmup_period)
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

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def position(self) -> Position:
        return Position(self.epoch, self.iteration_in_epoch, self.iteration, self.global_step,
                        self.nonfinite_streak)

    def _state(self) -> dict[str, Any]:
        return training_state(
            self.composite, optimizer=self.optimizer, scheduler=self.scheduler,
            warmup=self.warmup, scaler=self.scaler, position=self.position,
            iterations_per_epoch=self.data.iterations_per_epoch, total_steps=self.total_steps,
            world=self.world, validation=self.last_validation, config_record=self.config_record,
            identity=self.identity, config_changes=self.config_changes)

    def _load(self, path: Path) -> None:
        ts = self.settings
        resumed = resume_from(
            path, self.composite, optimizer=self.optimizer, scheduler=self.scheduler,
            warmup=self.warmup, scaler=self.scaler, identity=self.identity,
            allow_config_change=self.allow_config_change, lr=ts.lr,
            weight_decay=ts.weight_decay, iterations_per_epoch=self.data.iterations_per_epoch,
            total_steps=self.total_steps, warmup_period=self.warmup_period, world=self.world)
        p = resumed.position
        self.epoch, self.iteration_in_epoch = p.epoch, p.iteration_in_epoch
        self.iteration, self.global_step = p.iteration, p.global_step
        self.nonfinite_streak = p.nonfinite_streak
        self.last_validation = resumed.validation
        self.config_changes = resumed.config_changes

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
        if self.settings.reestimate_gamma_bn and self.composite.gamma_norm == "batchnorm":
            self._reestimate_gamma_bn()
        self._sync_gamma_bn()
        self.last_validation = self.monitor.validate(self.global_step)
        if self.rank == 0:
            epoch_end = self.iteration_in_epoch == 0 and self.epoch > 0 and not self.debug
            save_checkpoints(self._state(), self.composite, self.checkpoint_path,
                             epoch_end=epoch_end)
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

    # -- one optimizer step ------------------------------------------------------------------
    def _all_true(self, flag: torch.Tensor) -> bool:
        """One host-device synchronisation (and one all-reduce) per optimizer step."""
        flag = flag.float()
        if self.world > 1:  # every process must take the same decision, or DDP would hang
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _optimizer_step(self, xs: torch.Tensor, ys: torch.Tensor, labels: torch.Tensor,
                        groups: list[torch.Tensor],
                        scales: Optional[torch.Tensor] = None) -> StepStatistics:
        """Forward/backward the mini-batches of one accumulation group, take one step and
        return its statistics (on the device).

        The finiteness of the losses is collected on the device and decided once per step: a
        non-finite loss makes the gradients non-finite and the step is skipped, so no mini-batch
        needs its own all-reduce and ``.item()``.
        """
        buffers = [b.detach().clone() for b in self._mixer_buffers()]
        losses_finite = torch.ones((), dtype=torch.bool, device=self.device)
        stats = StepStatistics.zeros(self.device)
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
                stats = stats.add(StepStatistics.of_minibatch(
                    loss, out.gamma, labels[idx], len(groups), finite_loss))

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
            return stats
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
        return stats.with_grad_norm(grad_norm)

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
        # The curriculum follows the global step alone, which a checkpoint restores: a resumed
        # run attacks as the uninterrupted one.
        attack = curriculum_settings(self.attack_settings, self.global_step)
        with autocast_context(self.device, self.dtype):
            adversarial = generate_training_attacks(self.composite, x, y, attack, attack_gen,
                                                    iterations_gen)
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
        if self.settings.loss_images == "decisive":
            scales = self._decisive_scales(xs, ys, labels, scales)
        order = torch.randperm(len(xs), generator=stream(self.seed, "buffer", self.iteration,
                                                         self.rank)).to(self.device)
        minibatches = list(order.chunk(self.n_mini))
        self.last_buffer = (xs, minibatches)
        stats = StepStatistics.zeros(self.device)
        steps = 0
        for start in range(0, len(minibatches), self.accum):
            stats = stats.add(self._optimizer_step(
                xs, ys, labels, minibatches[start:start + self.accum], scales))
            steps += 1
            if self.global_step >= self.total_steps:
                break
        if self.world > 1:
            stats = stats.all_reduced()
        return stats.metrics(steps, self.world)

    @torch.no_grad()
    def _decisive_scales(self, xs: torch.Tensor, ys: torch.Tensor, labels: torch.Tensor,
                         scales: Optional[torch.Tensor]) -> torch.Tensor:
        """The per-sample loss scales with every image where not exactly one base model is
        right set to 0 (``training_settings.loss_images: decisive``; docs/TRAINING.md). Where
        both models are right, any alpha classifies the image correctly (the mixture of two
        distributions that both rank y first ranks y first); where both are wrong, almost no
        alpha helps: only on the others does the mixer decide the outcome."""
        if scales is None:
            scales = self.loss_fn.group_scales(labels)
        right = []
        for model in (self.composite.std_model, self.composite.rob_model):
            with autocast_context(self.device, self.dtype):
                predictions = torch.cat([model(chunk).argmax(1)
                                         for chunk in xs.chunk(self.n_mini)])
            right.append(predictions == ys)
        return scales * (right[0] != right[1]).to(scales.dtype)

    def _log_iteration(self, metrics: dict[str, float], bar: Any) -> None:
        if self.rank != 0:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self.monitor.log_iteration(metrics, lr=lr, grad_scale=self.scaler.get_scale(),
                                   global_step=self.global_step)
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
        self.monitor.open(self.global_step)
        try:
            self._log_plan()
            self._fit()
        finally:
            self.monitor.close()
        return self.checkpoint_path

    def _log_plan(self) -> None:
        if self.rank != 0:
            return
        ts = self.settings
        logger.info("training the mixer: %d iterations (%d per epoch) of %d clean + %d extra + %d "
                    "attacked images per process, %d processes, %d optimizer steps, %s on %s",
                    self.total_iterations, self.data.iterations_per_epoch, self.batch,
                    self.n_target * self.batch, (self.n_target + 1) * self.batch, self.world,
                    self.total_steps, self.dtype, self.device)
        logger.info("lr %g, weight decay %g, accum_grad %d, output %s", ts.lr, ts.weight_decay,
                    ts.accum_grad, self.output_dir)
        if self.attack_settings.curriculum_steps:
            logger.info("attack curriculum: the training attacks' comp_loss_wmax and eps ramp "
                        "linearly from 0 over the first %d optimizer steps",
                        self.attack_settings.curriculum_steps)
        if self.pre_attacked is not None:
            logger.info("plus %d pre-attacked images per buffer (clean batch %d = batch * 5 // "
                        "%d blocks)", self.pa_slice, self.batch, self.pre_attacked["blocks"])

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
        self.monitor.write_results(iteration=self.iteration, global_step=self.global_step,
                                   epoch=self.epoch, validation=self.last_validation,
                                   checkpoint=self.checkpoint_path)
        logger.info("training finished after %d iterations, %d optimizer steps: %s",
                    self.iteration, self.global_step, self.checkpoint_path)
