"""RobustBench's architectures and model zoo as base classifiers (docs/METHOD.md, "RobustBench
models as base classifiers").

- ``ra_wrn_70_16`` (registry name): robustbench's RaWideResNet-70-16 (Peng et al. 2023,
  ``robustarch_wide_resnet.get_model('ra_wrn70_16')``), the ROB model of the published CIFAR-10
  MixedNUTS mixture. The architecture is robustbench's own module, not a copy.
- ``robustbench:<Name>`` (a config's ``std_model_type`` / ``rob_model_type``): any zoo entry,
  loaded with robustbench's ``load_model(Name, model_dir, dataset, 'Linf')``, which reads
  ``<model_dir>/<dataset>/Linf/<Name>.pt`` and downloads the file only where it is missing.

Both are wrapped in :class:`RobustBenchClassifier`, whose state-dict keys are robustbench's
(the wrapper adds no prefix), so RobustBench's files load into it unchanged. Logits are all the
nonlinear composite needs; the trained mixer also reads two feature maps, taken by forward hooks
at named modules of the known architecture families (:data:`FEATURE_MODULES`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from adaptive_smoothing.errors import UserError
from adaptive_smoothing.models.base import BaseClassifier, BaseOutput
from adaptive_smoothing.models.registry import register_model

logger = logging.getLogger(__name__)

ZOO_PREFIX = "robustbench:"
ZOO_THREAT_MODEL = "Linf"  # the only threat model this project evaluates
DATASET_BY_CLASSES = {10: "cifar10", 100: "cifar100"}
ROBUSTBENCH_REQUIREMENT = "robustbench==1.1.1"

# Module names (relative to the architecture's root) whose outputs are the two feature maps: the
# first and second stage, at 1/1 and 1/2 of the input resolution, like the project's own
# WideResNet and ResNet (and, with them, the channel plans of the mixing network). Keyed by the
# class name of robustbench's module (or of a class it derives from).
FEATURE_MODULES: dict[str, tuple[str, str]] = {
    "DMWideResNet": ("layer.0", "layer.1"),           # dm_wide_resnet (DeepMind WRN)
    "NormalizedWideResNet": ("layer.0", "layer.1"),   # robustarch_wide_resnet (RaWideResNet)
    "WideResNet": ("block1", "block2"),               # wide_resnet (Zagoruyko's WRN)
    "ResNet": ("layer1", "layer2"),                   # resnet (ResNet-18/34/50)
    "PreActResNet": ("layer1", "layer2"),             # resnet (PreAct ResNet-18)
    "DMPreActResNet": ("layer_0", "layer_1"),         # dm_wide_resnet (DeepMind PreAct ResNet)
}
# The input the feature channel counts are read from (one dry forward pass): CIFAR's size.
_PROBE_SHAPE = (1, 3, 32, 32)


class RobustBenchMissingError(UserError, ImportError):
    """robustbench is not installed, and a model needs it."""


def import_robustbench_for(what: str) -> Any:
    """robustbench (with the project's ``autoattack`` alias), or a one-line error naming
    ``what`` needs it."""
    try:
        from adaptive_smoothing.compat import import_robustbench
        return import_robustbench()
    except ImportError as err:
        raise RobustBenchMissingError(
            f"{what} needs robustbench, which is not installed ({err}); install it with "
            f"pip install {ROBUSTBENCH_REQUIREMENT}") from None


def is_zoo_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(ZOO_PREFIX)


def zoo_model_name(name: str) -> str:
    """``robustbench:Peng2023Robust`` -> ``Peng2023Robust``."""
    return name[len(ZOO_PREFIX):].strip()


def _feature_modules(module: nn.Module) -> Optional[tuple[str, str]]:
    """Full names of the two feature modules: at the first submodule (the root included) whose
    class is a known family, so that zoo wrappers (e.g. a normalisation in front) are looked
    through; None for an unknown architecture."""
    for prefix, sub in module.named_modules():
        # Subclasses count (robustbench's Wong2020FastNet is a PreActResNet).
        names = next((FEATURE_MODULES[c.__name__] for c in type(sub).__mro__
                      if c.__name__ in FEATURE_MODULES), None)
        if names is None:
            continue
        full = tuple(f"{prefix}.{n}" if prefix else n for n in names)
        known = dict(module.named_modules())
        if all(n in known for n in full):
            return full  # type: ignore[return-value]
    return None


class RobustBenchClassifier(BaseClassifier):
    """A robustbench module as a base classifier on [0, 1] images.

    ``self.model`` is robustbench's module; the state dict drops the ``model.`` prefix (and
    loading adds it back), so the keys are exactly robustbench's and its files load strictly.
    """

    def __init__(self, module: nn.Module, num_classes: int, name: str) -> None:
        super().__init__()
        self.model = module
        self.num_classes = num_classes
        self.arch_name = name
        self._feature_names = _feature_modules(module)
        self._channels: Optional[tuple[int, int]] = None
        self.register_state_dict_post_hook(_drop_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _require_features(self) -> tuple[str, str]:
        if self._feature_names is None:
            raise ValueError(
                f"{self.arch_name} ({type(self.model).__name__}) exposes no feature maps for "
                f"the mixing network: known architectures are {sorted(FEATURE_MODULES)}; use it "
                f"in a nonlinear composite (nonlinear_settings.enabled) or with "
                f"forward_settings.use_policy false")
        return self._feature_names

    def forward_features(self, x: torch.Tensor) -> BaseOutput:
        names = self._require_features()
        modules = dict(self.model.named_modules())
        captured: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
                captured[name] = output
            return hook

        handles = [modules[n].register_forward_hook(keep(n)) for n in names]
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return BaseOutput(logits, (captured[names[0]], captured[names[1]]))

    @property
    def feature_channels(self) -> tuple[int, int]:  # type: ignore[override]
        """Channel counts of the two maps, read once from a dry forward pass at CIFAR's size
        (the architectures' own attributes differ from family to family)."""
        if self._channels is None:
            self._require_features()
            param = next(self.parameters())
            was_training = self.training
            self.eval()
            with torch.no_grad():
                probe = torch.zeros(_PROBE_SHAPE, device=param.device, dtype=param.dtype)
                features = self.forward_features(probe).features
            self.train(was_training)
            self._channels = (int(features[0].shape[1]), int(features[1].shape[1]))
        return self._channels


def _drop_model_prefix(module: nn.Module, state_dict: dict, prefix: str,
                       local_metadata: Any) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_model_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any,
                      strict: bool, missing_keys: list, unexpected_keys: list,
                      error_msgs: list) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)
                and not k.startswith(prefix + "model.")]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


