"""plot_training: a mixer training's validation curves read back from its TensorBoard folder."""
from __future__ import annotations

import json
from unittest import mock

import pytest
from click.testing import CliRunner
from torch.utils.tensorboard import SummaryWriter

from adaptive_smoothing.cli.plot_training import main
from adaptive_smoothing.plots import read_validation_curves


def _write_run(run_dir):
    """A training validated at steps 100, 200, 300, then resumed from its step-200 checkpoint:
    step 300 is validated again with another value, as a real resume does. The resumed writer's
    file is made ten seconds later, as a real resume's process would: event files are read in
    name order, and two writers of one process in one second are told apart only by a counter
    whose decimal names sort 10 before 9."""
    with mock.patch("time.time", return_value=1_800_000_000.0):
        first = SummaryWriter(run_dir / "tensorboard")
    for step, auc in ((100, 0.45), (200, 0.55), (300, 0.60)):
        first.add_scalar("val/auc_adaptive", auc, step)
        first.add_scalar("val/clean_acc", 0.8, step)
        first.add_scalar("train/loss", 1.0, step)
    first.close()
    with mock.patch("time.time", return_value=1_800_000_010.0):
        resumed = SummaryWriter(run_dir / "tensorboard")
    for step, auc in ((300, 0.62), (400, 0.70)):
        resumed.add_scalar("val/auc_adaptive", auc, step)
    resumed.close()


def test_curves_keep_every_validation_once_with_the_value_written_last(tmp_path):
    _write_run(tmp_path)
    curves = read_validation_curves(tmp_path / "tensorboard")
    assert set(curves) == {"val/auc_adaptive", "val/clean_acc"}  # training scalars left out
    steps, aucs = zip(*curves["val/auc_adaptive"])
    assert steps == (100, 200, 300, 400)
    assert aucs == pytest.approx((0.45, 0.55, 0.62, 0.70))


def test_cli_writes_the_curves_and_reports_the_last_and_best_auc(tmp_path):
    _write_run(tmp_path)
    result = CliRunner().invoke(main, [str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "last 0.700 (step 400), best 0.700 (step 400), 4 validations" in result.output
    saved = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert [step for step, _ in saved["val/auc_adaptive"]] == [100, 200, 300, 400]
    assert (tmp_path / "out" / "validation.png").stat().st_size > 0


def test_a_folder_without_a_training_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_validation_curves(tmp_path)
