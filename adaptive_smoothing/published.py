"""The published models (docs/METHOD.md, "Published models"): the three adaptive-smoothing
composites (RobustBench Bai2023Improving_*) and the two MixedNUTS nonlinear mixtures (RobustBench
Bai2024MixedNUTS, "mixednuts"); the one table of their facts, and loading them.

Like timm's ``default_cfgs``, each model's weight facts sit beside its architecture: one
:class:`PublishedModel` holds the architectures, the constants and its
:class:`WeightFile` entries (the file name in the authors' layout, the other names accepted, and
where the file is downloaded from). The downloader (download.py), the factory's hints and the
shipped configs' test (tests/test_published.py) read this table.

``load_published_model(root_dir, dataset, model_name)`` builds the published architecture and loads
the authors' checkpoint files from the layout their README asks for::

    {root_dir}/Base/{dataset}_bit_rn152.tar          STD (.pt and the download name
                                                     {dataset}_std_rn152.pt are accepted too)
    {root_dir}/Base/{dataset}_linf_{name}_wrn70-16.pt ROB
    {root_dir}/CompModel/{dataset}_{name}_best.pt     mixer network + gamma BN
    {root_dir}/Base/Peng2023Robust.pt                 ROB of the CIFAR-10 MixedNUTS mixture
                                                      (CIFAR-100: the EDM ROB; no mixer file)

``load_robustbench_files`` does the same from RobustBench's three files.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Sequence, Union

import torch
from torch.overrides import TorchFunctionMode

from adaptive_smoothing.checkpoints import (CheckpointNotFoundError, PathLike,
                                            load_authors_checkpoints, load_robustbench_checkpoints)
from adaptive_smoothing.models import (CompositeConstants, CompositeModel, LogProbClassifier,
                                       MixingNet, create_model)
from adaptive_smoothing.models.nonlinear import NonlinearComposite, NonlinearConstants

logger = logging.getLogger(__name__)

# Where the published files are served; each can be overridden (download.py, the tests).
DEFAULT_BASE_URLS: Mapping[str, str] = MappingProxyType({
    "gdrive": "https://drive.google.com",
    "huggingface": "https://huggingface.co",
    "gcs": "https://storage.googleapis.com",
})
ENV_PREFIX = "ADAPTIVE_SMOOTHING_BASE_URL_"


def resolve_base_urls(overrides: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Defaults, then ``ADAPTIVE_SMOOTHING_BASE_URL_<HOST>`` variables, then ``overrides``."""
    urls = dict(DEFAULT_BASE_URLS)
    for host in DEFAULT_BASE_URLS:
        env = os.environ.get(ENV_PREFIX + host.upper())
        if env:
            urls[host] = env
    for host, url in (overrides or {}).items():
        if host not in DEFAULT_BASE_URLS:
            raise ValueError(f"unknown host {host!r}; expected one of {sorted(DEFAULT_BASE_URLS)}")
        urls[host] = url
    return urls


@dataclass(frozen=True)
class WeightFile:
    """One published checkpoint file: its place in the authors' layout and where it comes from."""

    name: str              # download entry, e.g. cifar10_std
    dataset: str           # cifar10 | cifar100
    model: str             # edm | trades | mixednuts | std (the BiT model of every entry)
    kind: str              # std | rob | mixer
    target: str            # relative to the model root (log_dir / --root-dir)
    host: str              # key of DEFAULT_BASE_URLS
    path: Optional[str] = None      # gcs: object path; huggingface: the file in ``hf_repo``
    drive_id: Optional[str] = None  # Google Drive file id (host 'gdrive')
    size: Optional[int] = None
    sha256: Optional[str] = None
    hf_repo: Optional[str] = None   # Hugging Face repository (host 'huggingface')
    alternatives: tuple[str, ...] = ()  # other accepted names, relative to the model root

    def url(self, base_urls: Optional[Mapping[str, str]] = None) -> str:
        base = resolve_base_urls(base_urls)[self.host].rstrip("/")
        if self.drive_id is not None:
            return f"{base}/uc?export=download&id={self.drive_id}"
        if self.hf_repo is not None:
            from huggingface_hub import hf_hub_url
            return hf_hub_url(self.hf_repo, self.path, endpoint=base)
        assert self.path is not None
        return f"{base}/{self.path.lstrip('/')}"

    @property
    def names(self) -> tuple[str, ...]:
        """The target first, then the accepted alternatives (relative to the model root)."""
        return (self.target, *self.alternatives)

    def candidates(self, root_dir: PathLike) -> tuple[Path, ...]:
        return tuple(Path(root_dir) / name for name in self.names)