@register_model("ra_wrn_70_16")
def ra_wrn_70_16(num_classes: int = 10) -> RobustBenchClassifier:
    """robustbench's RaWideResNet-70-16 (Peng2023Robust; CIFAR-10 only)."""
    if num_classes != 10:
        raise ValueError(f"ra_wrn_70_16 (robustbench's RaWideResNet-70-16) is a CIFAR-10 "
                         f"architecture with 10 classes, got num_classes={num_classes}")
    import_robustbench_for("ra_wrn_70_16 (RaWideResNet-70-16)")
    from robustbench.model_zoo.architectures.robustarch_wide_resnet import get_model

    return RobustBenchClassifier(get_model("ra_wrn70_16"), 10, "ra_wrn_70_16")


def load_zoo_model(name: str, num_classes: int,
                   model_dir: Union[str, Path, None] = None) -> RobustBenchClassifier:
    """The zoo model ``robustbench:<Name>`` (or ``<Name>``) for the dataset with
    ``num_classes`` classes and Linf, through robustbench's ``load_model`` (its local model
    folder ``<model_dir>/<dataset>/Linf/<Name>.pt`` first, a download otherwise)."""
    zoo_name = zoo_model_name(name) if is_zoo_name(name) else name
    dataset = DATASET_BY_CLASSES.get(num_classes)
    if dataset is None:
        raise ValueError(f"RobustBench model {zoo_name!r}: no CIFAR dataset has {num_classes} "
                         f"classes (expected 10 or 100)")
    robustbench = import_robustbench_for(f"RobustBench model {zoo_name!r}")
    from robustbench.model_zoo import model_dicts

    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    entries = model_dicts[BenchmarkDataset(dataset)][ThreatModel(ZOO_THREAT_MODEL)]
    if zoo_name not in entries:
        close = sorted(n for n in entries if n.lower().startswith(zoo_name[:4].lower()))[:5]
        raise ValueError(f"unknown RobustBench model {zoo_name!r} for {dataset}/"
                         f"{ZOO_THREAT_MODEL}; expected a name of robustbench's model zoo"
                         + (f", e.g. {close}" if close else ""))
    model_dir = Path(model_dir) if model_dir is not None else Path("models")
    local = model_dir / dataset / ZOO_THREAT_MODEL / f"{zoo_name}.pt"
    if not local.is_file():
        logger.info("%s not found: robustbench downloads it", local)
    module = robustbench.utils.load_model(zoo_name, model_dir=str(model_dir), dataset=dataset,
                                          threat_model=ZOO_THREAT_MODEL)
    logger.info("loaded RobustBench model %s (%s/%s) from %s", zoo_name, dataset,
                ZOO_THREAT_MODEL, model_dir)
    return RobustBenchClassifier(module.eval(), num_classes, ZOO_PREFIX + zoo_name)
