"""The published-model table (published.py) against the shipped configs and the layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptive_smoothing.config import load_config
from adaptive_smoothing.factory import build_composite
from adaptive_smoothing.models import CompositeConstants
from adaptive_smoothing.published import (PUBLISHED_MODELS, WEIGHT_FILES,
                                          build_published_composite, weight_file_for)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = {"cifar10_edm.yaml": ("cifar10", "edm"), "cifar100_edm.yaml": ("cifar100", "edm"),
           "cifar100_trades.yaml": ("cifar100", "trades")}


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_every_published_model_has_a_shipped_config() -> None:
    assert sorted(SHIPPED.values()) == sorted(PUBLISHED_MODELS)


@pytest.mark.parametrize("config_name", sorted(SHIPPED))
def test_shipped_config_drifts_from_the_table(config_name: str) -> None:
    """Architectures, constants and file names of a shipped config are the table's."""
    spec = PUBLISHED_MODELS[SHIPPED[config_name]]
    config = load_config(CONFIG_DIR / config_name)
    # Meta tensors carry shapes without memory: the full BiT + WRN-70-16 builds in seconds.
    with torch.device("meta"):
        ours = build_composite(config.forward_settings, config.dataset_settings.num_classes,
                               device="meta")
        published = build_published_composite(spec.dataset, spec.name)
    for part in ("std_model", "rob_model", "mixer", "gamma_bn"):
        a, b = getattr(ours, part), getattr(published, part)
        assert type(a) is type(b), part
        assert _shapes(a) == _shapes(b), part  # depth, width, classes, mixer inputs
    assert type(ours.rob_model.relu) is type(published.rob_model.relu)  # SiLU or Swish
    assert ours.std_model.resize_to == published.std_model.resize_to == spec.std_resize
    assert CompositeConstants.from_composite(ours) == spec.constants
    paths = {"std": spec.std, "rob": spec.rob, "comp": spec.mixer}
    for which, weight_file in paths.items():
        relative = getattr(config.model_load_path, which)
        assert relative in weight_file.names, which
        assert weight_file_for(relative) == weight_file


def test_file_names_are_unique_and_in_the_authors_layout() -> None:
    names = [name for f in WEIGHT_FILES for name in f.names]
    assert len(names) == len(set(names))
    assert len({f.name for f in WEIGHT_FILES}) == len(WEIGHT_FILES) == 8
    for f in WEIGHT_FILES:
        folder = "CompModel" if f.kind == "mixer" else "Base"
        assert all(name.startswith(folder + "/") and f.dataset + "_" in name for name in f.names)
        assert (f.drive_id is not None) == (f.host == "gdrive")
        assert (f.hf_repo is not None) == (f.host == "huggingface")
    # Both CIFAR-100 mixers use the one CIFAR-100 BiT file.
    assert PUBLISHED_MODELS["cifar100", "edm"].std is PUBLISHED_MODELS["cifar100", "trades"].std
