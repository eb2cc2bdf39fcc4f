"""The three published adaptive-smoothing models (docs/METHOD.md, "Published models"; RobustBench
Bai2023Improving_*).

``load_published_model(root_dir, dataset, model_name)`` builds the published architecture and loads
the authors' checkpoint files from the layout their README asks for::

    {root_dir}/Base/{dataset}_bit_rn152.tar          STD (.pt and the download name
                                                     {dataset}_std_rn152.pt are accepted too)
    {root_dir}/Base/{dataset}_linf_{name}_wrn70-16.pt ROB
    {root_dir}/CompModel/{dataset}_{name}_best.pt     mixing network + gamma BN

``load_robustbench_files`` does the same from RobustBench's three files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import torch
from torch.overrides import TorchFunctionMode

from adaptive_smoothing.checkpoints import (CheckpointNotFoundError, CompositeConstants, PathLike,
                                            load_authors_checkpoints, load_robustbench_checkpoints)
from adaptive_smoothing.models import CompositeModel, LogProbClassifier, MixingNet, create_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedModel:
    """One published composite: architectures, constants and the authors' file names."""

    dataset: str
    name: str
    robustbench_name: str
    num_classes: int
    rob_arch: str                 # registry name of the ROB WideResNet
    constants: CompositeConstants
    clean_accuracy: float         # reported, percent
    autoattack_accuracy: float    # reported, percent, Linf eps 8/255
    std_arch: str = "bit_m_r152x2"
    std_resize: int = 128
    mixer_in_planes: tuple[int, int] = (512, 256)
    mixer_version: int = 4

    def std_candidates(self, root_dir: Path) -> tuple[Path, ...]:
        # The README's name, the authors' benchmark script's name, and the download name.
        base = Path(root_dir) / "Base"
        return (base / f"{self.dataset}_bit_rn152.tar", base / f"{self.dataset}_bit_rn152.pt",
                base / f"{self.dataset}_std_rn152.pt")

    def rob_candidates(self, root_dir: Path) -> tuple[Path, ...]:
        return (Path(root_dir) / "Base" / f"{self.dataset}_linf_{self.name}_wrn70-16.pt",)

    def mixer_candidates(self, root_dir: Path) -> tuple[Path, ...]:
        return (Path(root_dir) / "CompModel" / f"{self.dataset}_{self.name}_best.pt",)


PUBLISHED_MODELS: Mapping[tuple[str, str], PublishedModel] = MappingProxyType({
    ("cifar10", "edm"): PublishedModel(
        dataset="cifar10", name="edm", robustbench_name="Bai2023Improving_edm", num_classes=10,
        rob_arch="dm_wrn_70_16_silu",
        constants=CompositeConstants(std_scale=1.2, rob_scale=0.3, eval_gamma=(2.0, 1.05),
                                     alpha_scale=0.04, alpha_bias=0.96),
        clean_accuracy=95.23, autoattack_accuracy=68.06),
    ("cifar100", "edm"): PublishedModel(
        dataset="cifar100", name="edm", robustbench_name="Bai2023Improving_edm", num_classes=100,
        rob_arch="dm_wrn_70_16_silu",
        constants=CompositeConstants(std_scale=2.0, rob_scale=1.0, eval_gamma=(2.0, 1.3),
                                     alpha_scale=0.15, alpha_bias=0.84),
        clean_accuracy=85.21, autoattack_accuracy=38.72),
    ("cifar100", "trades"): PublishedModel(
        dataset="cifar100", name="trades", robustbench_name="Bai2023Improving_trades",
        num_classes=100, rob_arch="dm_wrn_70_16",  # DeepMind's Swish
        constants=CompositeConstants(std_scale=2.0, rob_scale=1.0, eval_gamma=(2.0, 1.0),
                                     alpha_scale=0.1, alpha_bias=0.815),
        clean_accuracy=80.18, autoattack_accuracy=35.15),
})


def published_model(dataset: str, model_name: str) -> PublishedModel:
    """The table entry of a published model; ValueError naming the valid choices otherwise."""
    key = (dataset.lower(), model_name.lower())
    if key not in PUBLISHED_MODELS:
        choices = ", ".join(f"{d}/{n}" for d, n in PUBLISHED_MODELS)
        raise ValueError(f"no published model {dataset}/{model_name}; published models are "
                         f"{choices}")
    return PUBLISHED_MODELS[key]


