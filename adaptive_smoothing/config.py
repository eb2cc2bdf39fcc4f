"""YAML configuration -> validated, typed, frozen dataclasses.

The authors' file layout (docs/METHOD.md, "Authors' configs") loads unchanged, quirks included:
numbers written as strings ('5e-5'), tuples written as strings ('(2., 0.4)'), the string 'None', and 'default' for
values that depend on other keys. This project's additions (``evaluation_settings``, a global
``training_settings.batch_size``, ...) are optional keys. docs/CONFIG.md documents every key.

Parsing is generic: every section is a dataclass whose field names are the YAML keys, and one
coercion function, driven by the field's type hint and ``metadata`` (bounds, choices, aliases,
name normalisation), turns a YAML value into the typed value. Any problem raises one
:class:`ConfigError` naming the file, the key path, the value and what was expected.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import logging
import math
import os
import re
from collections import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, Callable, Literal, Mapping, Optional, Union, get_args, get_origin,
                    get_type_hints)

import yaml
from pydantic import BaseModel, ValidationError

from adaptive_smoothing.attacks import RandomizedAttackSettings

logger = logging.getLogger(__name__)

__all__ = ["Config", "ConfigError", "CompLossConsts", "CompLossParams", "CompLossScale",
           "DatasetSettings", "EvalFreq", "EvaluationSettings", "ForwardSettings", "GammaConsts",
           "ModelLoadPath", "PgdSettings", "RandomizedAttackSettings", "TrainingSettings",
           "MODEL_TYPE_ALIASES", "STANDARD_AUTOATTACK", "TRAINING_ATTACKS", "apply_overrides",
           "AUTOATTACK_NAMES", "DEFAULT_EPS", "FrozenDict", "config_to_dict", "load_config",
           "parse_config"]

# The original code's short model names -> this project's registry names.
MODEL_TYPE_ALIASES: dict[str, str] = {
    "rn18": "resnet18", "rn50": "bit_m_r50x1", "rn152": "bit_m_r152x2",
    "wrn": "dm_wrn_28_10", "wrn7016": "dm_wrn_70_16", "wrn7016_silu": "dm_wrn_70_16_silu",
}
AUTOATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
STANDARD_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
# What 'default' means in pgd_settings (docs/METHOD.md, "Authors' configs").
TRAINING_ATTACKS = ("apgd-ce", "apgd-t")
DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5}
# Radii above these are not a threat model anyone evaluates on [0, 1] images (Linf 64/255 already
# allows a visible grey overlay); a larger value is almost always a unit mistake (eps: 8 for 8/255).
MAX_PLAUSIBLE_EPS = {"Linf": 64 / 255, "L2": 8.0}
MAX_SEED = 2**63 - 1  # torch.manual_seed and pyautoattack take seeds up to this
BIT_STD_RESIZE = 128  # the published STD model sees CIFAR images resized to 128x128


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
_NO_VALUE = object()


class ConfigError(ValueError):
    """A configuration problem: ``file: key.path = value: problem``."""

    def __init__(self, problem: str, *, key: Optional[str] = None, value: Any = _NO_VALUE,
                 file: Optional[str] = None) -> None:
        self.problem = problem
        self.key = key
        self.value = value
        self.file = file
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.file or "<config>"]
        if self.key is not None:
            parts.append(self.key if self.value is _NO_VALUE
                         else f"{self.key} = {_short_repr(self.value)}")
        parts.append(self.problem)
        return ": ".join(parts)

    def located(self, *, file: Optional[str] = None, prefix: str = "") -> "ConfigError":
        """The same error with the file name set and the section path prepended to the key."""
        key = _join(prefix, self.key) if self.key is not None else (prefix or None)
        return ConfigError(self.problem, key=key, value=self.value, file=file or self.file)


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(dict(value) if isinstance(value, Mapping) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# --------------------------------------------------------------------------------------------
# Field machinery
# --------------------------------------------------------------------------------------------
class _Derived:
    """Marks a value computed from other keys ('default' in the YAML); replaced on loading."""

    _instance: Optional["_Derived"] = None

    def __new__(cls) -> "_Derived":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<derived>"

    def __deepcopy__(self, memo: dict) -> "_Derived":
        return self

    def __reduce__(self) -> tuple:
        return (_Derived, ())


DERIVED: Any = _Derived()
_DERIVED_WORDS = ("default", "auto")


class FrozenDict(dict):
    """A read-only dict, so that frozen configs stay immutable and hashable.

    A dict subclass (not MappingProxyType) so that ``dataclasses.asdict``, ``copy.deepcopy``
    and ``json.dumps`` keep working on configs.
    """

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("configuration mappings are read-only; use apply_overrides()")

    __setitem__ = __delitem__ = __ior__ = _readonly  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda item: str(item[0]))))

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))


def _opt(default: Any = dataclasses.MISSING, *, doc: str = "",
         default_factory: Any = dataclasses.MISSING, **checks: Any) -> Any:
    """A config field. ``checks``: gt/ge/le (bounds), choices (values or a callable giving
    them), check (callable -> problem or None), aliases (other YAML names), normalize (applied
    to the raw value first), derived (accepts 'default'), allow_inf (floats)."""
    metadata = {"doc": doc, **checks}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _normalizer(table: Mapping[str, str]) -> Callable[[Any], Any]:
    """Case-, '-'- and '_'-insensitive name mapping; leaves other values to the type check."""
    keyed = {re.sub(r"[-_\s]", "", k.lower()): v for k, v in table.items()}

    def normalize(value: Any) -> Any:
        if isinstance(value, str):
            return keyed.get(re.sub(r"[-_\s]", "", value.lower()), value.strip())
        return value
    return normalize


def _model_type(value: Any) -> Any:
    if isinstance(value, str):
        return MODEL_TYPE_ALIASES.get(value.strip().lower(), value.strip())
    return value


def _registry_names() -> list[str]:
    # Imported here so that reading a config does not import torch until a model name is checked.
    from adaptive_smoothing.models import list_models
    return list_models()


def _device_check(value: str) -> Optional[str]:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return None
    return "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"


def _accum_check(value: int) -> Optional[str]:
    return None if value == -1 or value >= 1 else "expected -1 (one step per buffer) or >= 1"


def _gamma_pair_check(value: tuple[float, float]) -> Optional[str]:
    return None if value[0] > 0 else "expected (scale, bias) with scale > 0"


_NORM_NAMES = _normalizer({"linf": "Linf", "l_inf": "Linf", "inf": "Linf", "l2": "L2", "l_2": "L2"})
_PGD_TYPE_NAMES = _normalizer({"l_inf": "l_inf", "linf": "l_inf", "l_2": "l_2", "l2": "l_2"})
_PRECISION_NAMES = _normalizer({"float32": "fp32", "float16": "fp16", "half": "fp16",
                                "bfloat16": "bf16"})
_DATASET_NAMES = _normalizer({"CIFAR-10": "cifar10", "CIFAR-100": "cifar100"})
_ATTACK_NAMES = _normalizer({name: name for name in AUTOATTACK_NAMES})


# --------------------------------------------------------------------------------------------
# Sections (field names are the YAML keys)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelLoadPath:
    std: str = _opt(doc="STD (accurate) model checkpoint, relative to log_dir")
    rob: str = _opt(doc="ROB (robust) model checkpoint, relative to log_dir")
    comp: Optional[str] = _opt(None, doc="mixing-network checkpoint, relative to log_dir; "
                               "None = untrained mixer")


def _check_range_within_one(settings: Any, low: str, width: str) -> None:
    """A range (low, low + width) drawn from must stay inside [0, 1]."""
    lo, wd = getattr(settings, low), getattr(settings, width)
    if lo + wd > 1 + 1e-12:
        raise ConfigError(f"expected {low} + {width} <= 1 ({width} = {wd}, sum = {lo + wd})",
                          key=low, value=lo)


@dataclass(frozen=True, kw_only=True)
class ForwardSettings:
    std_model_type: str = _opt(doc="STD architecture", normalize=_model_type,
                               choices=_registry_names)
    rob_model_type: str = _opt(doc="ROB architecture", normalize=_model_type,
                               choices=_registry_names)
    std_model_scale: float = _opt(1.0, gt=0, aliases=("std_scale",), doc="STD logit scale")
    rob_model_scale: float = _opt(1.0, gt=0, aliases=("rob_scale",), doc="ROB logit scale")
    std_model_kwargs: Mapping[str, Any] = _opt(default_factory=FrozenDict,
                                               doc="extra create_model arguments, STD")
    rob_model_kwargs: Mapping[str, Any] = _opt(default_factory=FrozenDict,
                                               doc="extra create_model arguments, ROB")
    std_resize: Optional[int] = _opt(DERIVED, ge=1, derived=True,
                                     doc="resize STD inputs to this size (BiT only)")
    in_planes: Optional[tuple[int, int]] = _opt(None, ge=1, doc="first-feature channels "
                                                "(STD, ROB); None = read from the models")
    gamma: float = _opt(0.0, allow_inf=True, doc="fixed gamma when use_policy is off")
    use_policy: bool = _opt(True, doc="use the mixing network")
    policy_graph: bool = _opt(True, doc="false detaches mixer inputs: evaluations INVALID")
    pn_version: int = _opt(4, choices=(3, 4), doc="mixing network version")
    alpha_scale: float = _opt(1.0, ge=0, le=1, doc="alpha <- alpha * alpha_scale + alpha_bias")
    alpha_bias: float = _opt(0.0, ge=0, le=1, doc="lower end of the alpha range")
    parallel: int = _opt(1, ge=0, doc="accepted for compatibility; not used")
    ema_decay: Optional[float] = _opt(None, doc="accepted for compatibility; not used")

    def __post_init__(self) -> None:
        _check_range_within_one(self, "alpha_bias", "alpha_scale")


@dataclass(frozen=True, kw_only=True)
class DatasetSettings:
    name: Literal["cifar10", "cifar100"] = _opt(normalize=_DATASET_NAMES, doc="dataset")
    format: Literal["torchvision", "npz", "imagefolder"] = _opt("torchvision",
                                                                 doc="on-disk format")
    path: str = _opt("data", doc="dataset folder")
    train_with_test: bool = _opt(False, doc="train the mixer on the test split (original key)")
    train_shuffle: bool = _opt(True, doc="shuffle the training set")
    pa_path: Optional[str] = _opt(None, doc="pre-attacked data (original key; not used)")
    gamma_0: Optional[float] = _opt(None, doc="pre-attacked data (original key; not used)")
    blocks: Optional[int] = _opt(None, doc="pre-attacked data (original key; not used)")

    @property
    def num_classes(self) -> int:
        return 100 if self.name == "cifar100" else 10


@dataclass(frozen=True, kw_only=True)
class CompLossConsts:
    bce: float = _opt(1.5, ge=0, doc="weight of BCE(gamma, label)")
    ce: float = _opt(0.0, ge=0, doc="weight of CE(out, y)")
    prod: float = _opt(0.3, ge=0, doc="weight of BCE * CE")


@dataclass(frozen=True, kw_only=True)
class CompLossScale:
    clean: float = _opt(1.0, ge=0, doc="loss scale of clean samples")
    ada: float = _opt(1.0, ge=0, doc="loss scale of adversarial samples")
    pa: float = _opt(1.0, ge=0, doc="loss scale of pre-attacked samples (not used)")


@dataclass(frozen=True, kw_only=True)
class CompLossParams:
    consts: CompLossConsts = _opt(default_factory=CompLossConsts, doc="loss weights")
    scale: CompLossScale = _opt(default_factory=CompLossScale, doc="per-group scales")


@dataclass(frozen=True, kw_only=True)
class GammaConsts:
    train: tuple[float, float] = _opt((2.0, 0.4), check=_gamma_pair_check,
                                      doc="(scale, bias) of gamma in training mode")
    eval: tuple[float, float] = _opt((2.0, 1.3), check=_gamma_pair_check,
                                     doc="(scale, bias) of gamma in evaluation mode")


@dataclass(frozen=True, kw_only=True)
class EvalFreq:
    epoch: int = _opt(1, ge=1, doc="validate and save every this many epochs")
    iter: Optional[int] = _opt(200, ge=1, doc="validate and save every this many iterations; "
                               "'none' = at epoch ends only (eval_freq.epoch)")


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    epochs: int = _opt(3, ge=1, doc="training epochs")
    batch_size: Optional[int] = _opt(None, ge=1, doc="GLOBAL training batch size (all "
                                     "processes); None = per-process size x processes")
    batch_size_train_per_gpu: int = _opt(50, ge=1, doc="per-process training batch size")
    batch_size_test_per_gpu: int = _opt(50, ge=1, doc="per-process validation batch size")
    save_eval_imgs: bool = _opt(False, doc="save validation images (original key)")
    lr: float = _opt(5e-5, gt=0, doc="AdamW learning rate")
    weight_decay: float = _opt(1e-5, ge=0, doc="AdamW weight decay")
    comp_loss_params: CompLossParams = _opt(default_factory=CompLossParams, doc="CompLoss")
    accum_grad: int = _opt(4, check=_accum_check, doc="mini-batches per optimizer step")
    use_fast_loader: bool = _opt(False, doc="original key; not used")
    gamma_consts: GammaConsts = _opt(default_factory=GammaConsts, doc="gamma constants")
    eval_freq: EvalFreq = _opt(default_factory=EvalFreq, doc="validation frequency")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _opt(
        "auto", normalize=_PRECISION_NAMES, doc="mixed precision mode")
    channels_last: bool = _opt(True, doc="NHWC weights and activations (faster convolutions)")
    compile: bool = _opt(False, doc="torch.compile the composite")
    max_nonfinite_steps: int = _opt(10, ge=1, doc="consecutive non-finite losses before stop")
    n_val_examples: int = _opt(500, ge=1, doc="validation images")
    max_steps: Optional[int] = _opt(None, ge=1, doc="stop after this many optimizer steps")
    n_detection_examples: int = _opt(200, ge=0, doc="held-out images of the detection AUCs "
                                     "at each validation (the first of the validation images); "
                                     "0 = off")
    detection_alpha: float = _opt(0.5, ge=0, le=1, doc="alpha of the fixed mixture that the "
                                  "non-adaptive detection attack (APGD-CE) aims at")
    reestimate_gamma_bn: bool = _opt(True, doc="before each validation and checkpoint, set the "
                                     "gamma BN's running statistics to those of the last "
                                     "training buffer (see docs/TRAINING.md)")

    def global_batch_size(self, world_size: int = 1) -> int:
        """Clean images per training step over all processes."""
        return self.per_process_batch_size(world_size) * world_size

    def per_process_batch_size(self, world_size: int = 1) -> int:
        """Clean images per training step in one process (``batch_size`` split evenly)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.batch_size is None:
            return self.batch_size_train_per_gpu
        if self.batch_size % world_size:
            raise ConfigError(f"expected a multiple of the number of processes ({world_size})",
                              key="training_settings.batch_size", value=self.batch_size)
        return self.batch_size // world_size


