"""A validated config -> one resolved run (docs/DESIGN.md, "One run").

:func:`prepare` is the one place below the command line that reads a whole
:class:`~adaptive_smoothing.config.Config`. Inside the distributed session it resolves, once,
what training and evaluation would otherwise each work out again: this process's device, the
checkpoint files (and that they exist), their content fingerprints, the provenance of the run,
and the data format (``auto``). Training and evaluation take the :class:`Run` and pass its sections and
paths on as explicit arguments.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from adaptive_smoothing.attacks import RandomizedAttackSettings
from adaptive_smoothing.config import (Config, DatasetSettings, EvaluationSettings,
                                       ForwardSettings, ModelLoadPath, NonlinearSettings,
                                       PgdSettings, TrainingSettings, config_to_dict, provenance)
from adaptive_smoothing.data import resolve_format
from adaptive_smoothing.fingerprint import optional_file_sha256
from adaptive_smoothing.models.robustbench_zoo import (DATASET_BY_CLASSES, ZOO_THREAT_MODEL,
                                                       is_zoo_name, zoo_model_name)
from adaptive_smoothing.published import std_alternative, weight_file_for
from adaptive_smoothing.runtime import distributed_session, init_distributed, resolve_precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointFiles:
    """The weight files a composite is loaded from.

    ``std`` / ``rob``: the base models' files; for a ``robustbench:<Name>`` base, robustbench's
    own file (loaded with the model; named in ``zoo``). ``comp``: the mixer's file, None where
    there is none to load (none set, no mixing network, or a nonlinear composite).
    """

    std: Path
    rob: Path
    comp: Optional[Path]
    zoo: frozenset[str] = frozenset()

    def as_dict(self) -> dict[str, Optional[Path]]:
        return {"std": self.std, "rob": self.rob, "comp": self.comp}


@dataclass(frozen=True)
class Run:
    """Everything a training or an evaluation needs, resolved once by :func:`prepare`."""

    source: Optional[str]  # the config file, for messages
    seed: int
    device: torch.device
    output_dir: Path
    forward: ForwardSettings
    nonlinear: NonlinearSettings
    dataset: DatasetSettings
    training: TrainingSettings
    pgd: PgdSettings
    attack: RandomizedAttackSettings
    evaluation: EvaluationSettings
    checkpoints: CheckpointFiles
    eval_dtype: torch.dtype  # evaluation_settings.precision on this device
    fingerprints: Mapping[str, Optional[str]]  # of the checkpoint files: std, rob, comp
    weights_identity: Mapping[str, Any]  # the config keys that shape trained weights, + prints
    model_record: Mapping[str, Any]  # what evaluation reports as the evaluated model
    config_record: Mapping[str, Any] = field(repr=False)  # the file layout, saved with weights

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes


def prepare(config: Config) -> Run:
    """Resolve ``config`` into a :class:`Run` on this process (call inside
    :func:`prepared`, or where the process group, if any, is already joined)."""
    _, _, device = init_distributed(config.run.device)
    # A setting this machine cannot honour is reported before any file is looked for.
    eval_dtype = resolve_precision(config.evaluation_settings.precision, device)
    checkpoints = resolve_checkpoints(config)
    # Contents, not paths: a checkpoint replaced at the same path must not pass for the one an
    # earlier run used.
    fingerprints = {which: optional_file_sha256(path)
                    for which, path in checkpoints.as_dict().items()}
    model_record = {"forward_settings": config.forward_settings.model_dump(),
                    "model_load_path": config.model_load_path.model_dump(),
                    "dataset": config.dataset_settings.name,
                    "fingerprints": dict(fingerprints),
                    "nonlinear_settings": config.nonlinear_settings.model_dump()}
    ds = config.dataset_settings
    dataset = ds.model_copy(update={"format": resolve_format(ds.format, ds.path)})
    return Run(source=config.source, seed=config.seed, device=device,
               output_dir=Path(config.run.output_dir), forward=config.forward_settings,
               nonlinear=config.nonlinear_settings, dataset=dataset,
               training=config.training_settings, pgd=config.pgd_settings,
               attack=config.randomized_attack_settings, evaluation=config.evaluation_settings,
               checkpoints=checkpoints, eval_dtype=eval_dtype, fingerprints=fingerprints,
               weights_identity=provenance.identity(config, "weights", fingerprints),
               model_record=_json(model_record),
               config_record=config_to_dict(config))


@contextlib.contextmanager
def prepared(config: Config) -> Iterator[Run]:
    """The process group (under torchrun) for the run's life, and the run resolved in it."""
    with distributed_session(config.run.device):
        yield prepare(config)


