"""BiT ResNet-v2 (Kolesnikov et al. 2020): weight-standardised convs, GroupNorm, pre-activation.

Parameter names follow the original BiT PyTorch code (root/body/head), so the published
checkpoints and robustbench's ``bit_rn`` state dicts load unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_smoothing.models.base import BaseClassifier, BaseOutput, Normalize
from adaptive_smoothing.models.registry import register_model


class StdConv2d(nn.Conv2d):
    """Conv2d with per-output-channel weight standardisation (eps 1e-10 as in BiT).

    A frozen model in eval mode (the composite's base models) standardises its weights once and
    reuses them: otherwise every forward of every attack step re-standardises all of them (236M
    for the published STD model). The cache holds the weight tensor it was computed from (so its
    memory cannot be reused by another tensor) and is recomputed when the weight's storage or
    version counter changes (load_state_dict, in-place edits, ``.to()``), and bypassed in
    training mode, when the weight requires grad, and in inference mode (inference tensors cannot
    take part in a later autograd graph).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._standardized: Optional[tuple[torch.Tensor, int, torch.Tensor]] = None

    def _standardize(self) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return (self.weight - mean) / torch.sqrt(var + 1e-10)

    def standardized_weight(self) -> torch.Tensor:
        if self.training or self.weight.requires_grad or torch.is_inference_mode_enabled():
            return self._standardize()
        weight = self.weight
        cached = self._standardized
        if (cached is not None and cached[0].data_ptr() == weight.data_ptr()
                and cached[1] == weight._version and cached[0].dtype == weight.dtype
                and cached[0].device == weight.device and cached[0].shape == weight.shape):
            return cached[2]
        with torch.no_grad():
            standardized = self._standardize()
        self._standardized = (weight.detach(), weight._version, standardized)
        return standardized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


def _tf2th(weights: np.ndarray) -> torch.Tensor:
    """TensorFlow HWIO conv kernels to PyTorch OIHW."""
    if weights.ndim == 4:
        weights = weights.transpose([3, 2, 0, 1])
    return torch.from_numpy(np.ascontiguousarray(weights))


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck; the stride sits on the 3x3 conv, as in BiT's PyTorch port."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cin)
        self.conv1 = _conv1x1(cin, cmid)
        self.gn2 = nn.GroupNorm(32, cmid)
        self.conv2 = _conv3x3(cmid, cmid, stride)
        self.gn3 = nn.GroupNorm(32, cmid)
        self.conv3 = _conv1x1(cmid, cout)
        self.relu = nn.ReLU()
        self.downsample = _conv1x1(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        residual = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + residual

    def tf_names(self, prefix: str) -> dict[str, str]:
        """Map this unit's parameter names to BiT's TensorFlow .npz names."""
        conv = "standardized_conv2d/kernel"
        names = {}
        for i, letter in enumerate("abc", start=1):
            names[f"conv{i}.weight"] = f"{prefix}{letter}/{conv}"
            names[f"gn{i}.weight"] = f"{prefix}{letter}/group_norm/gamma"
            names[f"gn{i}.bias"] = f"{prefix}{letter}/group_norm/beta"
        if self.downsample is not None:
            names["downsample.weight"] = f"{prefix}a/proj/{conv}"
        return names


def _stage(cin: int, cout: int, cmid: int, units: int, stride: int) -> nn.Sequential:
    layers = [("unit01", PreActBottleneck(cin, cout, cmid, stride))]
    layers += [(f"unit{i:02d}", PreActBottleneck(cout, cout, cmid)) for i in range(2, units + 1)]
    return nn.Sequential(OrderedDict(layers))


class ResNetV2(BaseClassifier):
    """BiT ResNet-v2. Inputs in [0, 1]; normalised inside with mean 0.5, std 0.5.

    ``resize_to`` bilinearly resizes inputs first (the published STD model sees 32x32 CIFAR
    images at 128x128). Features: outputs of body blocks 1 and 2.
    """

    def __init__(self, block_units: tuple[int, int, int, int], width_factor: int,
                 num_classes: int = 10, resize_to: Optional[int] = None) -> None:
        super().__init__()
        wf = width_factor
        self.num_classes = num_classes
        self.resize_to = resize_to
        # BiT divides by (std + 1e-8); kept so outputs match the original bit for bit.
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), eps=1e-8)
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, 64 * wf, kernel_size=7, stride=2, padding=3, bias=False)),
            ("pad", nn.ConstantPad2d(1, 0)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
        ]))
        self.body = nn.Sequential(OrderedDict([
            ("block1", _stage(64 * wf, 256 * wf, 64 * wf, block_units[0], 1)),
            ("block2", _stage(256 * wf, 512 * wf, 128 * wf, block_units[1], 2)),
            ("block3", _stage(512 * wf, 1024 * wf, 256 * wf, block_units[2], 2)),
            ("block4", _stage(1024 * wf, 2048 * wf, 512 * wf, block_units[3], 2)),
        ]))
        self.head = nn.Sequential(OrderedDict([
            ("gn", nn.GroupNorm(32, 2048 * wf)),
            ("relu", nn.ReLU()),
            ("avg", nn.AdaptiveAvgPool2d(output_size=1)),
            ("conv", nn.Conv2d(2048 * wf, num_classes, kernel_size=1, bias=True)),
        ]))
        self.feature_channels = (256 * wf, 512 * wf)

    def forward_features(self, x: torch.Tensor) -> BaseOutput:
        if self.resize_to is not None and x.shape[-1] != self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear")
        x = self.normalize(x)
        feat1 = self.body.block1(self.root(x))
        feat2 = self.body.block2(feat1)
        out = self.head(self.body.block4(self.body.block3(feat2)))
        return BaseOutput(out[..., 0, 0], (feat1, feat2))

    def tf_names(self, prefix: str = "resnet/") -> dict[str, str]:
        """Map every parameter name of this model to its name in BiT's .npz release."""
        names = {
            "root.conv.weight": f"{prefix}root_block/standardized_conv2d/kernel",
            "head.gn.weight": f"{prefix}group_norm/gamma",
            "head.gn.bias": f"{prefix}group_norm/beta",
            "head.conv.weight": f"{prefix}head/conv2d/kernel",
            "head.conv.bias": f"{prefix}head/conv2d/bias",
        }
        for bname, block in self.body.named_children():
            for uname, unit in block.named_children():
                for ours, theirs in unit.tf_names(f"{prefix}{bname}/{uname}/").items():
                    names[f"body.{bname}.{uname}.{ours}"] = theirs
        return names

    def state_dict_from_npz(self, weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Convert BiT .npz arrays to a state dict of this model (raises KeyError if absent)."""
        return {ours: _tf2th(np.asarray(weights[theirs]))
                for ours, theirs in self.tf_names().items()}


_BIT_VARIANTS = {
    "r50x1": ((3, 4, 6, 3), 1), "r50x3": ((3, 4, 6, 3), 3),
    "r101x1": ((3, 4, 23, 3), 1), "r101x3": ((3, 4, 23, 3), 3),
    "r152x2": ((3, 8, 36, 3), 2), "r152x4": ((3, 8, 36, 3), 4),
}


def _register_bit(name: str, units: tuple[int, int, int, int], width: int) -> None:
    def build(num_classes: int = 10, resize_to: Optional[int] = None) -> ResNetV2:
        return ResNetV2(units, width, num_classes=num_classes, resize_to=resize_to)
    build.__doc__ = f"BiT {name}: units {units}, width x{width}."
    for upstream in ("m", "s"):  # BiT-M and BiT-S share the architecture; only weights differ.
        register_model(f"bit_{upstream}_{name}")(build)


for _name, (_units, _width) in _BIT_VARIANTS.items():
    _register_bit(_name, _units, _width)