@dataclass(frozen=True, kw_only=True)
class PgdSettings:
    type: Literal["l_inf", "l_2"] = _opt("l_inf", normalize=_PGD_TYPE_NAMES,
                                         doc="threat model during training/validation")
    eps: float = _opt(DERIVED, gt=0, derived=True, doc="'default': 8/255 (l_inf), 0.5 (l_2)")
    iters_test: int = _opt(20, ge=1, doc="PGD iterations (validation)")
    alpha_test: float = _opt(0.0027, gt=0, doc="PGD step size (validation)")
    use_aa: bool = _opt(True, doc="validate with AutoAttack's APGD")
    n_target_classes: int = _opt(9, ge=1, doc="targets of APGD-T")
    pgd_eval_loss: Literal["ce", "dlr", "comp_simple"] = _opt("ce", doc="PGD loss")
    attacks_to_run: tuple[str, ...] = _opt(DERIVED, derived=True, normalize=_ATTACK_NAMES,
                                           choices=AUTOATTACK_NAMES,
                                           doc="'default': apgd-ce, apgd-t")


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    n_examples: int = _opt(10000, ge=1, doc="test images (the full CIFAR test set)")
    batch_size: int = _opt(200, ge=1, doc="evaluation batch size")
    device: str = _opt("auto", check=_device_check, doc="'auto', 'cpu', 'cuda', 'cuda:N'")
    precision: Literal["fp32", "bf16", "fp16"] = _opt("fp32", normalize=_PRECISION_NAMES,
                                                      doc="autocast dtype of the forward")
    channels_last: bool = _opt(True, doc="NHWC weights and activations (faster convolutions)")
    compile: bool = _opt(False, doc="torch.compile the composite")
    threads: Optional[int] = _opt(None, ge=1, doc="torch intra-op threads of the process (also "
                                  "for training); None = OMP_NUM_THREADS, else the cores")
    data_dir: str = _opt(DERIVED, derived=True, doc="'default': dataset_settings.path")
    output_dir: str = _opt(DERIVED, derived=True, doc="'default': log_dir/log_path")
    attacks_to_run: tuple[str, ...] = _opt(DERIVED, derived=True, normalize=_ATTACK_NAMES,
                                           choices=AUTOATTACK_NAMES,
                                           doc="AutoAttack attacks; 'default': standard")
    norm: Literal["Linf", "L2"] = _opt(DERIVED, derived=True, normalize=_NORM_NAMES,
                                       doc="'default': pgd_settings.type")
    eps: float = _opt(DERIVED, gt=0, derived=True, doc="'default': pgd_settings.eps")
    pgd: bool = _opt(False, doc="also run PGD")
    pgd_iters: int = _opt(DERIVED, ge=1, derived=True, doc="'default': pgd_settings.iters_test")
    pgd_step_size: float = _opt(DERIVED, gt=0, derived=True,
                                doc="'default': pgd_settings.alpha_test")
    pgd_loss: Literal["ce", "dlr", "comp"] = _opt(DERIVED, derived=True,
                                                  doc="'default': pgd_settings.pgd_eval_loss")
    adaptive_attack: bool = _opt(False, doc="also run the adaptive (mixer-aware) attack")
    adaptive_attack_weight: float = _opt(0.5, ge=0, le=1, doc="BCE weight w of that attack")
    adaptive_attack_iterations: int = _opt(100, ge=1, doc="APGD iterations of that attack")
    autoattack_iterations: int = _opt(100, ge=1, doc="APGD iterations inside AutoAttack "
                                      "(100 in the standard version)")
    save_adversarial: bool = _opt(False, doc="save the adversarial images")
    seed: int = _opt(DERIVED, derived=True, ge=0, le=MAX_SEED, doc="'default': top-level seed")

    @property
    def autoattack_version(self) -> str:
        """'standard' when the attack list and iterations are AutoAttack's standard ones, else
        'custom'."""
        standard = (set(self.attacks_to_run) == set(STANDARD_AUTOATTACK)
                    and self.autoattack_iterations == 100)
        return "standard" if standard else "custom"


