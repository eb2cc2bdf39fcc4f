"""RobustBench architectures and zoo models as base classifiers (models/robustbench_zoo.py):
``robustbench:<Name>`` through robustbench's own ``load_model`` from its local model folder
(random weights written there, so nothing is downloaded), as STD or ROB of a nonlinear and of a
mixing-network composite, end to end through ``run.py --eval``; ``ra_wrn_70_16``'s state dict
is robustbench's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

import run
from adaptive_smoothing import compat
from adaptive_smoothing.checkpoints import mixer_checkpoint, save_checkpoint
from adaptive_smoothing.config import ConfigError, load_config
from adaptive_smoothing.factory import build_composite, load_composite_weights
from adaptive_smoothing.prepare import resolve_checkpoints
from adaptive_smoothing.models import CompositeModel, create_model
from adaptive_smoothing.models import robustbench_zoo
from adaptive_smoothing.models.nonlinear import NonlinearComposite
from adaptive_smoothing.models.robustbench_zoo import RobustBenchClassifier
from conftest import REPO_ROOT

# Small CIFAR Linf zoo entries of four architecture families.
RESNET18 = "Addepalli2021Towards_RN18"       # robustbench ResNet
PREACT18 = "Wong2020Fast"                    # robustbench PreActResNet
DM_PREACT18 = "Rebuffi2021Fixing_R18_ddpm"   # DeepMind's PreAct ResNet (DMPreActResNet)
CIFAR100_RESNET18 = "Addepalli2022Efficient_RN18"


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    robustbench = compat.import_robustbench()

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to download {args}")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", refuse)
    return robustbench


def write_zoo_file(model_dir: Path, dataset: str, name: str) -> Path:
    """robustbench's architecture for ``name`` with random weights, in its local layout."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    module = model_dicts[BenchmarkDataset(dataset)][ThreatModel("Linf")][name]["model"]()
    path = model_dir / dataset / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


@pytest.mark.parametrize("dataset, name, classes", [("cifar10", RESNET18, 10),
                                                    ("cifar100", CIFAR100_RESNET18, 100)])
def test_zoo_model_is_robustbench_s_load_model(tmp_path, no_download, dataset, name, classes):
    write_zoo_file(tmp_path, dataset, name)
    ours = create_model(f"robustbench:{name}", classes, model_dir=tmp_path)
    theirs = no_download.utils.load_model(name, model_dir=str(tmp_path), dataset=dataset,
                                          threat_model="Linf")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = ours(x)
        assert torch.equal(logits, theirs(x))
        assert torch.equal(ours.forward_features(x).logits, logits)
    assert logits.shape == (2, classes)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # robustbench's keys
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("name, modules", [(RESNET18, ("layer1", "layer2")),
                                           (PREACT18, ("layer1", "layer2")),
                                           (DM_PREACT18, ("layer_0", "layer_1"))])
