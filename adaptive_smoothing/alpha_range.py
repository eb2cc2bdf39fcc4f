"""The one check that a composite's alpha range lies in [0, 1]: used by the model
(``models/composite.py``, which re-exports it), ``CompositeConstants`` and the config schema.

Torch-free, so that the config package validates without torch.
"""
from __future__ import annotations

__all__ = ["ALPHA_RANGE_TOLERANCE", "check_alpha_range"]

# How far alpha_bias + alpha_scale may exceed 1. Not 0: robustbench's checkpoints store the two
# as float32 scalars, and float32 round-off of numbers whose exact sum is 1 exceeds 1 by up to
# ~1e-7 (0.85 + 0.15 in float32: 1 + 3e-8), which must load. Any real excess is far above this.
ALPHA_RANGE_TOLERANCE = 1e-6


def check_alpha_range(alpha_bias: float, alpha_scale: float) -> None:
    """ValueError unless the alpha range (alpha_bias, alpha_bias + alpha_scale) lies in [0, 1]."""
    if alpha_bias < 0 or alpha_scale < 0 or alpha_bias + alpha_scale > 1 + ALPHA_RANGE_TOLERANCE:
        raise ValueError(f"alpha range (alpha_bias, alpha_bias + alpha_scale) = "
                         f"({alpha_bias}, {alpha_bias + alpha_scale}) must lie in [0, 1]")