@dataclass(frozen=True, kw_only=True)
class Config:
    seed: int = _opt(0, ge=0, le=MAX_SEED, doc="random seed")
    log_dir: str = _opt(".", doc="root folder of checkpoints (Base/, CompModel/) and outputs")
    log_path: str = _opt("results", doc="output folder, relative to log_dir")
    model_load_path: ModelLoadPath = _opt(doc="checkpoint paths")
    forward_settings: ForwardSettings = _opt(doc="the composite model")
    dataset_settings: DatasetSettings = _opt(doc="the dataset")
    training_settings: TrainingSettings = _opt(default_factory=TrainingSettings, doc="training")
    pgd_settings: PgdSettings = _opt(default_factory=PgdSettings, doc="attacks (training)")
    # eps, norm and n_target of the training attacks are pgd_settings' (filled in on loading).
    randomized_attack_settings: RandomizedAttackSettings = _opt(
        default_factory=RandomizedAttackSettings, doc="randomised training attacks",
        from_other_keys=("eps", "norm", "n_target"),
        fixed={"randomize": (True, "this project implements the randomized training attacks "
                             "only (docs/METHOD.md, 'Training'); narrow them with "
                             "eps_factor_scale, comp_loss_wmax or iters_const instead")})
    evaluation_settings: EvaluationSettings = _opt(default_factory=EvaluationSettings,
                                                   doc="evaluation CLI")
    # Not YAML keys: where the config came from (for messages) and the mapping it was read from
    # (so that apply_overrides re-derives 'default' values from the overridden keys).
    source: Optional[str] = field(default=None, compare=False, repr=False,
                                  metadata={"yaml": False})
    raw: Optional[Mapping[str, Any]] = field(default=None, compare=False, repr=False,
                                             metadata={"yaml": False})

    def __post_init__(self) -> None:
        _resolve_derived(self)

    @property
    def output_path(self) -> Path:
        return Path(self.log_dir) / self.log_path

    def model_path(self, which: Literal["std", "rob", "comp"]) -> Optional[Path]:
        """A ``model_load_path`` entry resolved against ``log_dir`` (None for comp: None)."""
        rel = getattr(self.model_load_path, which)
        return None if rel is None else Path(self.log_dir) / rel