def _json(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


# -- checkpoint files --------------------------------------------------------------------------
def resolve_checkpoints(config: Config) -> CheckpointFiles:
    """The files of ``model_load_path`` (relative to ``log_dir``), checked to exist before any
    large model is built; a missing one raises CheckpointNotFoundError naming the script that
    makes or downloads it."""
    fwd, classes = config.forward_settings, config.dataset_settings.num_classes
    zoo = {which: zoo_file(fwd, which, classes) for which in ("std", "rob")}
    for which in ("std", "rob"):
        if zoo[which] is not None:
            logger.info("model_load_path.%s is ignored: %s has robustbench's weights", which,
                        getattr(fwd, f"{which}_model_type"))
    comp = config.model_path("comp")
    if config.nonlinear_settings.enabled:
        comp = None  # the nonlinear composite has no mixing network
    elif comp is not None and not fwd.use_policy:
        logger.warning("model_load_path.comp (%s) is ignored: forward_settings.use_policy is "
                       "false, so the model has no mixing network", comp)
        comp = None
    elif comp is None and fwd.use_policy:
        logger.info("no mixer checkpoint (model_load_path.comp is None): the mixing network "
                    "keeps its random initial weights")
    rob = config.model_path("rob")
    assert rob is not None  # a required key
    files = CheckpointFiles(std=zoo["std"] or _existing_std_path(config.model_load_path,
                                                                 config.log_dir),
                            rob=zoo["rob"] or rob, comp=comp,
                            zoo=frozenset(w for w, path in zoo.items() if path is not None))
    _require_files(files, config)
    return files


def robustbench_model_dir(fwd: ForwardSettings) -> Path:
    """robustbench's local model folder for ``robustbench:<Name>`` base models (the derived
    default is ``log_dir/robustbench``; robustbench's own ``models`` where none is set)."""
    return Path(fwd.robustbench_model_dir or "models")


def zoo_file(fwd: ForwardSettings, which: str, num_classes: int) -> Optional[Path]:
    """Where robustbench keeps the weights of a ``robustbench:<Name>`` STD/ROB (``which``),
    ``<model_dir>/<dataset>/Linf/<Name>.pt``; None for a registry architecture."""
    name = getattr(fwd, f"{which}_model_type")
    if not is_zoo_name(name):
        return None
    return (robustbench_model_dir(fwd) / DATASET_BY_CLASSES.get(num_classes, "unknown")
            / ZOO_THREAT_MODEL / f"{zoo_model_name(name)}.pt")


def _require_files(files: CheckpointFiles, config: Config) -> None:
    from adaptive_smoothing.checkpoints import CheckpointNotFoundError

    for which, path in files.as_dict().items():
        if which in files.zoo:
            continue  # robustbench downloads a missing zoo file itself
        if path is not None and not path.is_file():
            # The full path, and what a relative log_dir resolves against: run from another
            # folder, "demo/std.pt" alone does not say where it was looked for.
            cwd = ("" if Path(config.log_dir).is_absolute()
                   else f", itself relative to the working directory {Path.cwd()}")
            raise CheckpointNotFoundError(
                f"checkpoint file not found: {path.absolute()} (model_load_path.{which} = "
                f"{getattr(config.model_load_path, which)!r} of {config.source or 'the config'}"
                f", relative to log_dir {config.log_dir!r}{cwd}); "
                f"{_how_to_make(config.model_load_path, config.log_dir, which, path)}")


def _how_to_make(paths: ModelLoadPath, log_dir: str, which: str, path: Path) -> str:
    """Which script makes or downloads a missing checkpoint."""
    published = weight_file_for(getattr(paths, which))
    if published is not None:
        return (f"it is a published checkpoint: python3 scripts/download_models.py "
                f"--root-dir {log_dir} --only {published.name}")
    if which == "comp":
        return ("train a mixer with run.py --training (it writes OUTPUT_DIR/checkpoints/"
                "last.pt), or set model_load_path.comp to None for an untrained one")
    return (f"train it with python3 scripts/train_base.py --output {path} (see "
            "scripts/reproduce_rn18_cpu.sh for both base models), or use the trained "
            "ResNet-18s in demo/ (configs/demo.yaml)")


def _existing_std_path(paths: ModelLoadPath, log_dir: str) -> Path:
    """``model_load_path.std``, or the first accepted other name of it that exists: the published
    table's names for a published STD file, else the other suffix (.tar <-> .pt)."""
    path = Path(log_dir) / paths.std
    published = weight_file_for(paths.std)
    if published is not None:
        candidates = published.candidates(log_dir)
        candidates = (path, *(c for c in candidates if c != path))
    else:
        candidates = (path, *filter(None, [std_alternative(path)]))
    for candidate in candidates:
        if candidate.exists():
            if candidate != path:
                logger.info("STD checkpoint %s not found; using %s", path, candidate)
            return candidate
    return path
