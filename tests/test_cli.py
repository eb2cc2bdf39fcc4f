"""run.py end to end on CPU: config file -> checkpoints -> offline data -> results, and the
alpha sweep with its plots."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

import run
from adaptive_smoothing.checkpoints import mixer_checkpoint, save_checkpoint
from adaptive_smoothing.models import CompositeModel, MixingNet, create_model
from adaptive_smoothing.models.composite import fixed_alpha_composite
from adaptive_smoothing.plots import plot_alpha_histogram, plot_tradeoff
from synthetic import synthetic_data, tiny_composite


def _write_config(tmp_path, shared_cifar10, **evaluation):
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    for name in ("std.pt", "rob.pt"):
        model = create_model("resnet18", width=4)
        torch.save({"model": model.state_dict()}, models / name)
    config = {
        "seed": 0, "log_dir": str(models), "log_path": "results",
        "model_load_path": {"std": "std.pt", "rob": "rob.pt", "comp": "None"},
        "forward_settings": {"std_model_type": "resnet18", "rob_model_type": "resnet18",
                             "std_model_kwargs": {"width": 4}, "rob_model_kwargs": {"width": 4},
                             "pn_version": 3, "alpha_scale": 0.75, "alpha_bias": 0.2},
        "dataset_settings": {"name": "CIFAR-10", "format": "torchvision", "path": "nowhere"},
        "evaluation_settings": dict({"n_examples": 1000, "batch_size": 8}, **evaluation),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_eval_command_runs_from_a_config_with_overrides(tmp_path, shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    out = tmp_path / "out"
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(config), "--data-dir", str(shared_cifar10),
        "--n-examples", "16", "--attacks", "apgd-ce", "--autoattack-iterations", "5",
        "--output-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["n_examples"] == 16  # the flag overrode the config's 1000
    assert summary["autoattack"] == ["apgd-ce"]
    assert summary["autoattack_iterations"] == 5
    assert summary["autoattack_version"] == "custom"
    assert summary["robust_accuracy"] <= summary["clean_accuracy"]
    assert "clean accuracy" in result.output  # the table is printed
    assert len(list((out / "batches").glob("0*.json"))) == 2  # 16 images, batches of 8


def test_bad_flag_value_names_the_key(tmp_path, shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    result = CliRunner().invoke(run.main, ["--eval", "--config", str(config),
                                           "--attacks", "apgd-xx"])
    assert result.exit_code != 0
    assert "evaluation_settings.attacks_to_run" in result.output
    assert "apgd-xx" in result.output


def test_mode_is_required(tmp_path, shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    result = CliRunner().invoke(run.main, ["--config", str(config)])
    assert result.exit_code != 0
    assert "--eval or --training" in result.output


def test_alpha_sweep_and_plots(tmp_path, shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(config), "--data-dir", str(shared_cifar10),
        "--n-examples", "8", "--attacks", "apgd-ce", "--autoattack-iterations", "3",
        "--alpha-sweep", "0,0.5,1", "--output-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert sorted(sweep) == ["adaptive", "alpha_0.000", "alpha_0.500", "alpha_1.000"]
    assert sweep["alpha_0.000"]["mean_alpha_clean"] == 0.0
    assert sweep["alpha_1.000"]["mean_alpha_clean"] == 1.0
    assert sweep["alpha_0.500"]["mean_alpha_clean"] == pytest.approx(0.5)
    plot_tradeoff(sweep, tmp_path / "tradeoff.png")
    plot_alpha_histogram(out / "adaptive" / "batches", tmp_path / "hist.png")
    for png in ("tradeoff.png", "hist.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alpha_sweep_of_a_new_mixer_reuses_the_fixed_alpha_results(tmp_path, shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    out = tmp_path / "sweep"
    args = ["--eval", "--config", str(config), "--data-dir", str(shared_cifar10),
            "--n-examples", "8", "--attacks", "apgd-ce", "--autoattack-iterations", "3",
            "--alpha-sweep", "0.5", "--output-dir", str(out), "--device", "cpu"]
    assert CliRunner().invoke(run.main, args).exit_code == 0
    fixed_batch = next((out / "alpha_0.500" / "batches").glob("0*.json"))
    before = fixed_batch.stat().st_mtime_ns, fixed_batch.read_bytes()

    # A newly trained mixer: the adaptive model is a different one (its old folder must go),
    # the fixed-alpha mixture is the same and must not be evaluated again.
    torch.manual_seed(1)
    composite = CompositeModel(create_model("resnet18", width=4), create_model("resnet18", width=4),
                               MixingNet((4, 4), version=3))
    save_checkpoint(mixer_checkpoint(composite), tmp_path / "models" / "new_mixer.pt")
    result = CliRunner().invoke(run.main, args + ["--mixer-checkpoint", "new_mixer.pt"])
    assert result.exit_code == 1 and str(out / "adaptive") in result.output  # not overwritten
    shutil.rmtree(out / "adaptive")
    result = CliRunner().invoke(run.main, args + ["--mixer-checkpoint", "new_mixer.pt"])
    assert result.exit_code == 0, result.output
    assert (fixed_batch.stat().st_mtime_ns, fixed_batch.read_bytes()) == before
    manifest = json.loads((out / "adaptive" / "manifest.json").read_text())
    assert manifest["model"]["model_load_path"]["comp"] == "new_mixer.pt"


def test_fixed_alpha_composite_is_the_constant_mixture():
    composite = tiny_composite(mixer=True, std_scale=1.5, rob_scale=0.5, alpha_bias=0.2,
                               alpha_scale=0.75)
    x, _ = synthetic_data(6, seed=2)
    with torch.no_grad():
        g = composite.std_model(x) * 1.5
        h = composite.rob_model(x) * 0.5
        mixed = fixed_alpha_composite(composite, 0.3)(x)
        expected = torch.log(0.7 * g.softmax(1) + 0.3 * h.softmax(1))
        assert torch.allclose(mixed.log_probs, expected, atol=1e-6)
        assert torch.allclose(mixed.alpha, torch.full((6,), 0.3))
        assert torch.allclose(fixed_alpha_composite(composite, 0.0)(x).log_probs, g)
        assert torch.allclose(fixed_alpha_composite(composite, 1.0)(x).log_probs, h)
    assert math.isinf(fixed_alpha_composite(composite, 0.0).gamma)
    with pytest.raises(ValueError, match="alpha must lie in"):
        fixed_alpha_composite(composite, 1.5)