# --------------------------------------------------------------------------------------------
# 'default' values that depend on other keys
# --------------------------------------------------------------------------------------------
def _resolve_derived(config: Config) -> None:
    fwd, pgd, ev = config.forward_settings, config.pgd_settings, config.evaluation_settings
    is_bit = fwd.std_model_type.startswith("bit_")
    if fwd.std_resize is DERIVED:
        fwd = dataclasses.replace(fwd, std_resize=BIT_STD_RESIZE if is_bit else None)
    elif fwd.std_resize is not None and not is_bit:
        raise ConfigError(f"expected None: resizing is supported for BiT STD models only, "
                          f"not {fwd.std_model_type!r}", key="forward_settings.std_resize",
                          value=fwd.std_resize)

    pgd_norm = "Linf" if pgd.type == "l_inf" else "L2"
    pgd = _fill(pgd, eps=DEFAULT_EPS[pgd_norm], attacks_to_run=TRAINING_ATTACKS)
    _check_plausible_eps(pgd.eps, pgd_norm, "pgd_settings.eps")
    if pgd.n_target_classes > config.dataset_settings.num_classes - 1:
        raise ConfigError(f"expected at most {config.dataset_settings.num_classes - 1} "
                          f"(classes of {config.dataset_settings.name} minus one)",
                          key="pgd_settings.n_target_classes", value=pgd.n_target_classes)

    ras = config.randomized_attack_settings
    ras = RandomizedAttackSettings(**{**ras.model_dump(), "eps": pgd.eps, "norm": pgd_norm,
                                      "n_target": pgd.n_target_classes})

    ev = _fill(ev, norm=pgd_norm)
    ev = _fill(ev, eps=pgd.eps if ev.norm == pgd_norm else DEFAULT_EPS[ev.norm],
               attacks_to_run=STANDARD_AUTOATTACK, data_dir=config.dataset_settings.path,
               output_dir=os.path.join(config.log_dir, config.log_path), seed=config.seed,
               pgd_iters=pgd.iters_test, pgd_step_size=pgd.alpha_test,
               pgd_loss="comp" if pgd.pgd_eval_loss == "comp_simple" else pgd.pgd_eval_loss)
    _check_plausible_eps(ev.eps, ev.norm, "evaluation_settings.eps")

    # Frozen dataclass: __post_init__ is the one place allowed to complete its own fields.
    object.__setattr__(config, "forward_settings", fwd)
    object.__setattr__(config, "pgd_settings", pgd)
    object.__setattr__(config, "randomized_attack_settings", ras)
    object.__setattr__(config, "evaluation_settings", ev)
    _assert_resolved(config, "")


