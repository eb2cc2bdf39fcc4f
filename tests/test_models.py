"""Architectures: the registry, feature maps, and the published model's parameter counts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from adaptive_smoothing.models import BaseClassifier, create_model, list_models, register_model
from adaptive_smoothing.models.wide_resnet import CIFAR10_MEAN, CIFAR100_MEAN
from adaptive_smoothing.published import build_published_composite


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def documented_channels(name: str) -> tuple[int, int]:
    """Feature channels as docs/METHOD.md ("Base models") states them, from the architecture's
    name."""
    if match := re.fullmatch(r"bit_[ms]_r\d+x(\d+)", name):
        width = int(match.group(1))
        return 256 * width, 512 * width
    if match := re.fullmatch(r"dm_wrn_\d+_(\d+)(_silu)?", name):
        width = int(match.group(1))
        return 16 * width, 32 * width
    # defaults: WRN-28-10, width 64; robustbench's RaWideResNet-70-16 (stages 216, 432, 864)
    return {"dm_wrn": (160, 320), "resnet18": (64, 128), "ra_wrn_70_16": (216, 432)}[name]


# Architectures built for one dataset only (robustbench's Peng2023Robust: CIFAR-10).
FIXED_CLASSES = {"ra_wrn_70_16": 10}


def test_published_cifar10_parameter_counts():
    with torch.device("meta"):  # the architecture only: no memory, no initialisation time
        composite = build_published_composite("cifar10", "edm")
    assert n_params(composite.std_model) == 232_279_178
    assert n_params(composite.rob_model) == 266_796_506
    assert n_params(composite.mixer) == 67_848_704
    assert composite.mixer.planes == (768, 512, 768, 1024)
    assert composite.std_model.feature_channels == (512, 1024)
    assert composite.rob_model.feature_channels == (256, 512)


def test_published_cifar100_differs_only_in_the_heads():
    with torch.device("meta"):
        composite = build_published_composite("cifar100", "trades")
    # 90 more classes: BiT's 1x1 head conv on 4096 channels, the WRN's linear on 1024.
    assert n_params(composite.std_model) == 232_279_178 + 90 * (4096 + 1)
    assert n_params(composite.rob_model) == 266_796_506 + 90 * (1024 + 1)
    assert tuple(composite.rob_model.normalize.mean.shape) == (1, 3, 1, 1)
    assert type(composite.rob_model.relu).__name__ == "Swish"  # DeepMind's, not nn.SiLU


@pytest.mark.parametrize("name", list_models())
def test_every_registered_architecture_builds(name):
    classes = FIXED_CLASSES.get(name, 7)
    with torch.device("meta"):
        model = create_model(name, num_classes=classes)
    assert isinstance(model, BaseClassifier) and model.num_classes == classes
    assert model.feature_channels == documented_channels(name)
    head = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    outputs = head.out_channels if isinstance(head, torch.nn.Conv2d) else head.out_features
    assert outputs == classes


@pytest.mark.parametrize("name, kwargs, spatial", [
    ("resnet18", {"width": 8}, (32, 16)),
    ("resnet18", {}, (32, 16)),
    ("dm_wrn", {"depth": 10, "width": 1, "activation": "silu"}, (32, 16)),
    ("dm_wrn", {"depth": 10, "width": 2, "activation": "swish"}, (32, 16)),
    ("bit_m_r50x1", {}, (8, 4)),  # root conv and max-pool: stride 4 at the first features
    ("bit_m_r50x1", {"resize_to": 128}, (32, 16)),  # the published STD input handling
])
def test_small_architectures_forward(name, kwargs, spatial):
    model = create_model(name, num_classes=10, **kwargs).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_features(x)
        logits = model(x)
    channels = model.feature_channels
    width = kwargs.get("width")
    if name == "resnet18" and width:
        assert channels == (width, 2 * width)
    elif name == "dm_wrn":
        assert channels == (16 * width, 32 * width)
    else:
        assert channels == documented_channels(name)
    assert out.logits.shape == (2, 10) and torch.equal(logits, out.logits)
    assert out.features[0].shape == (2, channels[0], spatial[0], spatial[0])
    assert out.features[1].shape == (2, channels[1], spatial[1], spatial[1])
    assert torch.isfinite(out.logits).all()


def test_wrn_normalises_with_the_dataset_statistics():
    cifar10 = create_model("dm_wrn", 10, depth=10, width=1)
    cifar100 = create_model("dm_wrn", 100, depth=10, width=1)
    assert torch.allclose(cifar10.normalize.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    assert torch.allclose(cifar100.normalize.mean.flatten(), torch.tensor(CIFAR100_MEAN))


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'wrn_1000_1'.*'resnet18'"):
        create_model("wrn_1000_1")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="'resnet18' registered twice"):
        register_model("resnet18")(lambda num_classes=10: None)


def test_the_torch_free_name_table_is_the_registry():
    from adaptive_smoothing.model_names import MODEL_NAMES
    assert list_models() == sorted(MODEL_NAMES)  # the config checks names against the table


def test_a_name_registered_at_run_time_is_a_valid_model_type(monkeypatch):
    from adaptive_smoothing.config import ConfigError, apply_overrides, load_config
    from adaptive_smoothing.models import registry

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    with pytest.raises(ConfigError, match="'my_net': expected one of"):
        apply_overrides(config, **{"forward_settings.std_model_type": "my_net"})
    monkeypatch.setitem(registry._MODEL_BUILDERS, "my_net", lambda num_classes=10: None)
    changed = apply_overrides(config, **{"forward_settings.std_model_type": "my_net"})
    assert changed.forward_settings.std_model_type == "my_net"
