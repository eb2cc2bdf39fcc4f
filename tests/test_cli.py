"""run.py end to end on CPU: config file -> checkpoints -> offline data -> results, and the
alpha sweep with its plots."""
from __future__ import annotations

import json
import logging
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
    assert sorted(sweep) == ["adaptive", "alpha_0.000", "alpha_0.500", "alpha_1.000",
                             "matched_adaptive"]
    assert 0 <= sweep["matched_adaptive"]["fixed_alpha"] <= 1
    assert sweep["alpha_0.000"]["mean_alpha_clean"] == 0.0
    assert sweep["alpha_1.000"]["mean_alpha_clean"] == 1.0
    assert sweep["alpha_0.500"]["mean_alpha_clean"] == pytest.approx(0.5)
    plot_tradeoff(sweep, tmp_path / "tradeoff.png")
    plot_alpha_histogram(out / "adaptive" / "batches", tmp_path / "hist.png")
    for png in ("tradeoff.png", "hist.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alpha_sweep_runs_the_adaptive_attack_on_the_composite_only_and_last(tmp_path,
                                                                            shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(config), "--data-dir", str(shared_cifar10),
        "--n-examples", "8", "--attacks", "apgd-ce", "--autoattack-iterations", "3", "--adaptive",
        "--set", "evaluation_settings.adaptive_attack_iterations=3",
        "--alpha-sweep", "0,1", "--output-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert sorted(sweep) == ["adaptive", "alpha_0.000", "alpha_1.000", "matched_adaptive"]
    started = {name: (out / name / "manifest.json").stat().st_mtime_ns for name in sweep}
    assert started["adaptive"] > max(started["alpha_0.000"], started["alpha_1.000"])
    assert started["matched_adaptive"] > started["adaptive"]  # found from the composite's
    assert sweep["matched_adaptive"]["adaptive_robust_accuracy"] is None
    assert sweep["adaptive"]["adaptive_robust_accuracy"] is not None
    assert sweep["adaptive"]["robust_accuracy"] <= sweep["adaptive"]["adaptive_robust_accuracy"]
    for fixed in ("alpha_0.000", "alpha_1.000"):
        assert sweep[fixed]["adaptive_robust_accuracy"] is None
        assert sweep[fixed]["robust_accuracy"] == sweep[fixed]["autoattack_robust_accuracy"]


def test_fixed_alphas_only_leaves_the_composite_out(tmp_path, shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    out = tmp_path / "sweep"
    args = ["--eval", "--config", str(config), "--data-dir", str(shared_cifar10),
            "--n-examples", "8", "--attacks", "apgd-ce", "--autoattack-iterations", "3",
            "--output-dir", str(out), "--device", "cpu", "--fixed-alphas-only"]
    result = CliRunner().invoke(run.main, args + ["--alpha-sweep", "0.5"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((out / "sweep.json").read_text())) == ["alpha_0.500"]
    assert not (out / "adaptive").exists()
    result = CliRunner().invoke(run.main, args)
    assert result.exit_code != 0 and "--fixed-alphas-only needs --alpha-sweep" in result.output


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
    record = json.loads((out / "adaptive" / "results.json").read_text())["model"]
    assert record["model_load_path"]["comp"] == "new_mixer.pt"

    # A composite configured otherwise (another mixer kind, gamma normalisation and alpha range)
    # shapes only itself: the fixed mixture's results are still reused.
    from adaptive_smoothing.models.gate import LogitGate
    gate = CompositeModel(create_model("resnet18", width=4), create_model("resnet18", width=4),
                          LogitGate(10), mixer_inputs="rob_logits")
    save_checkpoint(mixer_checkpoint(gate), tmp_path / "models" / "gate.pt")
    shutil.rmtree(out / "adaptive")
    result = CliRunner().invoke(run.main, args + [
        "--mixer-checkpoint", "gate.pt", "--set", "forward_settings.mixer_inputs=rob_logits",
        "--set", "forward_settings.gamma_norm=none", "--set", "forward_settings.alpha_bias=0",
        "--set", "forward_settings.alpha_scale=1", "--set", "forward_settings.in_planes=None",
        "--set", "nonlinear_settings.transfer_attacks=false",
        "--set", "nonlinear_settings.square_examples=0"])
    assert result.exit_code == 0, result.output
    assert (fixed_batch.stat().st_mtime_ns, fixed_batch.read_bytes()) == before


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


# -- clear errors instead of wrong numbers or raw tracebacks ----------------------------------
def _one_line_error(result) -> str:
    """The CLI failed with a message, not a traceback; returns the message."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # not a raw exception
    assert "Traceback" not in result.output and "Usage:" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_eval_and_training_together_are_refused(tmp_path, shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    result = CliRunner().invoke(run.main, ["--eval", "--training", "--config", str(config)])
    assert "--eval and --training exclude each other" in _one_line_error(result)


def _small_npz(path, n, labels=None):
    """The first n images of demo/test.npz as a .npz of the offline format."""
    import numpy as np
    from conftest import REPO_ROOT

    with np.load(REPO_ROOT / "demo" / "test.npz") as d:
        offsets = d["offsets"][:n + 1]
        np.savez(path, jpeg=d["jpeg"][:offsets[-1]], offsets=offsets,
                 labels=d["labels"][:n] if labels is None else labels, classes=d["classes"])


def _mixer(path, seed):
    torch.manual_seed(seed)
    composite = CompositeModel(create_model("resnet18", width=4),
                               create_model("resnet18", width=4), MixingNet((4, 4), version=3))
    save_checkpoint(mixer_checkpoint(composite), path)


@pytest.mark.parametrize("change", ["mixer_replaced_at_same_path", "labels_changed"])
def test_rerun_after_model_or_data_changed_refuses_stale_batches(tmp_path, shared_cifar10,
                                                                  change):
    config = _write_config(tmp_path, shared_cifar10)
    data = tmp_path / "data"
    data.mkdir()
    _small_npz(data / "test.npz", 8)
    _mixer(tmp_path / "models" / "mixer.pt", seed=1)
    out = tmp_path / "out"
    args = ["--eval", "--config", str(config), "--data-dir", str(data), "--n-examples", "8",
            "--attacks", "none", "--mixer-checkpoint", "mixer.pt", "--output-dir", str(out),
            "--device", "cpu"]
    assert CliRunner().invoke(run.main, args).exit_code == 0
    first = json.loads((out / "results.json").read_text())
    if change == "mixer_replaced_at_same_path":  # e.g. a retrained checkpoints/last.pt
        _mixer(tmp_path / "models" / "mixer.pt", seed=2)
        expected = "the mixer checkpoint's content changed"
    else:
        _small_npz(data / "test.npz", 8, labels=(torch.arange(8) % 10).numpy())
        expected = "the evaluated images or labels changed"
    message = _one_line_error(CliRunner().invoke(run.main, args))
    assert expected in message and "--overwrite" in message
    assert json.loads((out / "results.json").read_text()) == first  # nothing reused or lost
    result = CliRunner().invoke(run.main, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    second = json.loads((out / "results.json").read_text())
    if change == "mixer_replaced_at_same_path":
        assert second["mean_alpha_clean"] != first["mean_alpha_clean"]
    else:
        assert second["clean_accuracy"] != first["clean_accuracy"]


def test_set_overrides_any_config_key_and_is_validated(tmp_path, shared_cifar10):
    config = _write_config(tmp_path, shared_cifar10)
    out = tmp_path / "out"
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(config), "--data-dir", str(shared_cifar10), "--device", "cpu",
        "--set", "evaluation_settings.n_examples=8", "--set", "evaluation_settings.attacks_to_run=[]",
        "--set", "forward_settings.alpha_bias=0.1", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["n_examples"] == 8 and summary["autoattack"] == []
    assert summary["model"]["forward_settings"]["alpha_bias"] == 0.1
    bad = CliRunner().invoke(run.main, ["--eval", "--config", str(config),
                                        "--set", "training_settings.lr=fast"])
    assert "training_settings.lr = 'fast'" in _one_line_error(bad)
    unknown = CliRunner().invoke(run.main, ["--eval", "--config", str(config),
                                            "--set", "training_settings.lrr=1"])
    assert "did you mean 'lr'" in _one_line_error(unknown)


def _corrupt_batch(tmp_path, shared_cifar10, args):
    out = tmp_path / "corrupt"
    ok = CliRunner().invoke(run.main, args + [
        "--n-examples", "16", "--attacks", "none", "--device", "cpu", "--output-dir", str(out),
        "--data-dir", str(shared_cifar10)])
    assert ok.exit_code == 0, ok.output
    (out / "batches" / "00001.json").write_text("{")
    return ["--n-examples", "16", "--attacks", "none", "--device", "cpu",
            "--output-dir", str(out), "--data-dir", str(shared_cifar10)]


def _truncated_npz(tmp_path, shared_cifar10, args):
    from conftest import REPO_ROOT

    folder = tmp_path / "truncated"
    folder.mkdir()
    whole = (REPO_ROOT / "demo" / "test.npz").read_bytes()
    (folder / "test.npz").write_bytes(whole[:len(whole) // 2])
    return ["--data-dir", str(folder), "--device", "cpu"]


def _file_in_the_way(tmp_path, shared_cifar10, args):
    (tmp_path / "a_file").write_text("x")
    return ["--output-dir", str(tmp_path / "a_file" / "out"), "--device", "cpu",
            "--data-dir", str(shared_cifar10), "--n-examples", "8", "--attacks", "none"]


_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("make_args, expected", [
    pytest.param(lambda t, d, a: ["--device", "cuda"], "device 'cuda': CUDA is not available",
                 marks=pytest.mark.skipif(_CUDA, reason="this machine has CUDA"), id="cuda"),
    pytest.param(lambda t, d, a: ["--device", "cuda:7"], "device 'cuda:7'", id="cuda7"),
    pytest.param(_file_in_the_way, "a file is in the way", id="output_dir_under_a_file"),
    pytest.param(lambda t, d, a: ["--output-dir", "/sys/adaptive_smoothing_test/out",
                                  "--device", "cpu", "--data-dir", str(d), "--attacks", "none",
                                  "--n-examples", "8"],
                 "/sys/adaptive_smoothing_test/out: cannot be created", id="output_dir_on_sys"),
    pytest.param(lambda t, d, a: ["--alpha-sweep", "0,1.5"],
                 "--alpha-sweep '0,1.5': expected comma-separated numbers in [0, 1]",
                 id="alpha_out_of_range"),
    pytest.param(_truncated_npz, "truncated/test.npz: cannot read as a NumPy .npz file",
                 id="truncated_npz"),
    pytest.param(_corrupt_batch, "corrupt/batches/00001.json: unreadable batch result",
                 id="corrupt_batch_json"),
    pytest.param(lambda t, d, a: ["--set", "forward_settings.std_model_kwargs={width: 4, "
                                  "depth: 3}", "--device", "cpu"],
                 "forward_settings.std_model_kwargs = {'width': 4, 'depth': 3}: cannot build "
                 "'resnet18'", id="unknown_model_kwarg"),
    pytest.param(lambda t, d, a: ["--seed", str(10**30)],
                 "seed = 1000000000000000000000000000000: expected a value <= "
                 "9223372036854775807", id="huge_seed"),
    pytest.param(lambda t, d, a: ["--set", "pgd_settings.eps=8"], "did you mean 8/255",
                 id="eps_8_for_linf"),
])
def test_common_mistakes_give_a_one_line_error_naming_the_value(tmp_path, shared_cifar10,
                                                               make_args, expected):
    config = _write_config(tmp_path, shared_cifar10)
    args = ["--eval", "--config", str(config)]
    result = CliRunner().invoke(run.main, args + make_args(tmp_path, shared_cifar10, args))
    assert expected in _one_line_error(result)


@pytest.mark.parametrize("case", ["mixer_only_last_pt", "output_dir_under_a_file"])
def test_training_mistakes_give_a_one_line_error(tmp_path, case):
    from conftest import REPO_ROOT

    out = tmp_path / "train"
    if case == "mixer_only_last_pt":
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(REPO_ROOT / "demo" / "mixer_rn18_w8.pt", out / "checkpoints" / "last.pt")
        expected = "last.pt: not a training checkpoint"
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "train"
        expected = "a file is in the way"
    result = CliRunner().invoke(run.main, [
        "--training", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--device", "cpu",
        "--set", f"log_dir={REPO_ROOT / 'demo'}", "--data-dir", str(REPO_ROOT / "demo"),
        "--output-dir", str(out)])
    assert expected in _one_line_error(result)


@pytest.mark.parametrize("config_name, mode, script", [
    ("cifar10_edm.yaml", "--eval", "scripts/download_models.py --root-dir {root} --only "
                                   "cifar10_std"),
    ("rn18w8_cifar10_cpu.yaml", "--training", "scripts/train_base.py --output {root}/std_w8.pt"),
])
def test_missing_base_checkpoint_names_the_script_that_makes_it(tmp_path, config_name, mode,
                                                                 script):
    from conftest import REPO_ROOT

    root = tmp_path / "empty"
    root.mkdir()
    result = CliRunner().invoke(run.main, [
        mode, "--config", str(REPO_ROOT / "configs" / config_name), "--device", "cpu",
        "--set", f"log_dir={root}", "--output-dir", str(tmp_path / "out")])
    message = _one_line_error(result)
    assert "checkpoint file not found" in message and script.format(root=root) in message


def test_debug_log_level_keeps_the_traceback_of_a_one_line_error(tmp_path, shared_cifar10,
                                                                 caplog):
    config = _write_config(tmp_path, shared_cifar10)
    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(run.main, ["--eval", "--config", str(config), "--device",
                                               "cuda:7", "--log-level", "DEBUG"])
    assert "device 'cuda:7'" in _one_line_error(result)
    assert any(record.exc_info for record in caplog.records)  # for bug reports


def test_every_user_error_derives_from_one_base_and_keeps_its_builtin_base():
    from adaptive_smoothing import (base_training, calibration, checkpoints, data, download,
                                    evaluation, persist, pre_attack, rundir, runtime, training)
    from adaptive_smoothing.config import ConfigError
    from adaptive_smoothing.errors import UserError
    from adaptive_smoothing.models.robustbench_zoo import RobustBenchMissingError

    # Each class is still caught by what callers caught it as before it had the base.
    builtin = {
        base_training.BaseTrainingError: ValueError, calibration.CalibrationError: RuntimeError,
        checkpoints.CheckpointError: Exception,
        checkpoints.CheckpointNotFoundError: FileNotFoundError, ConfigError: ValueError,
        data.DataError: RuntimeError, download.DownloadError: RuntimeError,
        evaluation.EvaluationError: RuntimeError, persist.DiskFullError: OSError,
        pre_attack.PreAttackedError: ValueError, rundir.RunDirError: RuntimeError,
        runtime.DeviceError: ValueError, runtime.RuntimeSettingsError: ValueError,
        training.TrainingDivergedError: RuntimeError,
        training.TrainingResumeError: RuntimeError, RobustBenchMissingError: ImportError}
    for cls, base in builtin.items():
        assert issubclass(cls, UserError) and issubclass(cls, base), cls


def test_train_base_reports_bad_settings_in_one_line_and_lets_a_bug_through(tmp_path,
                                                                           monkeypatch):
    from adaptive_smoothing.cli import train_base
    from synthetic import write_npz

    data = tmp_path / "data"
    data.mkdir()
    write_npz(data / "train.npz", 8, 0)
    args = ["--output", str(tmp_path / "std.pt"), "--arch-kwargs", '{"width": 2}',
            "--data-format", "npz", "--data-dir", str(data), "--device", "cpu"]
    bad = CliRunner().invoke(train_base.main, args + ["--epochs", "0"])
    assert "epochs must be >= 1, got 0" in _one_line_error(bad)
    unknown = CliRunner().invoke(train_base.main, args + ["--arch", "resnet1800"])
    assert "unknown model 'resnet1800'" in _one_line_error(unknown)

    # A ValueError that is not a user's mistake is a bug: it keeps its traceback.
    def buggy(*args, **kwargs):
        raise ValueError("a bug")
    monkeypatch.setattr(train_base, "train_base_model", buggy)
    result = CliRunner().invoke(train_base.main, args)
    assert isinstance(result.exception, ValueError) and str(result.exception) == "a bug"
