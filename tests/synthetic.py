"""Small synthetic task and tiny trained models for fast, meaningful tests.

Each class is a fixed random colour pattern plus noise, so a tiny network learns it to ~100%
in a few dozen steps, and a large perturbation breaks it: attacks then have something to do.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adaptive_smoothing.models import BaseClassifier, CompositeModel, MixingNet, create_model


def synthetic_data(n: int, num_classes: int = 10, seed: int = 0,
                   noise: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)  # the class patterns are fixed across calls
    patterns = torch.rand(num_classes, 3, 32, 32, generator=g)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.5 + 0.25 * (patterns[y] - 0.5) + noise * torch.randn(n, 3, 32, 32, generator=g)
    return x.clamp(0, 1), y


def write_npz(path: Path, n: int, seed: int) -> None:
    """The offline .npz format of data.py (JPEG bytes, offsets, labels) with random images."""
    rng = np.random.default_rng(seed)
    chunks, offsets = [], [0]
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=95)
        chunks.append(np.frombuffer(buffer.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(chunks[-1]))
    np.savez(path, jpeg=np.concatenate(chunks), offsets=np.array(offsets),
             labels=rng.integers(0, 10, n))


def make_tiny_training_root(root: Path) -> Path:
    """A mixer training's inputs under ``root``: base checkpoints Base/std.pt and Base/rob.pt
    (ResNet-18 width 2, two seeds) and data/ with 8 train / 4 test random images (.npz)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_npz(root / "data" / "train.npz", 8, 0)
    write_npz(root / "data" / "test.npz", 4, 1)
    (root / "Base").mkdir()
    for name, seed in (("std", 1), ("rob", 2)):
        torch.manual_seed(seed)
        model = create_model("resnet18", 10, width=2)
        with torch.no_grad():  # confident base models, so that attacks and losses are not flat
            model.linear.weight.mul_(20)
        torch.save({"model": model.state_dict()}, root / "Base" / f"{name}.pt")
    return root


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


# Trained tiny bases by (seed, width): their weights and the global RNG state the training left.
# Training on the CPU is deterministic, so training again would give the same weights bit for
# bit; the tests build these models dozens of times, and the training is most of their cost.
_TRAINED: dict[tuple[int, int], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}


def tiny_base(seed: int = 0, train: bool = True, width: int = 4) -> BaseClassifier:
    torch.manual_seed(seed)
    model = create_model("resnet18", num_classes=10, width=width)
    if not train:
        return model.eval()
    if (seed, width) not in _TRAINED:
        train_tiny(model, seed=seed)
        _TRAINED[seed, width] = ({k: v.clone() for k, v in model.state_dict().items()},
                                 torch.get_rng_state())
    weights, rng_state = _TRAINED[seed, width]
    model.load_state_dict(weights)
    torch.set_rng_state(rng_state)  # as if it had just been trained
    return model.eval()


def tiny_composite(mixer: bool = True, seed: int = 0, **kwargs) -> CompositeModel:
    std, rob = tiny_base(seed), tiny_base(seed + 1)
    net = MixingNet((std.feature_channels[0], rob.feature_channels[0]), version=3) if mixer \
        else None
    return CompositeModel(std, rob, net, **kwargs).eval()
