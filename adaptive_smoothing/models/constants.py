"""The fixed numbers of a composite model (docs/METHOD.md, "Published models").

They are plain floats on :class:`~adaptive_smoothing.models.composite.CompositeModel`, not
tensors of its state dict: the published-model table states them, and robustbench's state dict
stores them as scalar Parameters (converted in ``checkpoints.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from adaptive_smoothing.models.composite import CompositeModel, check_alpha_range


@dataclass(frozen=True)
class CompositeConstants:
    """The fixed numbers of a composite model that are not tensors in our state dict."""

    std_scale: float
    rob_scale: float
    eval_gamma: tuple[float, float]  # (scale, bias)
    alpha_scale: float
    alpha_bias: float

    @classmethod
    def from_composite(cls, composite: CompositeModel) -> "CompositeConstants":
        return cls(composite.std_scale, composite.rob_scale, tuple(composite.eval_gamma),
                   composite.alpha_scale, composite.alpha_bias)

    def __post_init__(self) -> None:
        if not (self.std_scale > 0 and self.rob_scale > 0):
            raise ValueError(f"logit scales must be positive, got std_scale={self.std_scale}, "
                             f"rob_scale={self.rob_scale}")
        check_alpha_range(self.alpha_bias, self.alpha_scale)

    def apply_to(self, composite: CompositeModel) -> None:
        """Set these constants on ``composite``."""
        composite.std_scale = float(self.std_scale)
        composite.rob_scale = float(self.rob_scale)
        composite.eval_gamma = (float(self.eval_gamma[0]), float(self.eval_gamma[1]))
        composite.alpha_scale = float(self.alpha_scale)
        composite.alpha_bias = float(self.alpha_bias)