def _check_plausible_eps(eps: float, norm: str, key: str) -> None:
    limit = MAX_PLAUSIBLE_EPS[norm]
    if eps <= limit:
        return
    hint = ""
    if norm == "Linf" and eps / 255 <= limit:
        hint = f"; did you mean {eps:g}/255 (= {eps / 255:.5f})? Write it as '{eps:g}/255'"
    raise ConfigError(f"an {norm} radius above {limit:.4g} is implausible for images in [0, 1]"
                      f"{hint}", key=key, value=eps)


def _fill(section: Any, **values: Any) -> Any:
    missing = {k: v for k, v in values.items() if getattr(section, k) is DERIVED}
    return dataclasses.replace(section, **missing) if missing else section


def _assert_resolved(obj: Any, path: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is DERIVED:
            raise ConfigError("has no rule to derive 'default' (a bug in config.py)",
                              key=_join(path, f.name))
        if dataclasses.is_dataclass(value):
            _assert_resolved(value, _join(path, f.name))


# --------------------------------------------------------------------------------------------
# Generic coercion
# --------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?inf(inity)?", re.IGNORECASE)
_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "yes", "on")
_FALSE_WORDS = ("false", "no", "off")


def _parse_section(cls: type, raw: Any, path: str, extra: Optional[dict] = None) -> Any:
    """Build dataclass ``cls`` from mapping ``raw`` (the YAML value at key path ``path``)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping with keys {_yaml_keys(cls)}",
                          key=path or "<top level>", value=raw)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    names = {alias: f.name for f in fields.values() for alias in f.metadata.get("aliases", ())}
    names.update({name: name for name in fields})
    kwargs: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key; expected one of {_yaml_keys(cls)}{hint}",
                              key=_join(path, str(key)), value=value)
        name = names[key]
        if name in given_as:
            raise ConfigError(f"given twice, as {given_as[name]!r} and {key!r}; keep one",
                              key=_join(path, key), value=value)
        given_as[name] = key
        kwargs[name] = _coerce_field(fields[name], hints[name], value, _join(path, key))
    for name, f in fields.items():
        if (name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise ConfigError(f"missing required key; expected {_describe(hints[name])}",
                              key=_join(path, name))
    try:
        return cls(**kwargs, **(extra or {}))
    except ConfigError as err:  # a check of the section's __post_init__ (keys relative to it)
        raise err.located(prefix=path) from None


def _parse_model(cls: type[BaseModel], raw: Any, path: str, meta: Mapping[str, Any]) -> Any:
    """A section that is a pydantic model: the YAML quirks of each value are coerced as for the
    dataclass sections, then the model checks. ``meta``: ``from_other_keys`` (fields filled from
    other sections, not YAML keys here) and ``fixed`` (authors' keys that must hold one value:
    {key: (value, why)})."""
    fixed = meta.get("fixed", {})
    keys = [k for k in cls.model_fields if k not in meta.get("from_other_keys", ())]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping with keys {keys + list(fixed)}", key=path,
                          value=raw)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        key_path = _join(path, str(key))
        if key in fixed:
            expected, why = fixed[key]
            if _coerce(type(expected), value, key_path) != expected:
                raise ConfigError(f"expected {str(expected).lower()}: {why}", key=key_path,
                                  value=value)
            continue
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys + list(fixed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key; expected one of {keys + list(fixed)}{hint}",
                              key=key_path, value=value)
        kwargs[key] = _coerce(cls.model_fields[key].annotation, value, key_path)
    try:
        return cls(**kwargs)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        problem = first["msg"].removeprefix("Value error, ").replace("Input should be ",
                                                                     "expected ")
        if not where:  # a check across keys; its message names them
            raise ConfigError(problem, key=path) from None
        raise ConfigError(problem, key=_join(path, where), value=raw.get(where)) from None


def _yaml_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def _coerce_field(f: dataclasses.Field, hint: Any, value: Any, path: str) -> Any:
    meta = f.metadata
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return _parse_model(hint, value, path, meta)
    if meta.get("derived") and (value is DERIVED or (
            isinstance(value, str) and value.strip().lower() in _DERIVED_WORDS)):
        return DERIVED
    normalize = meta.get("normalize")
    is_list = get_origin(hint) is tuple and get_args(hint)[-1] is Ellipsis
    try:
        result = _coerce(hint, normalize(value) if normalize and not is_list else value, path)
    except ConfigError as err:
        if err.key != path:  # from inside a nested section: already precise
            raise
        raise ConfigError(err.problem, key=path, value=value) from None  # value as written
    if normalize and is_list:
        result = tuple(normalize(item) for item in result)
    _check_constraints(result, meta, path, value)
    return result


def _check_constraints(result: Any, meta: Mapping[str, Any], path: str, value: Any) -> None:
    if result is None:
        return
    items = result if isinstance(result, tuple) else (result,)
    for item in items:
        if isinstance(item, float) and not meta.get("allow_inf") and math.isinf(item):
            raise ConfigError("expected a finite number", key=path, value=value)
        for op, bound, test in (("gt", ">", lambda a, b: a > b), ("ge", ">=", lambda a, b: a >= b),
                                ("le", "<=", lambda a, b: a <= b)):
            if op in meta and not test(item, meta[op]):
                raise ConfigError(f"expected a value {bound} {meta[op]}", key=path, value=value)
        if "choices" in meta:
            choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            if item not in choices:
                extra = ""
                if meta.get("normalize") is _model_type:
                    extra = f" or a short name {sorted(MODEL_TYPE_ALIASES)}"
                raise ConfigError(f"expected one of {list(choices)}{extra}", key=path, value=value)
    if "check" in meta:
        problem = meta["check"](result)
        if problem:
            raise ConfigError(problem, key=path, value=value)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Turn a YAML value into a value of type ``hint`` (or raise ConfigError)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _parse_section(hint, value, path)
    if origin is Union:
        if type(None) in args and (value is None or (
                isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
            return None
        (inner,) = [a for a in args if a is not type(None)]  # only Optional[X] is used
        try:
            return _coerce(inner, value, path)
        except ConfigError as err:
            raise ConfigError(err.problem + " or None", key=path, value=value) from None
    if origin is Literal:
        if isinstance(value, str):
            for choice in args:
                if value.strip().lower() == str(choice).lower():
                    return choice
        raise ConfigError(f"expected one of {list(args)}", key=path, value=value)
    if origin is tuple:
        return _coerce_tuple(hint, value, path)
    if origin in (dict, abc.Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError("expected a mapping of names to values, e.g. {width: 16}",
                              key=path, value=value)
        return FrozenDict(value)
    if hint is bool:
        return _coerce_bool(value, path)
    if hint is int:
        return _coerce_int(value, path)
    if hint is float:
        return _coerce_float(value, path)
    if hint is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise ConfigError("expected a non-empty string", key=path, value=value)
    raise TypeError(f"config.py cannot coerce to {hint!r} (at {path})")


def _coerce_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ConfigError("expected true or false", key=path, value=value)


def _coerce_float(value: Any, path: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        result = float(value.strip())  # the authors wrote '5e-5', which YAML reads as a string
    elif isinstance(value, str) and re.fullmatch(r"\s*[\d.eE+-]+\s*/\s*[\d.eE+-]+\s*", value):
        num, den = value.split("/")  # '8/255'
        try:
            result = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            raise ConfigError("expected a number such as 0.5, '5e-5' or '8/255'",
                              key=path, value=value) from None
    else:
        raise ConfigError("expected a number such as 0.5, '5e-5' or '8/255'", key=path,
                          value=value)
    if math.isnan(result):
        raise ConfigError("expected a number, not NaN", key=path, value=value)
    return result


def _coerce_int(value: Any, path: str) -> int:
    if isinstance(value, bool):
        return int(value)  # 'parallel: True' in the original files
    if isinstance(value, int):
        return value
    if isinstance(value, (float, str)):
        try:
            number = _coerce_float(value, path)
        except ConfigError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise ConfigError("expected an integer", key=path, value=value)


def _coerce_tuple(hint: Any, value: Any, path: str) -> tuple:
    args = get_args(hint)
    variadic = len(args) == 2 and args[1] is Ellipsis
    item_types = [args[0]] if variadic else list(args)
    expected = f"{_describe(hint)} such as '{_example(hint)}'"
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "([":
            try:
                items = ast.literal_eval(text)  # '(2., 0.4)' in the authors' files
            except (ValueError, SyntaxError):
                raise ConfigError(f"expected {expected}", key=path, value=value) from None
        elif variadic:
            items = [part.strip() for part in text.split(",") if part.strip()]
        else:
            raise ConfigError(f"expected {expected}", key=path, value=value)
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"expected {expected}", key=path, value=value)
    if not variadic and len(items) != len(item_types):
        raise ConfigError(f"expected {expected}", key=path, value=value)
    types = item_types * len(items) if variadic else item_types
    try:
        return tuple(_coerce(t, item, path) for t, item in zip(types, items))
    except ConfigError:
        raise ConfigError(f"expected {expected}", key=path, value=value) from None


def _example(hint: Any) -> str:
    args = get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return "[a, b]"
    return "(" + ", ".join({int: "64", float: "2.0"}.get(a, "x") for a in args) + ")"


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {_yaml_keys(hint)}"
    if origin is Union:
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or None"
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is tuple:
        plural = {int: "integers", float: "numbers", str: "strings"}.get(args[0], "values")
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural}"
        return f"a tuple of {len(args)} {plural}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "a mapping" if origin in (dict, abc.Mapping) else str(hint))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


def load_config(path: Union[str, os.PathLike]) -> Config:
    """Read and validate a YAML configuration file (authors' layout or this project's)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found").located(file=source) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the file: {err}").located(file=source) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"YAML syntax error{where}: {problem}").located(file=source) from None
    if raw is None:
        raise ConfigError("the file is empty; expected a mapping of sections").located(
            file=source)
    config = parse_config(raw, source=source)
    logger.debug("loaded configuration %s", source)
    return config