def test_zoo_features_are_the_first_two_stages(tmp_path, name, modules):
    write_zoo_file(tmp_path, "cifar10", name)
    model = create_model(f"robustbench:{name}", 10, model_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    expected = {}
    inner = dict(model.model.named_modules())
    names = [n for n in inner if n.endswith(modules[0]) or n.endswith(modules[1])]
    handles = [inner[n].register_forward_hook(
        lambda m, i, o, n=n: expected.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        out = model.forward_features(x)
    for handle in handles:
        handle.remove()
    first, second = out.features
    assert first.shape[-2:] == (32, 32) and second.shape[-2:] == (16, 16)  # 1/1 and 1/2
    assert torch.equal(first, expected[names[0]]) and torch.equal(second, expected[names[1]])
    assert model.feature_channels == (first.shape[1], second.shape[1])


def _npz(folder: Path, num_classes: int = 10, n: int = 4) -> Path:
    folder.mkdir()
    with np.load(REPO_ROOT / "demo" / "test.npz") as d:
        offsets = d["offsets"][:n + 1]
        np.savez(folder / "test.npz", jpeg=d["jpeg"][:offsets[-1]], offsets=offsets,
                 labels=d["labels"][:n], classes=np.array([f"c{i}" for i in range(num_classes)]))
    return folder


def _config(tmp_path: Path, std: str, rob: str, *, nonlinear: bool,
            model_dir: str | None = None) -> Path:
    """A config whose non-zoo base models are ResNet-18s of width 4 with random weights in
    log_dir, and whose zoo models are in robustbench's layout under log_dir/robustbench (the
    default) or ``model_dir``."""
    models = tmp_path / "models"
    models.mkdir()
    zoo_dir = Path(model_dir) if model_dir else models / "robustbench"
    forward = {"std_model_type": std, "rob_model_type": rob, "use_policy": not nonlinear}
    for which, name in (("std", std), ("rob", rob)):
        if name.startswith("robustbench:"):
            write_zoo_file(zoo_dir, "cifar10", name.split(":", 1)[1])
        else:
            torch.save({"model": create_model(name, width=4).state_dict()},
                       models / f"{which}.pt")
            forward[f"{which}_model_kwargs"] = {"width": 4}
    if model_dir:
        forward["robustbench_model_dir"] = model_dir
    config = {
        "seed": 0, "log_dir": str(models), "log_path": "results",
        "model_load_path": {"std": "std.pt", "rob": "rob.pt", "comp": "None"},
        "forward_settings": forward,
        "dataset_settings": {"name": "CIFAR-10", "format": "npz", "path": str(tmp_path / "d")},
        "evaluation_settings": {"n_examples": 4, "batch_size": 4},
        "nonlinear_settings": {"enabled": nonlinear, "s": 2.0, "p": 2.0, "c": -0.5,
                               "alpha": 0.9, "surrogate_attack": False,
                               "transfer_attacks": False, "square_examples": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


CASES = {
    "nonlinear, zoo STD": (f"robustbench:{PREACT18}", "resnet18", True, None),
    "nonlinear, zoo ROB, own model_dir": ("resnet18", f"robustbench:{RESNET18}", True, "zoo"),
    "mixer, zoo STD and ROB": (f"robustbench:{PREACT18}", f"robustbench:{RESNET18}", False,
                               None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_zoo_models_as_bases_end_to_end(tmp_path, case):
    std, rob, nonlinear, model_dir = CASES[case]
    model_dir = str(tmp_path / model_dir) if model_dir else None
    path = _config(tmp_path, std, rob, nonlinear=nonlinear, model_dir=model_dir)
    config = load_config(path)
    composite = build_composite(config.forward_settings, 10, source=str(path),
                                nonlinear=config.nonlinear_settings)
    assert isinstance(composite, NonlinearComposite if nonlinear else CompositeModel)
    # The zoo side keeps robustbench's weights.
    load_composite_weights(composite, resolve_checkpoints(config))
    zoo_sides = [m for m in (composite.std_model, composite.rob_model)
                 if isinstance(m, RobustBenchClassifier)]
    assert len(zoo_sides) == (1 if nonlinear else 2)
    paths = resolve_checkpoints(config).as_dict()
    for which, name in (("std", std), ("rob", rob)):
        if name.startswith("robustbench:"):  # fingerprinted: robustbench's file
            root = Path(model_dir) if model_dir else Path(config.log_dir) / "robustbench"
            assert paths[which] == root / "cifar10" / "Linf" / f"{name.split(':')[1]}.pt"
    attacks = ["--attacks", "none"]
    if not nonlinear:
        assert composite.mixer.in_planes == (64, 64)
        x = torch.rand(2, 3, 32, 32, requires_grad=True)
        out = composite(x)
        out.log_probs[:, 0].sum().backward()  # through the hooked features and the mixer
        assert x.grad is not None and x.grad.abs().sum() > 0
        # A (here: untrained) mixer checkpoint for these zoo bases loads and is attacked.
        save_checkpoint(mixer_checkpoint(composite), Path(config.log_dir) / "mixer.pt")
        attacks = ["--attacks", "apgd-ce", "--autoattack-iterations", "2",
                   "--mixer-checkpoint", "mixer.pt"]
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(path), "--data-dir", str(_npz(tmp_path / "d")),
        "--device", "cpu", "--output-dir", str(out_dir), *attacks])
    assert result.exit_code == 0, result.output
    summary = json.loads((out_dir / "results.json").read_text())
    assert summary["n_examples"] == 4
    # The evaluation fingerprints what it loaded: robustbench's files for the zoo sides, the
    # mixer checkpoint where there is one.
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["fingerprints.std"] and manifest["fingerprints.rob"]
    assert bool(manifest["fingerprints.comp"]) == (not nonlinear)


def test_unknown_zoo_name_is_a_one_line_config_error(tmp_path):
    path = _config(tmp_path, "resnet18", f"robustbench:{RESNET18}", nonlinear=True)
    config = load_config(path)
    bad = config.forward_settings.model_copy(update={"rob_model_type": "robustbench:NoSuch"})
    with pytest.raises(ConfigError) as err:
        build_composite(bad, 10, source=str(path), nonlinear=config.nonlinear_settings)
    message = str(err.value)
    assert "\n" not in message
    assert "forward_settings.rob_model_type" in message and "'robustbench:NoSuch'" in message
    assert "unknown RobustBench model 'NoSuch' for cifar10/Linf" in message


def test_mixer_on_an_architecture_without_feature_modules_is_refused(tmp_path, monkeypatch):
    path = _config(tmp_path, "resnet18", f"robustbench:{RESNET18}", nonlinear=False)
    config = load_config(path)
    monkeypatch.setattr(robustbench_zoo, "FEATURE_MODULES", {})
    with pytest.raises(ConfigError, match="forward_settings.use_policy.*exposes no feature "
                                          "maps for the mixing network"):
        build_composite(config.forward_settings, 10, source=str(path))
    # Logits alone serve: the nonlinear composite of the same models builds.
    nonlinear = config.nonlinear_settings.model_copy(update={"enabled": True})
    build_composite(config.forward_settings, 10, nonlinear=nonlinear)
    plain = RobustBenchClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), 10, "toy")
    assert plain(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="toy \\(Sequential\\) exposes no feature maps"):
        plain.forward_features(torch.rand(1, 3, 32, 32))


def test_missing_robustbench_is_a_one_line_error(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'robustbench'")

    monkeypatch.setattr(compat, "import_robustbench", missing)
    with pytest.raises(ImportError) as err:
        create_model("ra_wrn_70_16")
    assert "\n" not in str(err.value)
    assert "needs robustbench" in str(err.value) and "pip install robustbench==1.1.1" in str(
        err.value)


def test_ra_wrn_70_16_has_robustbench_s_state_dict():
    from robustbench.model_zoo.architectures.robustarch_wide_resnet import get_model

    with torch.device("meta"):
        ours = create_model("ra_wrn_70_16")
        theirs = get_model("ra_wrn70_16")
    assert type(ours.model) is type(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()}
    with pytest.raises(ValueError, match="10 classes"):
        create_model("ra_wrn_70_16", num_classes=100)


@pytest.mark.parametrize("wrap", [
    lambda s: s,                                                    # RobustBench's plain file
    lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},   # DataParallel
    lambda s: {"state_dict": {"module.model." + k: v for k, v in s.items()}},
])
def test_rob_file_wrappers_robustbench_strips_are_read(tmp_path, wrap):
    """The ROB reader accepts what robustbench's load_model accepts for a single-file entry
    (a 'state_dict' entry, 'module.' and 'model.' prefixes), e.g. Peng2023Robust.pt."""
    from adaptive_smoothing.checkpoints import read_rob_state_dict

    model = RobustBenchClassifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(),
                                                nn.LazyLinear(10)), 10, "toy")
    model(torch.rand(1, 3, 32, 32))
    state = model.state_dict()
    torch.save(wrap(state), tmp_path / "rob.pt")
    read = read_rob_state_dict(tmp_path / "rob.pt")
    assert list(read) == list(state)
    model.load_state_dict(read, strict=True)
