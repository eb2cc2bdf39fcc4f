"""The published MixedNUTS mixtures end to end on CPU, from random-weight files in the layout of
docs/METHOD.md ("Published models"): ``run_robustbench.py --model_name mixednuts`` and
``run.py --eval`` with the shipped configs, on 2 images, no download.

AutoAttack itself is switched off (a full-size model takes seconds per forward pass on 2 CPU
cores, and AutoAttack runs hundreds); the rest -- the command lines, the table, the loaders,
robustbench's benchmark(), the evaluation -- is the real code.
"""
from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import run
import run_robustbench
from adaptive_smoothing.compat import import_autoattack, import_robustbench
from adaptive_smoothing.published import build_published_composite, published_model
from conftest import REPO_ROOT
from synthetic import synthetic_data

pytestmark = pytest.mark.slow

N = 2


@pytest.fixture(scope="module", params=["cifar10", "cifar100"])
def layout(request, tmp_path_factory):
    """(dataset, model root): the published architecture's random weights, written as the
    authors' BiT file and (CIFAR-10) RobustBench's Peng2023Robust file or (CIFAR-100) the EDM
    WRN-70-16 file."""
    dataset = request.param
    spec = published_model(dataset, "mixednuts")
    root = tmp_path_factory.mktemp(f"{dataset}_mixednuts")
    (root / "Base").mkdir()
    torch.manual_seed(0)
    composite = build_published_composite(dataset, "mixednuts")
    torch.save({"model": composite.std_model.state_dict()}, root / spec.std.target)
    rob = composite.rob_model.state_dict()
    torch.save(rob if dataset == "cifar10"
               else {"model_state_dict": {"module.0." + k: v for k, v in rob.items()}},
               root / spec.rob.target)
    del composite, rob
    gc.collect()
    yield dataset, root
    shutil.rmtree(root, ignore_errors=True)


def test_run_robustbench_mixednuts(layout, tmp_path, monkeypatch):
    dataset, root = layout
    robustbench = import_robustbench()
    num_classes = published_model(dataset, "mixednuts").num_classes
    x, _ = synthetic_data(N, seed=3)
    y = torch.arange(N) * 7 % num_classes
    loaded = []

    def fake_load_clean_dataset(dataset_, n_examples, data_dir, prepr):
        loaded.append(dataset_)
        return x[:n_examples], y[:n_examples]

    def attack_off(self, x_batch, y_batch, **kwargs):
        # No attack: the images themselves, and the model's predictions on them.
        with torch.no_grad():
            return x_batch.clone(), self.model(x_batch).argmax(1)

    monkeypatch.setattr(robustbench.eval, "load_clean_dataset", fake_load_clean_dataset)
    monkeypatch.setattr(import_autoattack().AutoAttack, "run_standard_evaluation", attack_off)
    out = tmp_path / "out"
    result = CliRunner().invoke(run_robustbench.main, [
        "--root_dir", str(root), "--dataset", dataset, "--model_name", "mixednuts",
        "--n_examples", str(N), "--batch_size", str(N), "--device", "cpu",
        "--data_dir", str(tmp_path / "data"), "--output_dir", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{dataset} mixednuts: clean accuracy" in result.output
    saved = json.loads((out / f"{dataset}_mixednuts_n{N}_fp32.json").read_text())
    assert saved["n_examples"] == N and saved["model_name"] == "mixednuts"
    assert saved["robust_accuracy"] == saved["clean_accuracy"]  # the attack was off
    assert loaded  # robustbench's benchmark() asked for the images


def _small_npz(folder: Path, num_classes: int) -> Path:
    """The first N images of demo/test.npz, labelled for ``num_classes`` classes."""
    folder.mkdir()
    with np.load(REPO_ROOT / "demo" / "test.npz") as d:
        offsets = d["offsets"][:N + 1]
        np.savez(folder / "test.npz", jpeg=d["jpeg"][:offsets[-1]], offsets=offsets,
                 labels=d["labels"][:N], classes=np.array([f"c{i}" for i in range(num_classes)]))
    return folder


def test_run_eval_with_the_shipped_mixednuts_config(layout, tmp_path):
    dataset, root = layout
    num_classes = published_model(dataset, "mixednuts").num_classes
    data = _small_npz(tmp_path / "data", num_classes)
    out = tmp_path / "out"
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(REPO_ROOT / "configs" / f"{dataset}_mixednuts.yaml"),
        "--set", f"log_dir={root}", "--set", "nonlinear_settings.surrogate_attack=false",
        "--set", "nonlinear_settings.transfer_attacks=false",
        "--set", "nonlinear_settings.square_examples=0",
        "--data-dir", str(data), "--n-examples", str(N), "--batch-size", str(N),
        "--attacks", "none", "--device", "cpu", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["n_examples"] == N
    assert 0.0 <= summary["clean_accuracy"] <= 1.0
