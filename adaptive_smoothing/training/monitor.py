"""What the training reports, apart from the checkpoints: the periodic validation (validation.py)
and held-out detection AUCs (detection.py), TensorBoard scalars, the log file and
training_results.json (docs/TRAINING.md, "Validation", "Monitoring").

The :class:`Monitor` measures and writes; the Trainer decides when. Only rank 0 writes files;
the validation runs on every process (its sums are all-reduced), the detection on rank 0 alone
(eval-mode forwards need no collectives).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from adaptive_smoothing.attacks import Norm
from adaptive_smoothing.detection import detection_metrics, fixed_attack_images
from adaptive_smoothing.losses import AttackLossName
from adaptive_smoothing.models import CompositeModel
from adaptive_smoothing.persist import write_text_atomic
from adaptive_smoothing.seeding import stream
from adaptive_smoothing.validation import validate

logger = logging.getLogger(__name__)

__all__ = ["LOG_FILE", "Monitor", "RESULTS_FILE", "TENSORBOARD_DIR", "ValidationAttack"]

TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "train.log"
RESULTS_FILE = "training_results.json"


@dataclass(frozen=True)
class ValidationAttack:
    """The attacks of the periodic validation (:func:`~adaptive_smoothing.validation.validate`)
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


class Monitor:
    """Validation, detection and the training's logs for one process.

    Args:
        composite: the composite being trained.
        x_val / y_val: the validation images and labels; the detection uses the first
            ``n_detection`` of them.
        attack: the validation's and the detection's attacks.
        detection_alpha: the fixed mixture's alpha of the detection's fixed attack.
        batch_size: the attacks' batch size.
        seed / rank: the run's seed and this process's rank (seeding.py streams).
        device / dtype: where and in which precision the attacks run.
        output_dir: where the TensorBoard events, the log file and the results go.
    """

    def __init__(self, composite: CompositeModel, x_val: torch.Tensor, y_val: torch.Tensor, *,
                 attack: ValidationAttack, n_detection: int, detection_alpha: float,
                 batch_size: int, seed: int, rank: int, device: torch.device,
                 dtype: torch.dtype, output_dir: Path) -> None:
        self.composite, self.x_val, self.y_val = composite, x_val, y_val
        self.attack, self.detection_alpha, self.batch_size = attack, detection_alpha, batch_size
        self.n_detection = min(n_detection, len(x_val))
        self.seed, self.rank, self.device, self.dtype = seed, rank, device, dtype
        self.output_dir = output_dir
        # The detection's fixed-attack images do not depend on the mixer: made once per run.
        self.x_det_fixed: Optional[torch.Tensor] = None
        self.writer: Any = None
        self._log_handler: Optional[logging.Handler] = None

    # -- the files -----------------------------------------------------------------------------
    def open(self, global_step: int) -> None:
        """Start the TensorBoard writer and the log file (rank 0), at ``global_step``."""
        if self.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops events a crashed run logged after its last checkpoint. The checkpoint
        # at step N is saved after step N's scalars (training and validation), so those stay:
        # purging from N would erase the validation at every resume point from the curves.
        self.writer = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR),
                                    purge_step=global_step + 1 if global_step else None)
        handler = logging.FileHandler(self.output_dir / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("adaptive_smoothing").addHandler(handler)
        self._log_handler = handler

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._log_handler is not None:
            logging.getLogger("adaptive_smoothing").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def log_iteration(self, metrics: dict[str, float], *, lr: float, grad_scale: float,
                      global_step: int) -> None:
        """An iteration's training statistics (StepStatistics.metrics) as TensorBoard scalars."""
        if self.rank != 0:
            return
        scalars = {"train/loss": metrics["loss"], "train/gamma_mean_label1": metrics["gamma_adv"],
                   "train/gamma_mean_label0": metrics["gamma_clean"],
                   "train/p_gamma_pos_label1": metrics["p_gamma_pos_adv"],
                   "train/p_gamma_nonpos_label0": metrics["p_gamma_nonpos_clean"],
                   "train/lr": lr, "train/grad_scale": grad_scale,
                   "train/grad_norm": metrics["grad_norm"]}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step)

    # -- the measurements ----------------------------------------------------------------------
    def validate(self, global_step: int) -> dict[str, float]:
        """Validate (every process) and, on rank 0, add the detection AUCs, log and write them
        as TensorBoard scalars at ``global_step``; returns the numbers."""
        v = self.attack
        result = validate(
            self.composite, self.x_val, self.y_val, eps=v.eps, norm=v.norm, n_iter=v.iterations,
            n_target=v.n_target, device=self.device, dtype=self.dtype,
            batch_size=self.batch_size, generator=stream(self.seed, "validate", self.rank),
            use_apgd=v.use_apgd, pgd_step_size=v.pgd_step_size, pgd_loss=v.pgd_loss,
            pgd_bce_weight=v.pgd_bce_weight)
        if self.rank != 0:
            return result
        result.update(self._detection())
        logger.info("validation at step %d (%d images): clean %.2f%%, robust %.2f%%, gamma "
                    "clean %.3f / attacked %.3f", global_step, int(result["n"]),
                    100 * result["clean_acc"], 100 * result["robust_acc"],
                    result["gamma_clean"], result["gamma_adv"])
        if "auc_adaptive" in result:
            logger.info("detection (%d held-out images): AUC of gamma, clean vs attacked: "
                        "fixed attack %.3f, adaptive attack %.3f; mean alpha clean %.3f, "
                        "fixed-attacked %.3f, adaptive-attacked %.3f", self.n_detection,
                        result["auc_fixed"], result["auc_adaptive"], result["det_alpha_clean"],
                        result["det_alpha_fixed"], result["det_alpha_adaptive"])
        for key, value in result.items():
            if key != "n":
                self.writer.add_scalar(f"val/{key}", value, global_step)
        self.writer.flush()
        return result

    def _detection(self) -> dict[str, float]:
        """Held-out detection AUCs (rank 0 only)."""
        if self.n_detection == 0:
            return {}
        v = self.attack
        x, y = self.x_val[:self.n_detection], self.y_val[:self.n_detection]
        if self.x_det_fixed is None:
            self.x_det_fixed = fixed_attack_images(
                self.composite, x, y, alpha=self.detection_alpha, eps=v.eps, norm=v.norm,
                n_iter=v.iterations, batch_size=self.batch_size, device=self.device,
                dtype=self.dtype, generator=stream(self.seed, "detection_fixed"))
        return detection_metrics(
            self.composite, x, y, self.x_det_fixed, eps=v.eps, norm=v.norm, n_iter=v.iterations,
            bce_weight=v.detection_bce_weight, batch_size=self.batch_size, device=self.device,
            dtype=self.dtype, generator=stream(self.seed, "detection_adaptive"))

    def write_results(self, *, iteration: int, global_step: int, epoch: int,
                      validation: dict[str, float], checkpoint: Path) -> None:
        """The final validation (detection AUCs included) as JSON beside the checkpoints."""
        if self.rank != 0:
            return
        results = {"iteration": iteration, "global_step": global_step, "epoch": epoch,
                   "validation": dict(validation), "checkpoint": str(checkpoint)}
        path = write_text_atomic(self.output_dir / RESULTS_FILE,
                                 json.dumps(results, indent=2) + "\n")
        logger.info("final validation written to %s", path)