# The authors' README names the STD file .tar while their benchmark script looks for .pt; either
# is accepted, for the published STD files and for any STD file a config names.
STD_SUFFIX_ALTERNATIVES: Mapping[str, str] = MappingProxyType({".tar": ".pt", ".pt": ".tar"})


def std_alternative(path: PathLike) -> Optional[Path]:
    """The STD file's other accepted name (.tar <-> .pt), or None."""
    path = Path(path)
    other = STD_SUFFIX_ALTERNATIVES.get(path.suffix)
    return None if other is None else path.with_suffix(other)


def _std_file(dataset: str, drive_id: str) -> WeightFile:
    # The BiT STD models: the authors serve them from their own server (as {dataset}_std_rn152.pt,
    # accepted too); we download RobustBench's Drive copies (file 0 of the Bai2023Improving
    # entries), whose keys lack the "module." prefix (the checkpoint loader accepts both).
    target = f"Base/{dataset}_bit_rn152.tar"
    return WeightFile(f"{dataset}_std", dataset, "std", "std", target, "gdrive",
                      drive_id=drive_id,
                      alternatives=(std_alternative(target).as_posix(),
                                    f"Base/{dataset}_std_rn152.pt"))


def _mixer_file(dataset: str, name: str, drive_id: str) -> WeightFile:
    # File 2 of the RobustBench entries. Sizes and hashes are not published: None.
    return WeightFile(f"{dataset}_{name}_mixer", dataset, name, "mixer",
                      f"CompModel/{dataset}_{name}_best.pt", "gdrive", drive_id=drive_id)


_DM_IMPROVES_AT = "wzekai99/DM-Improves-AT"
_CIFAR100_STD = _std_file("cifar100", "12Z63xr4bQwdIvR2w8xvpUnXG1fnUpy5B")


@dataclass(frozen=True)
class PublishedModel:
    """One published composite: architectures, constants and its weight files.

    ``kind`` 'mixer': adaptive smoothing (a mixing network; ``constants`` and ``mixer`` set);
    'nonlinear': a MixedNUTS mixture (docs/METHOD.md, "Nonlinear mixing"; ``nonlinear`` set, no
    mixer file).
    """

    dataset: str
    name: str
    robustbench_name: str
    num_classes: int
    rob_arch: str                 # registry name of the ROB model
    clean_accuracy: float         # reported, percent
    autoattack_accuracy: float    # reported, percent, Linf eps 8/255
    std: WeightFile
    rob: WeightFile
    kind: str = "mixer"           # mixer | nonlinear
    constants: Optional[CompositeConstants] = None   # kind 'mixer'
    mixer: Optional[WeightFile] = None               # kind 'mixer'
    nonlinear: Optional[NonlinearConstants] = None   # kind 'nonlinear'
    std_arch: str = "bit_m_r152x2"
    std_resize: int = 128
    mixer_in_planes: tuple[int, int] = (512, 256)
    mixer_version: int = 4

    def __post_init__(self) -> None:
        mixer = self.constants is not None and self.mixer is not None
        if (self.kind, mixer, self.nonlinear is not None) not in (
                ("mixer", True, False), ("nonlinear", False, True)):
            raise ValueError(f"{self.dataset}/{self.name}: a 'mixer' model has constants and a "
                             f"mixer file, a 'nonlinear' one nonlinear constants only")

    @property
    def files(self) -> tuple[WeightFile, ...]:
        return tuple(f for f in (self.std, self.rob, self.mixer) if f is not None)

    def std_candidates(self, root_dir: Path) -> tuple[Path, ...]:
        return self.std.candidates(root_dir)

    def rob_candidates(self, root_dir: Path) -> tuple[Path, ...]:
        return self.rob.candidates(root_dir)

    def mixer_candidates(self, root_dir: Path) -> tuple[Path, ...]:
        return () if self.mixer is None else self.mixer.candidates(root_dir)


# The MixedNUTS constants are robustbench's optimal_spca.yaml (its 'gelu' entry at the default
# beta 98.5 for the true output; its 'none' entry, the linear mixture at beta 95.0 / 93.5, for the
# gradient surrogate), as get_nonlin_mixed_classifier reads them; ln_k 250 means all classes.
_CIFAR10_STD = _std_file("cifar10", "1-5EwY_5tQZudo9idwXiUGr3P4OUUGaQN")
_CIFAR100_EDM_ROB = WeightFile("cifar100_edm_rob", "cifar100", "edm", "rob",
                               "Base/cifar100_linf_edm_wrn70-16.pt", "huggingface",
                               hf_repo=_DM_IMPROVES_AT, path="checkpoint/cifar100_linf_wrn70-16.pt")
