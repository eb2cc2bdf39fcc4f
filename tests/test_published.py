"""The published-model table (published.py) against the shipped configs and the layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptive_smoothing.config import load_config
from adaptive_smoothing.factory import build_composite
from adaptive_smoothing.models import CompositeConstants
from adaptive_smoothing.models.nonlinear import NonlinearComposite, NonlinearConstants
from adaptive_smoothing.published import (PUBLISHED_MODELS, WEIGHT_FILES,
                                          build_published_composite, weight_file_for)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = {"cifar10_edm.yaml": ("cifar10", "edm"), "cifar100_edm.yaml": ("cifar100", "edm"),
           "cifar100_trades.yaml": ("cifar100", "trades"),
           "cifar10_mixednuts.yaml": ("cifar10", "mixednuts"),
           "cifar100_mixednuts.yaml": ("cifar100", "mixednuts")}


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
                               device="meta", nonlinear=config.nonlinear_settings)
        published = build_published_composite(spec.dataset, spec.name)
    if spec.kind == "nonlinear":
        assert isinstance(ours, NonlinearComposite) and isinstance(published, NonlinearComposite)
        for part in ("std_model", "rob_model"):
            a, b = getattr(ours, part), getattr(published, part)
            assert type(a) is type(b), part
            # A RobustBench architecture: the same robustbench module inside.
            assert type(getattr(a, "model", a)) is type(getattr(b, "model", b)), part
            assert _shapes(a) == _shapes(b), part
        assert ours.std_model.resize_to == published.std_model.resize_to == spec.std_resize
        assert NonlinearConstants.from_composite(ours) == spec.nonlinear
        assert NonlinearConstants.from_composite(published) == spec.nonlinear
        assert (ours.std_scale, ours.rob_scale, ours.surrogate_raw_share) == (1.0, 1.0, 0.9)
        assert config.model_load_path.comp is None
        for which, weight_file in {"std": spec.std, "rob": spec.rob}.items():
            relative = getattr(config.model_load_path, which)
            assert relative in weight_file.names, which
            assert weight_file_for(relative) == weight_file
        return
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
    assert len({f.name for f in WEIGHT_FILES}) == len(WEIGHT_FILES) == 9
    for f in WEIGHT_FILES:
        folder = "CompModel" if f.kind == "mixer" else "Base"
        assert all(name.startswith(folder + "/") for name in f.names)
        # RobustBench's own file keeps its RobustBench name; the authors' names their dataset.
        if f.name != "cifar10_peng2023robust_rob":
            assert all(f.dataset + "_" in name for name in f.names)
        assert (f.drive_id is not None) == (f.host == "gdrive")
        assert (f.hf_repo is not None) == (f.host == "huggingface")
    # Both CIFAR-100 mixers use the one CIFAR-100 BiT file.
    assert PUBLISHED_MODELS["cifar100", "edm"].std is PUBLISHED_MODELS["cifar100", "trades"].std
    # MixedNUTS reuses the BiT files, and on CIFAR-100 the EDM ROB (Wang2023Better_WRN-70-16).
    for dataset in ("cifar10", "cifar100"):
        assert PUBLISHED_MODELS[dataset, "mixednuts"].std is PUBLISHED_MODELS[dataset, "edm"].std
    assert PUBLISHED_MODELS["cifar100", "mixednuts"].rob is PUBLISHED_MODELS["cifar100", "edm"].rob
    assert PUBLISHED_MODELS["cifar10", "mixednuts"].rob.target == "Base/Peng2023Robust.pt"


def test_mixednuts_constants_are_robustbench_s():
    """The table's MixedNUTS constants are those robustbench 1.1.1 builds its entries with."""
    import yaml

    from adaptive_smoothing.compat import import_robustbench
    robustbench = import_robustbench()
    folder = Path(robustbench.__file__).parent / "model_zoo" / "architectures"
    table = yaml.safe_load((folder / "optimal_spca.yaml").read_text())
    for dataset, rob_name in (("cifar10", "Peng2023Robust"),
                              ("cifar100", "Wang2023Better_WRN-70-16")):
        entry = table[dataset][rob_name]
        gelu = entry["gelu"][entry["gelu"]["default_beta"]]
        linear = entry["none"][entry["none"]["default_beta"]]
        spec = PUBLISHED_MODELS[dataset, "mixednuts"]
        assert spec.nonlinear == NonlinearConstants(
            alpha=gelu["alpha"], s=gelu["s"], p=gelu["p"], c=gelu["c"], clamp="gelu", k=250,
            std_map="hard_max", surrogate_alpha=linear["alpha"])
        assert spec.robustbench_name == "Bai2024MixedNUTS"


def test_download_selects_each_published_model_s_files():
    from adaptive_smoothing.download import select_sources

    for spec in PUBLISHED_MODELS.values():
        chosen = {s.name for s in select_sources(model=spec.name, dataset=spec.dataset)}
        assert chosen == {f.name for f in spec.files}, (spec.dataset, spec.name)
