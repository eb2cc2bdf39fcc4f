"""scripts/benchmark.py and scripts/gpu_check.sh at tiny sizes on the CPU: they run end to end
and write records whose numbers hang together. (Speed itself is measured by those scripts, never
asserted here.)"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import statistics

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from adaptive_smoothing.config import load_config
from adaptive_smoothing.tools.speed import build_benchmark_composite, flops_per_attack_step

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark_main():
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark_cli", REPO / "scripts" /
                                                  "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_benchmark_compare_records_both_settings_and_their_ratio(tmp_path, benchmark_main):
    out = tmp_path / "speed.json"
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--batch-size", "4", "--iters",
            "1", "--rounds", "2", "--warmup", "0", "--precision", "fp32", "--channels-last",
            "--compare", "--json", str(out), "--label", "demo"]
    result = CliRunner().invoke(benchmark_main, args)
    assert result.exit_code == 0, result.output
    assert "speed-up of the fast path over fp32 NCHW eager" in result.output
    run = json.loads(out.read_text())["runs"][0]
    assert run["label"] == "demo" and run["mode"] == "attack"
    assert run["baseline"]["setting"]["label"] == "fp32 + NCHW + eager"
    assert run["fast"]["setting"]["label"] == "fp32 + channels_last + eager"
    for key in ("baseline", "fast"):
        r = run[key]
        assert len(r["seconds"]) == 2 and r["batch_size"] == 4
        assert r["images_per_s"] == pytest.approx(statistics.median(4 / s for s in r["seconds"]))
        assert r["tflops_per_s"] == pytest.approx(
            r["flops_per_image"] * r["images_per_s"] / 1e12)
        assert r["peak_memory_kind"] == "cpu_peak_rss_of_process"
        assert r["peak_memory_bytes"] > 10 * 2**20
    assert run["speedup"] == pytest.approx(run["fast"]["images_per_s"] /
                                           run["baseline"]["images_per_s"])
    # A second run appends to the same file.
    assert CliRunner().invoke(benchmark_main, args).exit_code == 0
    assert len(json.loads(out.read_text())["runs"]) == 2


def test_flops_per_attack_step_are_those_of_forward_and_backward():
    device = torch.device("cpu")
    composite = build_benchmark_composite(load_config(REPO / "configs" / "demo.yaml"), device)
    flops = flops_per_attack_step(composite, device)
    # The backward pass to the input costs about one forward (the base models' weights are
    # frozen; the mixer's weight gradients add a little): an attack step is about 2x forward.
    x = torch.rand(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        composite(x)
    forward = counter.get_total_flops() / 2
    assert 1.5 * forward < flops < 3.5 * forward


def test_benchmark_train_mode_runs_a_mixer_training_iteration(benchmark_main):
    result = CliRunner().invoke(benchmark_main, [
        "--config", str(REPO / "configs" / "demo.yaml"), "--mode", "train", "--batch-size", "2",
        "--iters", "1", "--rounds", "1", "--warmup", "0", "--precision", "fp32", "--no-flops",
        "--set", "randomized_attack_settings.iters_df=1",
        "--set", "randomized_attack_settings.iters_const=1",
        "--set", "pgd_settings.n_target_classes=1"])
    assert result.exit_code == 0, result.output
    assert "(train, batch 2)" in result.output


def test_benchmark_refuses_fp16_on_cpu_in_one_line(benchmark_main):
    result = CliRunner().invoke(benchmark_main, [
        "--config", str(REPO / "configs" / "demo.yaml"), "--precision", "fp16",
        "--device", "cpu"])
    assert result.exit_code == 1
    assert "Error: precision 'fp16' needs a CUDA device" in result.output


@pytest.mark.e2e
def test_gpu_check_smoke_run_writes_every_record(tmp_path):
    env = dict(os.environ, GPU_CHECK_SMOKE="1", OUT=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["missing"] == [] and summary["all_ok"], summary
    assert set(summary["checks"]) == {"speed_authors_fp32_b50", "speed_bf16_channels_last",
                                      "bf16_attack_agreement"}
    authors = json.loads((tmp_path / "speed_authors_fp32_b50.json").read_text())
    assert authors["result"]["setting"] == "fp32 + NCHW + eager"
    fast = json.loads((tmp_path / "speed_bf16_channels_last.json").read_text())
    assert [r["batch_size"] for r in fast["result"]["results"]] == [4, 8]
    assert all(r["images_per_s"] > 0 for r in fast["result"]["results"])
    assert fast["machine"]["device"] == "cpu" and "native_bf16" in fast["machine"]
    agreement = json.loads((tmp_path / "bf16_attack_agreement.json").read_text())["result"]
    calibrated, standard = agreement["rows"]
    assert standard["eps"] == pytest.approx(8 / 255)
    assert 1 / 1024 < calibrated["eps"] < 16 / 255
    for row in agreement["rows"]:
        fp32, bf16 = row["robust_accuracy"].values()
        assert row["difference_points"] == pytest.approx(100 * (bf16 - fp32))
        assert row["within_1_point"] == (abs(bf16 - fp32) <= 0.01)
    # The GPU-readiness checks (adaptive_smoothing/tools/readiness.py), one record each, all
    # passing.
    from adaptive_smoothing.tools.readiness import CHECKS
    readiness = {name: json.loads((tmp_path / "readiness" / f"{name}.json").read_text())
                 for name in CHECKS}
    assert {name: r.get("error", r["ok"]) for name, r in readiness.items()} == {
        name: True for name in CHECKS}
    assert readiness["sync_debug"]["syncs_in_3_apgd_steps"] == 0
    assert readiness["sync_debug"]["syncs_in_forward"] == []
    assert readiness["determinism"]["bit_identical"]
    assert readiness["precision_resume"]["steps_after"] == 4