# RobustBench's Peng2023Robust file (its model_zoo/cifar10.py entry, also file 1 of its CIFAR-10
# Bai2024MixedNUTS entry), under its RobustBench name.
_PENG2023_ROB = WeightFile("cifar10_peng2023robust_rob", "cifar10", "mixednuts", "rob",
                           "Base/Peng2023Robust.pt", "gdrive",
                           drive_id="1-6M8KHZdPmgqYkBSkdZQ2fLwp86ZQ9VU")

PUBLISHED_MODELS: Mapping[tuple[str, str], PublishedModel] = MappingProxyType({
    ("cifar10", "edm"): PublishedModel(
        dataset="cifar10", name="edm", robustbench_name="Bai2023Improving_edm", num_classes=10,
        rob_arch="dm_wrn_70_16_silu",
        constants=CompositeConstants(std_scale=1.2, rob_scale=0.3, eval_gamma=(2.0, 1.05),
                                     alpha_scale=0.04, alpha_bias=0.96),
        clean_accuracy=95.23, autoattack_accuracy=68.06,
        std=_CIFAR10_STD,
        rob=WeightFile("cifar10_edm_rob", "cifar10", "edm", "rob",
                       "Base/cifar10_linf_edm_wrn70-16.pt", "huggingface",
                       hf_repo=_DM_IMPROVES_AT, path="checkpoint/cifar10_linf_wrn70-16.pt"),
        mixer=_mixer_file("cifar10", "edm", "1-7oV7QDgz8McvhbaCj6Owx3Rz3daiPrT")),
    ("cifar100", "edm"): PublishedModel(
        dataset="cifar100", name="edm", robustbench_name="Bai2023Improving_edm", num_classes=100,
        rob_arch="dm_wrn_70_16_silu",
        constants=CompositeConstants(std_scale=2.0, rob_scale=1.0, eval_gamma=(2.0, 1.3),
                                     alpha_scale=0.15, alpha_bias=0.84),
        clean_accuracy=85.21, autoattack_accuracy=38.72,
        std=_CIFAR100_STD,
        rob=_CIFAR100_EDM_ROB,
        mixer=_mixer_file("cifar100", "edm", "1--8Jd82Q9ZLlVS_6c1iPrBxqy9sbdAkx")),
    ("cifar100", "trades"): PublishedModel(
        dataset="cifar100", name="trades", robustbench_name="Bai2023Improving_trades",
        num_classes=100, rob_arch="dm_wrn_70_16",  # DeepMind's Swish
        constants=CompositeConstants(std_scale=2.0, rob_scale=1.0, eval_gamma=(2.0, 1.0),
                                     alpha_scale=0.1, alpha_bias=0.815),
        clean_accuracy=80.18, autoattack_accuracy=35.15,
        std=_CIFAR100_STD,
        rob=WeightFile("cifar100_trades_rob", "cifar100", "trades", "rob",
                       "Base/cifar100_linf_trades_wrn70-16.pt", "gcs",
                       path="dm-adversarial-robustness/cifar100_linf_wrn70-16_with.pt"),
        mixer=_mixer_file("cifar100", "trades", "1-0Sffx4gCIydJc16n1H0k6FYE4kHRnGm")),
    ("cifar10", "mixednuts"): PublishedModel(
        dataset="cifar10", name="mixednuts", robustbench_name="Bai2024MixedNUTS",
        num_classes=10, kind="nonlinear",
        rob_arch="ra_wrn_70_16",  # Peng2023Robust: robustbench's RaWideResNet-70-16
        nonlinear=NonlinearConstants(alpha=0.9987500602493457, s=5.0, p=4.0, c=-1.1,
                                     clamp="gelu", k=250, std_map="hard_max",
                                     surrogate_alpha=0.9570535356459247),
        clean_accuracy=95.19, autoattack_accuracy=70.08,
        std=_CIFAR10_STD, rob=_PENG2023_ROB),
    ("cifar100", "mixednuts"): PublishedModel(
        dataset="cifar100", name="mixednuts", robustbench_name="Bai2024MixedNUTS",
        num_classes=100, kind="nonlinear",
        # Wang2023Better_WRN-70-16 is DM-Improves-AT's CIFAR-100 WRN-70-16 SiLU, the EDM ROB.
        rob_arch="dm_wrn_70_16_silu",
        nonlinear=NonlinearConstants(alpha=0.9860300534207915, s=0.6115753843212784,
                                     p=3.571428571428571, c=-2.142857142857143, clamp="gelu",
                                     k=250, std_map="hard_max",
                                     surrogate_alpha=0.9706995384302841),
        clean_accuracy=83.08, autoattack_accuracy=41.91,
        std=_CIFAR100_STD, rob=_CIFAR100_EDM_ROB),
})

