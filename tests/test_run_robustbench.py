"""run_robustbench.py end to end on CPU: the model builder and RobustBench's data loading are
swapped for small stand-ins, everything else (benchmark(), AutoAttack) is the real code."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import run_robustbench
from adaptive_smoothing import robustbench_eval
from adaptive_smoothing.compat import import_autoattack, import_robustbench
from adaptive_smoothing.models import LogProbClassifier
from synthetic import synthetic_data, tiny_composite


@pytest.fixture
def small_world(monkeypatch):
    """A tiny composite for every published name, and 24 synthetic test images."""
    robustbench = import_robustbench()
    calls = {"models": [], "data": []}
    composite = tiny_composite(mixer=True, alpha_bias=0.2, alpha_scale=0.75)

    def fake_load_published_model(root_dir, dataset, model_name, device="cpu"):
        calls["models"].append((str(root_dir), dataset, model_name, device))
        return LogProbClassifier(composite).to(device).eval()

    def fake_load_clean_dataset(dataset, n_examples, data_dir, prepr):
        calls["data"].append((dataset, n_examples, data_dir))
        x, y = synthetic_data(24, seed=3)
        return x[:n_examples], y[:n_examples]

    monkeypatch.setattr(robustbench_eval, "load_published_model", fake_load_published_model)
    monkeypatch.setattr(robustbench.eval, "load_clean_dataset", fake_load_clean_dataset)
    return calls, composite


@pytest.mark.e2e
def test_benchmark_runs_end_to_end_and_resumes(small_world, tmp_path, monkeypatch, caplog):
    calls, composite = small_world
    args = ["--root_dir", str(tmp_path / "models"), "--dataset", "cifar10", "--model_name",
            "edm", "--n_examples", "24", "--batch_size", "12", "--device", "cpu",
            "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")]
    pyautoattack = import_autoattack()
    real_run = pyautoattack.AutoAttack.run_standard_evaluation
    attacked: list[int] = []
    crash_at = [2]

    def interrupt_second_batch(self, x, y, **kwargs):
        attacked.append(len(y))
        if len(attacked) == crash_at[0]:
            raise KeyboardInterrupt  # Ctrl-C while AutoAttack works on the second batch
        return real_run(self, x, y, **kwargs)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation",
                        interrupt_second_batch)
    interrupted = CliRunner().invoke(run_robustbench.main, args)
    assert interrupted.exit_code != 0  # click turns Ctrl-C into "Aborted!"
    assert attacked == [12, 12]

    # Restarted, it attacks only the unfinished second batch.
    attacked.clear()
    crash_at[0] = -1
    with caplog.at_level("INFO", logger="adaptive_smoothing.compat"):
        result = CliRunner().invoke(run_robustbench.main, args)
    assert result.exit_code == 0, result.output
    assert attacked == [12]
    # and says so (issue 25: a resumed evaluation said nothing)
    assert any("resuming, reusing 1 of 2 finished AutoAttack batches" in r.getMessage()
               for r in caplog.records)
    assert calls["models"][-1] == (str(tmp_path / "models"), "cifar10", "edm", "cpu")
    assert calls["data"][0][:2][1] == 24

    saved = json.loads((tmp_path / "out" / "cifar10_edm_n24_fp32.json").read_text())
    x, y = synthetic_data(24, seed=3)
    with torch.no_grad():
        clean = (composite.eval()(x).log_probs.argmax(1) == y).float().mean().item()
    assert saved["clean_accuracy"] == pytest.approx(clean)
    assert saved["robust_accuracy"] <= saved["clean_accuracy"]
    assert "AutoAttack robust accuracy" in result.output

    # A rerun finds every batch finished, attacks nothing and reports the same numbers.
    state_file = tmp_path / "out" / "cifar10_edm_n24_fp32.aa_state.json"
    assert state_file.exists()
    attacked.clear()
    again = CliRunner().invoke(run_robustbench.main, args)
    assert attacked == []
    assert again.exit_code == 0, again.output
    resaved = json.loads((tmp_path / "out" / "cifar10_edm_n24_fp32.json").read_text())
    assert resaved == saved


def test_cifar10_trades_is_refused_with_a_clear_message(small_world, tmp_path):
    calls, _ = small_world
    result = CliRunner().invoke(run_robustbench.main, [
        "--root_dir", str(tmp_path), "--dataset", "cifar10", "--model_name", "trades"])
    assert result.exit_code != 0
    assert "no published model cifar10/trades" in result.output
    assert calls["models"] == []


def test_fp16_on_cpu_is_refused(small_world, tmp_path):
    result = CliRunner().invoke(run_robustbench.main, [
        "--root_dir", str(tmp_path), "--dataset", "cifar100", "--model_name", "edm", "--fp16",
        "--device", "cpu"])
    assert result.exit_code != 0
    assert "precision 'fp16' needs a CUDA device" in result.output
    assert "Traceback" not in result.output
