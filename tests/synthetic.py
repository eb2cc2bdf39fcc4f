"""Small synthetic task and tiny trained models for fast, meaningful tests.

Each class is a fixed random colour pattern plus noise, so a tiny network learns it to ~100%
in a few dozen steps, and a large perturbation breaks it: attacks then have something to do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptive_smoothing.models import BaseClassifier, CompositeModel, MixingNet, create_model


def synthetic_data(n: int, num_classes: int = 10, seed: int = 0,
                   noise: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)  # the class patterns are fixed across calls
    patterns = torch.rand(num_classes, 3, 32, 32, generator=g)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.5 + 0.25 * (patterns[y] - 0.5) + noise * torch.randn(n, 3, 32, 32, generator=g)
    return x.clamp(0, 1), y


def train_tiny(model: BaseClassifier, steps: int = 40, seed: int = 0) -> BaseClassifier:
    torch.manual_seed(seed)
    x, y = synthetic_data(512, model.num_classes, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_base(seed: int = 0, train: bool = True, width: int = 4) -> BaseClassifier:
    torch.manual_seed(seed)
    model = create_model("resnet18", num_classes=10, width=width)
    return train_tiny(model, seed=seed) if train else model.eval()


def tiny_composite(mixer: bool = True, seed: int = 0, **kwargs) -> CompositeModel:
    std, rob = tiny_base(seed), tiny_base(seed + 1)
    net = MixingNet((std.feature_channels[0], rob.feature_channels[0]), version=3) if mixer \
        else None
    return CompositeModel(std, rob, net, **kwargs).eval()