# The published model names, for the command lines' choices.
PUBLISHED_NAMES: tuple[str, ...] = tuple(dict.fromkeys(name for _, name in PUBLISHED_MODELS))

# Every published file once, in table order (the CIFAR-100 STD serves both CIFAR-100 models).
WEIGHT_FILES: tuple[WeightFile, ...] = tuple(
    {f.name: f for spec in PUBLISHED_MODELS.values() for f in spec.files}.values())


def weight_file_for(relative_path: PathLike) -> Optional[WeightFile]:
    """The published file whose target or accepted alternative is ``relative_path`` (relative to
    the model root), or None."""
    wanted = Path(relative_path).as_posix()
    return next((f for f in WEIGHT_FILES if wanted in f.names), None)


def published_model(dataset: str, model_name: str) -> PublishedModel:
    """The table entry of a published model; ValueError naming the valid choices otherwise."""
    key = (dataset.lower(), model_name.lower())
    if key not in PUBLISHED_MODELS:
        choices = ", ".join(f"{d}/{n}" for d, n in PUBLISHED_MODELS)
        raise ValueError(f"no published model {dataset}/{model_name}; published models are "
                         f"{choices}")
    return PUBLISHED_MODELS[key]


def build_published_composite(dataset: str, model_name: str
                              ) -> Union[CompositeModel, NonlinearComposite]:
    """The published architecture and constants with random weights, in eval mode: a
    :class:`CompositeModel` (kind 'mixer') or a :class:`NonlinearComposite` ('nonlinear').

    Builds on the current default device; ``with torch.device("meta"):`` gives a free skeleton.
    """
    spec = published_model(dataset, model_name)
    std = create_model(spec.std_arch, spec.num_classes, resize_to=spec.std_resize)
    rob = create_model(spec.rob_arch, spec.num_classes)
    if spec.nonlinear is not None:
        return spec.nonlinear.composite(std, rob).eval()
    assert spec.constants is not None
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


def _build_for_loading(dataset: str, model_name: str
                       ) -> Union[CompositeModel, NonlinearComposite]:
    with _SkipRandomInit():
        return build_published_composite(dataset, model_name)


def published_paths(root_dir: PathLike, dataset: str, model_name: str
                    ) -> tuple[Path, Path, Optional[Path]]:
    """The (STD, ROB, mixer) files under ``root_dir`` (mixer None for a nonlinear mixture);
    CheckpointNotFoundError lists every expected path when any is missing."""
    spec = published_model(dataset, model_name)
    root = Path(root_dir)
    parts = [("STD (BiT-M-R152x2)", spec.std_candidates(root)),
             (f"ROB ({spec.rob_arch})", spec.rob_candidates(root))]
    if spec.mixer is not None:
        parts.append(("mixer", spec.mixer_candidates(root)))
    found, lines = [], []
    for label, candidates in parts:
        present = next((path for path in candidates if path.is_file()), None)
        found.append(present)
        status = f"found {present.absolute()}" if present else "MISSING"
        lines.append(f"{label}: {' or '.join(str(p.absolute()) for p in candidates)} -- "
                     f"{status}")
    if any(path is None for path in found):
        # One line (as every user error), absolute paths and what a relative root is relative
        # to: from another working directory "models/Base/..." alone does not say where it looked.
        relative = ("" if root.is_absolute()
                    else f", relative to the working directory {Path.cwd()}")
        raise CheckpointNotFoundError(
            f"published model {spec.dataset}/{spec.name}: checkpoint files missing under "
            f"{root.absolute()}{relative} (layout: docs/METHOD.md, 'Published models'): "
            + "; ".join(lines) + f"; download them with python3 scripts/download_models.py "
            f"--root-dir {root} --dataset {spec.dataset} --model {spec.name}")
    return found[0], found[1], found[2] if len(found) > 2 else None


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
    if published_model(dataset, model_name).mixer is None:
        raise ValueError(f"{dataset}/{model_name} is a nonlinear mixture: load it with "
                         f"load_published_model from the layout of docs/METHOD.md")
    composite = _build_for_loading(dataset, model_name)
    load_robustbench_checkpoints(composite, paths)
    logger.info("loaded published model %s/%s from RobustBench files", dataset, model_name)
    return LogProbClassifier(composite.to(device)).eval()