def build_published_composite(dataset: str, model_name: str) -> CompositeModel:
    """The published architecture and constants with random weights, in eval mode.

    Builds on the current default device; ``with torch.device("meta"):`` gives a free skeleton.
    """
    spec = published_model(dataset, model_name)
    std = create_model(spec.std_arch, spec.num_classes, resize_to=spec.std_resize)
    rob = create_model(spec.rob_arch, spec.num_classes)
    mixer = MixingNet(spec.mixer_in_planes, version=spec.mixer_version)
    c = spec.constants
    return CompositeModel(std, rob, mixer, std_scale=c.std_scale, rob_scale=c.rob_scale,
                          eval_gamma=c.eval_gamma, alpha_scale=c.alpha_scale,
                          alpha_bias=c.alpha_bias).eval()


class _SkipRandomInit(TorchFunctionMode):
    """Skip the random weight initialisation while a model is built only to be loaded.

    Initialising the published architecture costs several CPU seconds and every value is then
    overwritten: the loaders check that the files hold every parameter and buffer before
    copying. Non-random initialisers (BatchNorm's ones/zeros) and plain tensor constants such
    as Normalize's statistics still run. The mode is thread-local.
    """

    _SKIPPED = frozenset({torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
                          torch.nn.init.uniform_, torch.nn.init.normal_,
                          torch.nn.init.trunc_normal_, torch.nn.init.xavier_uniform_,
                          torch.nn.init.xavier_normal_, torch.nn.init.orthogonal_,
                          torch.Tensor.uniform_, torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIPPED:
            return args[0] if args else next(iter(kwargs.values()))
        return func(*args, **(kwargs or {}))


def _build_for_loading(dataset: str, model_name: str) -> CompositeModel:
    with _SkipRandomInit():
        return build_published_composite(dataset, model_name)


def published_paths(root_dir: PathLike, dataset: str, model_name: str) -> tuple[Path, Path, Path]:
    """The (STD, ROB, mixer) files under ``root_dir``; CheckpointNotFoundError lists every
    expected path when any is missing."""
    spec = published_model(dataset, model_name)
    root = Path(root_dir)
    parts = (("STD (BiT-M-R152x2)", spec.std_candidates(root)),
             (f"ROB ({spec.rob_arch})", spec.rob_candidates(root)),
             ("mixer", spec.mixer_candidates(root)))
    found, lines = [], []
    for label, candidates in parts:
        present = next((path for path in candidates if path.is_file()), None)
        found.append(present)
        status = f"found {present}" if present else "MISSING"
        lines.append(f"  {label}: {' or '.join(str(p) for p in candidates)} -- {status}")
    if any(path is None for path in found):
        raise CheckpointNotFoundError(
            f"published model {spec.dataset}/{spec.name}: checkpoint files missing under "
            f"{root} (expected layout below; see docs/METHOD.md, 'Published models'):\n"
            + "\n".join(lines))
    return found[0], found[1], found[2]


def load_published_model(root_dir: PathLike, dataset: str, model_name: str,
                         device: torch.device | str = "cpu") -> LogProbClassifier:
    """A published model from the authors' files under ``root_dir``, in eval mode on ``device``."""
    std_path, rob_path, mixer_path = published_paths(root_dir, dataset, model_name)
    composite = _build_for_loading(dataset, model_name)
    load_authors_checkpoints(composite, std_path, rob_path, mixer_path)
    logger.info("loaded published model %s/%s from %s", dataset, model_name, root_dir)
    return LogProbClassifier(composite.to(device)).eval()


def load_robustbench_files(paths: Sequence[PathLike], dataset: str, model_name: str,
                           device: torch.device | str = "cpu") -> LogProbClassifier:
    """A published model from RobustBench's three files (BiT, WRN, mixer), in eval mode."""
    composite = _build_for_loading(dataset, model_name)
    load_robustbench_checkpoints(composite, paths)
    logger.info("loaded published model %s/%s from RobustBench files", dataset, model_name)
    return LogProbClassifier(composite.to(device)).eval()
