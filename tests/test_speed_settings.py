"""The speed settings (issue 10): precision (bf16 on CPU through CPU autocast, fp16 refused off
CUDA), channels_last, torch.compile and thread control, from the runtime helpers, the config and
the command lines."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

import run
from adaptive_smoothing import evaluation, training
from adaptive_smoothing.config import ConfigError, parse_config
from adaptive_smoothing.models import CompositeModel, MixingNet, create_model
from adaptive_smoothing.runtime import (AutocastModule, RuntimeSettingsError, configure_threads,
                                        default_threads, prepare_model, resolve_precision)
from synthetic import synthetic_data, tiny_composite

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _input_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    torch.nn.functional.nll_loss(model(x).log_probs, y).backward()
    return x.grad


# -- precision -------------------------------------------------------------------------------------
def test_fp16_off_cuda_is_refused_naming_the_device() -> None:
    with pytest.raises(RuntimeSettingsError, match="'fp16' needs a CUDA device.*'cpu'"):
        resolve_precision("fp16", CPU)


def test_bf16_is_accepted_on_cpu() -> None:
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    assert resolve_precision("auto", CPU) == torch.float32


def test_bf16_cpu_autocast_runs_the_convolutions_in_bf16_and_keeps_the_gradient() -> None:
    composite = tiny_composite(mixer=True, alpha_bias=0.2, alpha_scale=0.75)
    x, y = synthetic_data(16, seed=3)
    seen: list[torch.dtype] = []
    hook = composite.std_model.conv1.register_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype))
    fast = AutocastModule(composite, CPU, torch.bfloat16)
    out = fast(x)
    hook.remove()
    assert seen == [torch.bfloat16]  # CPU autocast is really on
    assert out.log_probs.dtype == torch.float32  # what the attacks and losses receive
    reference = composite(x).log_probs
    assert (out.log_probs.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    grad_bf16 = _input_gradient(fast, x, y)
    grad_fp32 = _input_gradient(composite, x, y)
    assert grad_bf16.dtype == torch.float32 and torch.isfinite(grad_bf16).all()
    cosine = torch.nn.functional.cosine_similarity(grad_bf16.flatten(), grad_fp32.flatten(), 0)
    assert cosine > 0.9


# -- channels_last and compile --------------------------------------------------------------------
def test_channels_last_changes_the_layout_not_the_outputs() -> None:
    std, rob = (create_model("resnet18", 10, width=8).eval() for _ in range(2))
    composite = CompositeModel(std, rob, MixingNet((8, 8), version=3),
                               alpha_bias=0.2, alpha_scale=0.75).eval()
    x, y = synthetic_data(8, seed=4)
    reference = composite(x).log_probs
    grad_reference = _input_gradient(composite, x, y)
    prepare_model(composite, channels_last=True)
    weight = composite.std_model.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    assert torch.allclose(composite(x).log_probs, reference, atol=1e-4)
    assert torch.allclose(_input_gradient(composite, x, y), grad_reference, atol=1e-5)


def test_channels_last_is_not_applied_where_its_cpu_backward_crashes(caplog) -> None:
    # torch's CPU channels_last backward of a strided 1x1 convolution with 2-7 input channels
    # corrupts memory (a ResNet-18 shortcut at width 2 or 4); such models stay NCHW.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                torch.nn.Conv2d(4, 8, 1, stride=2))
    prepare_model(model, channels_last=True)
    assert model[1].weight.is_contiguous()
    assert "channels_last not applied: 1 is a strided 1x1 convolution" in caplog.text
    wide = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                               torch.nn.Conv2d(8, 16, 1, stride=2))
    prepare_model(wide, channels_last=True)
    assert wide[1].weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_compiles_in_place_so_the_composite_keeps_its_interface(monkeypatch) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    compiled: list[Any] = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compiled.append(self))
    assert prepare_model(model, compile=True) is model
    assert compiled == [model]  # in place: callers keep .mixer, .train(mode, scale_alpha), ...


# -- threads ---------------------------------------------------------------------------------------
def test_threads_default_to_omp_num_threads_and_explicit_counts_win(monkeypatch,
                                                                     restore_threads) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert configure_threads(None) == 1 and torch.get_num_threads() == 1
    assert configure_threads(2) == 2 and torch.get_num_threads() == 2
    with pytest.raises(RuntimeSettingsError, match="threads must be >= 1"):
        configure_threads(0)


def test_default_threads_share_the_cores_between_torchrun_processes(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cores = default_threads()
    assert cores == len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert default_threads() == 1  # never 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == max(1, cores // 2)


def test_openmp_threads_wait_passively_by_default() -> None:
    code = "import adaptive_smoothing, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "PASSIVE"


# -- config keys and command lines -----------------------------------------------------------------
def _raw_config() -> dict:
    return {"model_load_path": {"std": "s.pt", "rob": "r.pt"},
            "forward_settings": {"std_model_type": "resnet18", "rob_model_type": "resnet18"},
            "dataset_settings": {"name": "cifar10"}}


def test_speed_keys_have_documented_defaults_and_are_checked() -> None:
    config = parse_config(_raw_config())
    ev, ts = config.evaluation_settings, config.training_settings
    assert (ev.channels_last, ev.compile, config.run.threads) == (True, False, None)
    assert (ts.channels_last, ts.compile) == (True, False)
    raw = _raw_config()
    raw["evaluation_settings"] = {"threads": 0}
    with pytest.raises(ConfigError, match=r"evaluation_settings.threads = 0: expected a value >= 1"):
        parse_config(raw)
    raw["evaluation_settings"] = {"channels_last": "sometimes"}
    with pytest.raises(ConfigError, match="evaluation_settings.channels_last"):
        parse_config(raw)


@pytest.mark.parametrize("mode", ["eval", "training"])
def test_run_py_speed_flags_reach_the_config_and_set_the_threads(
        tmp_path, monkeypatch, restore_threads, mode: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_raw_config()))
    seen: dict[str, Any] = {}
    monkeypatch.setattr(evaluation, "run_evaluation",
                        lambda config, **kwargs: seen.setdefault("config", config) and "table")
    monkeypatch.setattr(training, "run_training",
                        lambda config, **kwargs: seen.setdefault("config", config))
    result = CliRunner().invoke(run.main, [
        f"--{mode}", "--config", str(path), "--precision", "bf16", "--no-channels-last",
        "--compile", "--threads", "2"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    section = config.evaluation_settings if mode == "eval" else config.training_settings
    assert (section.precision, section.channels_last, section.compile) == ("bf16", False, True)
    assert config.run.threads == 2
    assert torch.get_num_threads() == 2


def test_run_py_fp16_on_cpu_is_one_clear_line(tmp_path, shared_cifar10) -> None:
    raw = _raw_config()
    raw.update(log_dir=str(tmp_path))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(path), "--precision", "fp16", "--device", "cpu",
        "--data-dir", str(shared_cifar10)])
    assert result.exit_code == 1
    assert "Error: precision 'fp16' needs a CUDA device, but the device is 'cpu'" in result.output
    assert "Traceback" not in result.output
