"""The one interface every base classifier exposes to the composite model."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn


class BaseOutput(NamedTuple):
    """Logits plus the two intermediate feature maps the mixing network reads."""

    logits: torch.Tensor
    features: tuple[torch.Tensor, torch.Tensor]


class BaseClassifier(nn.Module):
    """A classifier on [0, 1] images that also exposes two feature maps.

    Subclasses implement :meth:`forward_features`; ``forward`` returns logits only, so a base
    model is an ordinary classifier for training, AutoAttack and RobustBench.
    ``feature_channels`` gives the channel counts of the two maps (the mixing network's plan is
    chosen from the first).
    """

    feature_channels: tuple[int, int]
    num_classes: int

    def forward_features(self, x: torch.Tensor) -> BaseOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits


class Normalize(nn.Module):
    """Per-channel (x - mean) / std; the constants are buffers so they follow ``.to(device)``.

    They are non-persistent: the published checkpoints hold no normalisation entries.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], eps: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + self.eps)