def parse_config(raw: Any, source: Optional[str] = None) -> Config:
    """Validate an already-parsed YAML mapping (``source`` names it in error messages)."""
    try:
        return _parse_section(Config, raw, "",
                              extra={"source": source, "raw": copy.deepcopy(raw)
                                     if isinstance(raw, Mapping) else None})
    except ConfigError as err:
        raise err.located(file=source) from None


def apply_overrides(config: Config, **overrides: Any) -> Config:
    """A new Config with some keys replaced, e.g. command-line flags.

    Keys are key paths with '.' or '__' between levels (``training_settings__lr=1e-4``, or
    ``**{"training_settings.lr": "1e-4"}``); a section name with a mapping overrides several of
    its keys. Values go through the same coercion and checks as the YAML file (so '5e-5' and
    'None' work) and 'default' values are derived again from the new keys. ``None`` values are
    skipped, so that unset command-line options can be passed straight through.
    """
    raw = copy.deepcopy(dict(config.raw)) if config.raw is not None else config_to_dict(config)
    applied = []
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.replace("__", ".").split(".")
        if len(parts) == 1 and isinstance(value, Mapping) and isinstance(raw.get(key), Mapping):
            for sub_key, sub_value in value.items():
                _set_raw(raw, [key, str(sub_key)], sub_value)
        else:
            _set_raw(raw, parts, value)
        applied.append(".".join(parts))
    if not applied:
        return config
    source = f"{config.source or '<config>'} (with overrides of {', '.join(applied)})"
    return parse_config(raw, source=source)


