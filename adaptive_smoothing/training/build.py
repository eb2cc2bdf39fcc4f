"""From a prepared run to a trained mixer: the one place training reads the configuration.

Configuration flows one way: :func:`run_training` turns the config into a
:class:`~adaptive_smoothing.prepare.Run` (prepare.py), :func:`build_trainer` builds from the run,
and the :class:`~adaptive_smoothing.training.loop.Trainer` takes the built composite, the data
and the settings sections as explicit arguments.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch.utils.data import Dataset, Subset

from adaptive_smoothing.config import Config, ConfigError, provenance
from adaptive_smoothing.data import build_dataset
from adaptive_smoothing.factory import build_composite, load_composite_weights
from adaptive_smoothing.fingerprint import optional_file_sha256
from adaptive_smoothing.prepare import Run, prepared
from adaptive_smoothing.pre_attack import load_pre_attacked
from adaptive_smoothing.rundir import RunLock
from adaptive_smoothing.runtime import distributed_rank_world
from adaptive_smoothing.training.loop import DEBUG_DIR, Trainer
from adaptive_smoothing.training.monitor import ValidationAttack

logger = logging.getLogger(__name__)

__all__ = ["build_trainer", "run_training", "training_identity"]


def training_identity(run: Run) -> dict[str, Any]:
    """Everything that shapes the trained weights: the config keys declared to
    (config/provenance.py), the checkpoints' content fingerprints, and the training data's."""
    ds = run.dataset
    data = None
    if ds.format == "npz":
        split = "test" if ds.train_with_test else "train"
        path = Path(ds.path)
        data = optional_file_sha256(path if path.is_file() else path / f"{split}.npz")
    # Folders (torchvision, imagefolder) are too large to hash on every start: their path stands
    # in for their content.
    identity = dict(run.weights_identity)
    identity[provenance.FINGERPRINT_PREFIX + "train_data"] = data or f"path {ds.path}"
    if ds.pa_path is not None:
        pa = Path(ds.pa_path)
        identity[provenance.FINGERPRINT_PREFIX + "pa_data"] = (
            optional_file_sha256(pa) if pa.is_file() else f"path {ds.pa_path}")
    return identity


def build_trainer(run: Run, *, resume: bool = True, debug: bool = False,
                  train_set: Optional[Dataset] = None,
                  val_set: Union[Dataset, tuple[torch.Tensor, torch.Tensor], None] = None,
                  allow_config_change: Iterable[str] = ()) -> Trainer:
    """The :class:`Trainer` of a prepared run: loads the pre-attacked data (``pa_path``), builds
    the composite on the run's device (base weights loaded, the mixer initialised from the seed
    or ``model_load_path.comp``) and the datasets, and passes them with the run's sections.

    ``train_set`` / ``val_set`` replace the datasets the config names (tests, custom data); see
    :class:`Trainer`. A ``val_set`` given here is used from its first image
    (``training_settings.val_start`` selects within the config's test set only). ``resume``,
    ``debug``, ``allow_config_change``: as in :func:`run_training`.
    """
    fwd, ds, pgd, source = run.forward, run.dataset, run.pgd, run.source
    pre_attacked = None
    if ds.pa_path is not None:
        pre_attacked = load_pre_attacked(ds.pa_path, ds.gamma_0, ds.blocks, source=source)

    if not fwd.use_policy:
        raise ConfigError("expected true: training needs the mixing network",
                          key="forward_settings.use_policy", value=False, file=source)
    if run.nonlinear.enabled:
        raise ConfigError("expected false: the nonlinear composite has no mixing network to "
                          "train; calibrate it with scripts/calibrate.py and evaluate it with "
                          "run.py --eval", key="nonlinear_settings.enabled", value=True,
                          file=source)
    torch.manual_seed(run.seed)  # the mixer's initial weights follow the seed
    composite = build_composite(fwd, ds.num_classes, run.device, source=source)
    load_composite_weights(composite, run.checkpoints)

    if train_set is None:
        train_set = build_dataset(ds.name, "test" if ds.train_with_test else "train",
                                  ds.format, ds.path, augment=False)
    if val_set is None:
        val_set = build_dataset(ds.name, "test", ds.format, ds.path, augment=False)
        start = run.training.val_start
        if start >= len(val_set):
            raise ConfigError(f"expected less than the {len(val_set)} test images",
                              key="training_settings.val_start", value=start, file=source)
        val_set = Subset(val_set, range(start, len(val_set)))
    attack = run.attack
    validation = ValidationAttack(
        eps=pgd.eps, norm=pgd.norm, iterations=pgd.iters_test,
        n_target=attack.n_target if "apgd-t" in pgd.attacks_to_run else 0,
        use_apgd=pgd.use_aa, pgd_step_size=pgd.alpha_test,
        pgd_loss="dlr" if pgd.pgd_eval_loss == "dlr" else "ce",
        pgd_bce_weight=(run.evaluation.adaptive_attack_weight if pgd.pgd_eval_loss == "comp"
                        else 0.0),
        detection_bce_weight=run.evaluation.adaptive_attack_weight)
    return Trainer(composite, train_set, val_set, settings=run.training,
                   attack=attack, validation=validation, seed=run.seed,
                   output_dir=run.output_dir, device=run.device,
                   identity=training_identity(run), config_record=run.config_record,
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
    with prepared(config) as run:
        rank, _ = distributed_rank_world()
        output_dir = run.output_dir
        lock = RunLock(output_dir / DEBUG_DIR if debug else output_dir) if rank == 0 else None
        if lock is not None:
            lock.acquire()
        try:
            return build_trainer(run, resume=resume, debug=debug,
                                 allow_config_change=allow_config_change).fit()
        finally:
            if lock is not None:
                lock.release()
