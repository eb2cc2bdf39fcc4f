"""The model names a config is checked against, as tables that need no torch: the registered
base architectures, the kinds of mixer input (``MixerInputs``) and of gamma normalisation
(``GammaNorm``), both read by ``models/composite.py``.

The config checks ``forward_settings.std_model_type`` / ``rob_model_type`` against it, so that
loading and validating a config does not import torch and every architecture module (names
registered at run time with ``register_model`` are accepted too once the registry is loaded).
``tests/test_models.py`` checks that the table is the built-in architectures' registry: add a new
architecture's name here.
"""
from __future__ import annotations

from typing import Literal, get_args

__all__ = ["GAMMA_NORMS", "GammaNorm", "MIXER_INPUTS", "MODEL_NAMES", "MixerInputs"]

# What the mixer reads (docs/METHOD.md, "Mixer inputs").
MixerInputs = Literal["both", "rob_features", "rob_logits"]
MIXER_INPUTS: tuple[str, ...] = get_args(MixerInputs)

# How the mixer's output becomes gamma (docs/METHOD.md, "Gamma normalisation"): the paper's
# clamp + BatchNorm + (scale, bias) constants, or the mixer's output as it is.
GammaNorm = Literal["batchnorm", "none"]
GAMMA_NORMS: tuple[str, ...] = get_args(GammaNorm)

_BIT_SIZES = ("r50x1", "r50x3", "r101x1", "r101x3", "r152x2", "r152x4")

MODEL_NAMES: frozenset[str] = frozenset({
    # models/bit.py: BiT ResNet-v2, upstream M (ImageNet-21k) and S (ImageNet-1k)
    *(f"bit_{upstream}_{size}" for upstream in ("m", "s") for size in _BIT_SIZES),
    # models/wide_resnet.py: DeepMind's WRNs (Swish, or SiLU with the _silu suffix)
    "dm_wrn", "dm_wrn_28_10", "dm_wrn_28_10_silu", "dm_wrn_34_10", "dm_wrn_34_10_silu",
    "dm_wrn_70_16", "dm_wrn_70_16_silu",
    # models/robustbench_zoo.py: RaWideResNet-70-16 (Peng2023Robust)
    "ra_wrn_70_16",
    # models/resnet.py: CIFAR ResNet-18
    "resnet18",
})
