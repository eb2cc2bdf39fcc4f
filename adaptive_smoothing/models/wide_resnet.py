"""DeepMind's WideResNet (Gowal et al. 2020; Wang et al. 2023 "DM-Improves-AT").

Parameter names follow DeepMind's PyTorch model zoo (init_conv/layer/batchnorm/logits), as used by
the published ROB checkpoints and robustbench's ``dm_rn.WideResNet``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_smoothing.models.base import BaseClassifier, BaseOutput, Normalize
from adaptive_smoothing.models.registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class _SwishFunction(torch.autograd.Function):
    """DeepMind's swish with a hand-written backward (same values as SiLU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(x)
        return grad_output * (sig * (1 + x * (1 - sig)))


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwishFunction.apply(x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"swish": Swish, "silu": nn.SiLU, "relu": nn.ReLU}


class _Block(nn.Module):
    """Pre-activation block; stride-2 convs pad (0, 1, 0, 1) like TensorFlow's SAME."""

    def __init__(self, in_planes: int, out_planes: int, stride: int,
                 activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}; expected 1 or 2")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                         if self.has_shortcut else None)
        self._padding = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu_0(self.batchnorm_0(x))
        # With a projection shortcut, DeepMind's block projects the *activated* input.
        residual = self.shortcut(activated) if self.shortcut is not None else x
        out = self.conv_0(F.pad(activated, self._padding))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return residual + out


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int,
                 activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.block = nn.Sequential(*[
            _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                   activation)
            for i in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(BaseClassifier):
    """WRN-depth-width on [0, 1] inputs, normalised inside with the dataset mean/std.

    Features: outputs of block groups 1 and 2 (16w and 32w channels).
    """

    def __init__(self, num_classes: int = 10, depth: int = 28, width: int = 10,
                 activation: str = "swish", mean: Optional[tuple[float, ...]] = None,
                 std: Optional[tuple[float, ...]] = None) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[activation]
        cifar100 = num_classes == 100
        self.num_classes = num_classes
        self.normalize = Normalize(mean or (CIFAR100_MEAN if cifar100 else CIFAR10_MEAN),
                                   std or (CIFAR100_STD if cifar100 else CIFAR10_STD))
        channels = (16, 16 * width, 32 * width, 64 * width)
        num_blocks = (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(num_blocks, channels[0], channels[1], 1, act),
            _BlockGroup(num_blocks, channels[1], channels[2], 2, act),
            _BlockGroup(num_blocks, channels[2], channels[3], 2, act))
        self.batchnorm = nn.BatchNorm2d(channels[3])
        self.relu = act()
        self.logits = nn.Linear(channels[3], num_classes)
        self.feature_channels = (channels[1], channels[2])

    def forward_features(self, x: torch.Tensor) -> BaseOutput:
        out = self.init_conv(self.normalize(x))
        feat1 = self.layer[0](out)
        feat2 = self.layer[1](feat1)
        out = self.relu(self.batchnorm(self.layer[2](feat2)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return BaseOutput(self.logits(out), (feat1, feat2))


def _register_wrn(name: str, depth: int, width: int, activation: str) -> None:
    def build(num_classes: int = 10, **kwargs) -> WideResNet:
        return WideResNet(num_classes, depth=depth, width=width, activation=activation, **kwargs)
    build.__doc__ = f"DeepMind WRN-{depth}-{width} with {activation}."
    register_model(name)(build)


for _depth, _width in ((28, 10), (34, 10), (70, 16)):
    _register_wrn(f"dm_wrn_{_depth}_{_width}", _depth, _width, "swish")
    _register_wrn(f"dm_wrn_{_depth}_{_width}_silu", _depth, _width, "silu")


@register_model("dm_wrn")
def dm_wrn(num_classes: int = 10, depth: int = 28, width: int = 10, activation: str = "swish",
           **kwargs) -> WideResNet:
    """Any depth/width, e.g. ``create_model("dm_wrn", depth=16, width=2, activation="silu")``."""
    return WideResNet(num_classes, depth=depth, width=width, activation=activation, **kwargs)