def _set_raw(raw: dict, parts: list[str], value: Any) -> None:
    node, cls = raw, Config
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError("cannot override a key inside a non-mapping value",
                              key=".".join(parts[:depth + 1]), value=child)
        node = child
        hints = get_type_hints(cls) if cls is not None else {}
        cls = hints.get(part) if dataclasses.is_dataclass(hints.get(part)) else None
    last = parts[-1]
    if cls is not None:
        # Setting a key replaces its aliases too ('std_scale' vs 'std_model_scale').
        for f in dataclasses.fields(cls):
            names = (f.name, *f.metadata.get("aliases", ()))
            if last in names:
                for name in names:
                    node.pop(name, None)
    node[last] = value


def config_to_dict(config: Any) -> dict:
    """The resolved configuration as plain YAML/JSON-friendly data (one key per field)."""
    if dataclasses.is_dataclass(config):
        out = {f.name: config_to_dict(getattr(config, f.name))
               for f in dataclasses.fields(config) if f.metadata.get("yaml", True)}
        for f in dataclasses.fields(config):  # keys that belong to another section
            for key in f.metadata.get("from_other_keys", ()):
                del out[f.name][key]
        return out
    if isinstance(config, BaseModel):
        return config.model_dump()
    if isinstance(config, tuple):
        return [config_to_dict(v) for v in config]  # type: ignore[return-value]
    if isinstance(config, Mapping):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config
