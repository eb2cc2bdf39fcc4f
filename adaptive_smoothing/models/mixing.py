"""The mixing ("policy") network that reads base models' feature maps and outputs gamma
(docs/METHOD.md, "Mixing network"): both models' (the paper's), or ROB's alone
(``forward_settings.mixer_inputs: rob_features``, docs/METHOD.md, "Mixer inputs")."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Channel plan (c0, c1, c2, c3) per base model, keyed by its first feature map's channel count
# (the authors' table). Other widths use (c, 2c, 4c, 8c), which the table's 64 row follows.
CHANNEL_PLANS: dict[int, tuple[int, int, int, int]] = {
    64: (64, 128, 256, 512),
    160: (160, 320, 512, 768),
    256: (256, 256, 384, 512),
    512: (512, 256, 384, 512),
}


def channel_plan(in_planes: int, width: Optional[float] = None) -> tuple[int, int, int, int]:
    """The plan (c0, c1, c2, c3) of a base model whose first feature map has ``in_planes``
    channels. ``width`` multiplies c2 and c3, the widths of the second and third stages
    (rounded, at least 1); c0 is the input's channel count and c1 is what V3 adds the second
    feature maps to, so both stay. None = the plan as is (the paper's)."""
    if in_planes <= 0:
        raise ValueError(f"in_planes must be positive, got {in_planes}")
    plan = CHANNEL_PLANS.get(in_planes,
                             (in_planes, 2 * in_planes, 4 * in_planes, 8 * in_planes))
    if width is None:
        return plan
    if not width > 0:
        raise ValueError(f"the mixing network's width multiplier must be positive, got {width}")
    c0, c1, c2, c3 = plan
    return (c0, c1, max(1, round(c2 * width)), max(1, round(c3 * width)))


class PreActBlock(nn.Module):
    """BN-ReLU, then the shortcut is taken from the activated input (authors' PreActBlock)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class MixingNet(nn.Module):
    """Mixing network V3 (``version=3``) or V4 (``version=4``, a 1x1 conv on the second features).

    ``in_planes`` are the first-feature channel counts of the models it reads, in the order of
    the feature lists given to :meth:`forward`: (STD, ROB), or (ROB,) alone. ``width``: see
    :func:`channel_plan`. Three stages of two PreActBlocks (first one stride 2), global average
    pool, Linear(P3 -> 1, no bias).
    """

    def __init__(self, in_planes: Sequence[int], version: int = 4,
                 width: Optional[float] = None) -> None:
        super().__init__()
        if version not in (3, 4):
            raise ValueError(f"mixing network version must be 3 or 4, got {version}")
        self.version = version
        self.in_planes = tuple(int(p) for p in in_planes)
        if not self.in_planes:
            raise ValueError("the mixing network needs the features of at least one model")
        self.width = width
        plans = [channel_plan(p, width) for p in self.in_planes]
        self.planes = tuple(int(sum(col)) for col in zip(*plans))
        width = self.planes[0]
        stages = []
        for planes in self.planes[1:]:
            stages.append(nn.Sequential(PreActBlock(width, planes, stride=2),
                                        PreActBlock(planes, planes, stride=1)))
            width = planes
        self.layers = nn.ModuleList(stages)
        self.linear = nn.Linear(self.planes[-1], 1, bias=False)
        if version == 4:
            in_1x1 = 2 * sum(plan[0] for plan in plans)
            out_1x1 = sum(plan[1] for plan in plans)
            self.conv1x1 = nn.Conv2d(in_1x1, out_1x1, kernel_size=1, bias=False)

    def forward(self, first_features: Sequence[torch.Tensor],
                second_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return gamma, shape (B, 1)."""
        feats1 = torch.cat(list(first_features), dim=1)
        feats2 = torch.cat(list(second_features), dim=1)
        if self.version == 4:
            feats2 = self.conv1x1(feats2)
        feats = self.layers[0](feats1)
        if feats.shape != feats2.shape:
            raise ValueError(f"mixing network: stage-1 output {tuple(feats.shape)} does not match "
                             f"the second features {tuple(feats2.shape)}; check in_planes "
                             f"{self.in_planes} against the base models")
        feats = feats + feats2
        for layer in self.layers[1:]:
            feats = layer(feats)
        return self.linear(F.adaptive_avg_pool2d(feats, 1).flatten(1))
