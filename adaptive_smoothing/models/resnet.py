"""CIFAR ResNet-18 (BasicBlock, 3x3 stem), with a width knob for small CPU experiments."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_smoothing.models.base import BaseClassifier, BaseOutput, Normalize
from adaptive_smoothing.models.registry import register_model
from adaptive_smoothing.models.wide_resnet import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN,
                                                   CIFAR100_STD)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(BaseClassifier):
    """ResNet for 32x32 inputs in [0, 1]; normalised inside with the CIFAR mean/std.

    Features: outputs of layer1 (``width`` channels) and layer2 (2 * ``width``).
    """

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__()
        cifar100 = num_classes == 100
        self.num_classes = num_classes
        self.normalize = Normalize(CIFAR100_MEAN if cifar100 else CIFAR10_MEAN,
                                   CIFAR100_STD if cifar100 else CIFAR10_STD)
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths = (width, 2 * width, 4 * width, 8 * width)
        in_planes = width
        layers = []
        for i, (planes, blocks) in enumerate(zip(widths, num_blocks)):
            strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(widths[3], num_classes)
        self.feature_channels = (widths[0], widths[1])

    def forward_features(self, x: torch.Tensor) -> BaseOutput:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        feat1 = self.layer1(out)
        feat2 = self.layer2(feat1)
        out = self.layer4(self.layer3(feat2))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return BaseOutput(self.linear(out), (feat1, feat2))


@register_model("resnet18")
def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """CIFAR ResNet-18; ``width`` is the stem width (64 in the paper, smaller for CPU demos)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width)
