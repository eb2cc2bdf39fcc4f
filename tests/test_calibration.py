"""Calibration (calibration.py, scripts/calibrate.py): the minimum-margin attack, the grid search
against the decision guarantee it promises, the linear alpha, resume, and the command."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from adaptive_smoothing import calibration
from adaptive_smoothing.calibration import (CalibrationError, MarginData, collect_margin_data,
                                            grid_search, held_out_ids, linear_alpha,
                                            logit_margin, min_margin_attack)
from adaptive_smoothing.cli import calibrate as calibrate_cli
from adaptive_smoothing.config import load_config
from adaptive_smoothing.models import create_model
from adaptive_smoothing.models.nonlinear import (hard_max_log_probs, rob_map,
                                                 transformed_margins)
from synthetic import synthetic_data, tiny_base

CPU = torch.device("cpu")


def _synthetic_margin_data(seed: int = 0) -> MarginData:
    """Robust points of class 0: a confident lead; clean mistakes of class 0 where class 1
    leads by a spread of gaps."""
    g = torch.Generator().manual_seed(seed)
    atk = torch.randn(300, 10, generator=g, dtype=torch.float64)
    atk[:, 0] = atk.max(1).values + 0.1 + 2.0 * torch.rand(300, generator=g, dtype=torch.float64)
    incorr = torch.randn(200, 10, generator=g, dtype=torch.float64)
    incorr[:, 1] = incorr.max(1).values + 0.1 + 3.0 * torch.rand(200, generator=g,
                                                                 dtype=torch.float64)
    zeros = torch.zeros(300, dtype=torch.int64)
    return MarginData(atk_corr=atk, atk_labels=zeros, cln_incorr=incorr,
                      cln_labels=zeros[:200], n=700, clean_correct=500)


def _mixture_predicts(logits: torch.Tensor, labels: torch.Tensor, alpha: float, transform: dict,
                      std_classes: torch.Tensor) -> torch.Tensor:
    """Per row: the nonlinear mixture predicts the label when STD (hard max) says std_classes."""
    rob_log = torch.log_softmax(rob_map(logits, **transform), 1)
    std_log = hard_max_log_probs(F.one_hot(std_classes, logits.shape[1]).double())
    mixed = torch.logaddexp(math.log1p(-alpha) + std_log, math.log(alpha) + rob_log)
    return mixed.argmax(1) == labels


def _kept_whatever_std_says(logits, labels, alpha, transform) -> torch.Tensor:
    kept = torch.ones(len(logits), dtype=torch.bool)
    for std_class in range(logits.shape[1]):
        kept &= _mixture_predicts(logits, labels, alpha, transform,
                                  torch.full((len(logits),), std_class))
    return kept


def test_grid_search_result_keeps_beta_of_the_robust_points_and_minimises_kept_mistakes():
    """What the calibration promises, checked on the mixture itself: at the chosen constants
    STD can flip at most (100 - beta)% of ROB's robust points, the share of clean mistakes STD
    cannot fix is the reported objective, and no grid point does better at the same beta."""
    data = _synthetic_margin_data()
    s_values, p_values, c_values = [0.3, 1.0, 3.0], [1.0, 2.0, 3.0], [-1.5, -0.5, 0.0]
    best = grid_search(data, 90.0, s_values=s_values, p_values=p_values, c_values=c_values)
    transform = {"s": best.s, "p": best.p, "c": best.c, "clamp": "gelu", "k": None}

    def unfixable(alpha: float, t: dict) -> float:  # STD saying the true class does not help
        fixed = _mixture_predicts(data.cln_incorr, data.cln_labels, alpha, t, data.cln_labels)
        return float(1 - fixed.double().mean())

    kept = _kept_whatever_std_says(data.atk_corr, data.atk_labels, best.alpha, transform)
    assert kept.double().mean() >= 0.9 - 1 / len(data.atk_corr)
    assert unfixable(best.alpha, transform) == pytest.approx(best.objective, abs=1e-9)
    for s in s_values:
        for p in p_values:
            for c in c_values:
                t = {"s": s, "p": p, "c": c, "clamp": "gelu", "k": None}
                # The alpha at which STD can flip 10% of the robust points at most.
                margins = []
                for row in range(len(data.atk_corr)):
                    q = torch.softmax(rob_map(data.atk_corr[row:row + 1], **t), 1)[0]
                    margins.append(float(q[0] - torch.cat([q[:0], q[1:]]).max()))
                cutoff = np.percentile(margins, 10.0)
                if cutoff < calibration.MIN_CUTOFF:  # the transform breaks too many points
                    continue
                assert best.objective <= unfixable(1 / (1 + cutoff), t) + 1e-9
    assert np.asarray(best.grid["objective"]).shape == (3, 3, 3)


def test_grid_search_with_identical_rows_has_the_hand_computed_answer():
    """Every robust point the same logits A, every mistake B with a smaller gap: the cutoff is
    A's margin, no mistake clears it (objective 0) and the tie goes to the smallest cutoff."""
    a = torch.tensor([[4.0, 1.0, 0.0, 0.0]], dtype=torch.float64).repeat(50, 1)
    b = torch.tensor([[1.0, 0.8, 0.0, 0.0]], dtype=torch.float64).repeat(20, 1)
    data = MarginData(atk_corr=a, atk_labels=torch.zeros(50, dtype=torch.int64), cln_incorr=b,
                      cln_labels=torch.ones(20, dtype=torch.int64), n=100, clean_correct=80)
    best = grid_search(data, 98.5, s_values=[1.0, 2.0], p_values=[1.0], c_values=[0.0],
                       clamp="none")
    margin = float(transformed_margins(a[:1], s=1.0, p=1.0, c=0.0, clamp="none"))
    assert (best.s, best.objective) == (1.0, 0.0)
    assert best.cutoff == pytest.approx(margin)
    assert best.alpha == pytest.approx(1 / (1 + margin))


def test_linear_alpha_is_one_over_one_plus_the_percentile_of_softmax_margins():
    data = _synthetic_margin_data(1)
    probs = torch.softmax(2.0 * data.atk_corr, 1)
    cutoff = np.percentile((probs[:, 0] - probs[:, 1:].max(1).values).numpy(), 5.0)
    assert linear_alpha(data, 95.0, rob_scale=2.0) == pytest.approx(1 / (1 + cutoff))


def test_grid_points_whose_cutoff_vanishes_are_not_chosen():
    data = _synthetic_margin_data(2)
    best = grid_search(data, 98.5, s_values=[1e-6, 1.0], p_values=[1.0], c_values=[0.0])
    assert best.s == 1.0 and best.cutoff >= calibration.MIN_CUTOFF
    with pytest.raises(CalibrationError, match="cutoff below"):
        grid_search(data, 98.5, s_values=[1e-6], p_values=[1.0], c_values=[0.0])


def test_min_margin_attack_keeps_the_lowest_margin_point_also_for_unbroken_images():
    model = tiny_base(0)
    x, y = synthetic_data(24, seed=9)
    eps = 0.4 / 255  # the tiny models fall at 2/255; at this radius some survive
    result = min_margin_attack(model, x, y, eps, n_iter=10, n_target=2)
    with torch.no_grad():
        clean_margin = logit_margin(model(x), y)
        margin_at_point = logit_margin(model(result.x_min), y)
    assert (result.x_min - x).abs().max() <= eps + 1e-6
    assert torch.allclose(result.margin, margin_at_point, atol=1e-4)
    survivors = ~result.fooled
    assert survivors.any()
    # The attack lowered the margin of images it never misclassified, and kept the lowest.
    assert (result.margin[survivors] < clean_margin[survivors]).all()
    assert (result.margin[survivors] > 0).all() and (result.margin[result.fooled] <= 0).all()


def test_collect_margin_data_resumes_the_unfinished_batches_only(tmp_path, monkeypatch):
    model = tiny_base(0)
    x, y = synthetic_data(12, seed=10)
    kwargs = dict(eps=2 / 255, norm="Linf", n_iter=5, n_target=1, batch_size=4, seed=0,
                  identity={"rob": "abc"}, device=CPU)
    first = collect_margin_data(model, x, y, list(range(100, 112)), tmp_path, **kwargs)
    (tmp_path / "batches" / "00001.pt").unlink()  # as if killed during the second batch
    calls = []
    original = calibration.min_margin_attack
    monkeypatch.setattr(calibration, "min_margin_attack",
                        lambda *a, **k: calls.append(len(a[2])) or original(*a, **k))
    again = collect_margin_data(model, x, y, list(range(100, 112)), tmp_path, **kwargs)
    assert calls == [4]
    assert torch.equal(first.atk_corr, again.atk_corr)
    assert torch.equal(first.cln_incorr, again.cln_incorr)
    with pytest.raises(CalibrationError, match="another calibration.*n_iter"):
        collect_margin_data(model, x, y, list(range(100, 112)), tmp_path,
                            **dict(kwargs, n_iter=6))


def test_calibration_images_overlapping_the_evaluated_ones_are_refused():
    assert held_out_ids(1000, 5, 10000, 1000) == [1000, 1001, 1002, 1003, 1004]
    with pytest.raises(CalibrationError, match="inside the 1000 images an evaluation reports"):
        held_out_ids(999, 5, 10000, 1000)
    with pytest.raises(CalibrationError, match="has 10000"):
        held_out_ids(9998, 5, 10000, 1000)


def _tiny_config(tmp_path, shared_cifar10):
    models = tmp_path / "models"
    models.mkdir()
    for name, seed in (("std.pt", 0), ("rob.pt", 1)):
        torch.manual_seed(seed)
        model = create_model("resnet18", width=2)
        with torch.no_grad():
            model.linear.weight.mul_(20)
        torch.save({"model": model.state_dict()}, models / name)
    config = {
        "seed": 0, "log_dir": str(models), "log_path": "results",
        "model_load_path": {"std": "std.pt", "rob": "rob.pt", "comp": "None"},
        "forward_settings": {"std_model_type": "resnet18", "rob_model_type": "resnet18",
                             "std_model_kwargs": {"width": 2}, "rob_model_kwargs": {"width": 2},
                             "use_policy": False},
        "dataset_settings": {"name": "CIFAR-10", "format": "npz", "path": str(shared_cifar10)},
        "evaluation_settings": {"n_examples": 16, "batch_size": 8,
                                "attacks_to_run": ["apgd-ce"], "autoattack_iterations": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_calibrate_command_writes_a_record_a_plot_and_a_config_that_evaluates(tmp_path,
                                                                              shared_cifar10):
    import run

    config = _tiny_config(tmp_path, shared_cifar10)
    out, written = tmp_path / "calibration", tmp_path / "nonlinear.yaml"
    args = ["--config", str(config), "--output-dir", str(out), "--write-config", str(written),
            "--start", "100", "--n-images", "32", "--batch-size", "16", "--iterations", "3",
            # Random base models: at a tiny radius some of their correct points survive.
            "--set", "evaluation_settings.eps=0.0001",
            "--targets", "1", "--grid-size", "3", "--device", "cpu"]
    result = CliRunner().invoke(calibrate_cli.main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "calibration.json").read_text())
    assert record["images"] == {"split": "test", "first": 100, "last": 131, "n": 32}
    assert 0 < record["nonlinear"]["alpha"] <= 1
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    loaded = load_config(written).nonlinear_settings
    assert loaded.enabled and loaded.alpha == pytest.approx(record["nonlinear"]["alpha"])
    assert loaded.surrogate_alpha == pytest.approx(record["surrogate_alpha"]["alpha"])
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(written), "--output-dir", str(tmp_path / "eval"),
        "--device", "cpu", "--n-examples", "8",
        "--set", "nonlinear_settings.square_examples=2",
        "--set", "nonlinear_settings.square_queries=5"])
    assert result.exit_code == 0, result.output
    assert "steered by the surrogate" in result.output
    # Overlap with the evaluated images (the config's n_examples 16) is a one-line refusal.
    result = CliRunner().invoke(calibrate_cli.main, args[:-6] + ["--start", "8", "--device",
                                                                 "cpu"])
    assert result.exit_code == 1
    assert "inside the 16 images an evaluation reports" in result.output
    assert "Traceback" not in result.output


def test_alpha_sweep_of_a_nonlinear_composite_adds_the_matched_fixed_alpha(tmp_path,
                                                                         shared_cifar10):
    import run
    from adaptive_smoothing.cli import plot_results

    config = _tiny_config(tmp_path, shared_cifar10)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(run.main, [
        "--eval", "--config", str(config), "--output-dir", str(out), "--device", "cpu",
        "--n-examples", "16", "--alpha-sweep", "0,1",
        "--set", "nonlinear_settings={enabled: true, s: 2.0, p: 2.0, c: -0.5, alpha: 0.9, "
                 "transfer_attacks: false, square_examples: 0}"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert sorted(sweep) == ["alpha_0.000", "alpha_1.000", "matched_nonlinear", "nonlinear"]
    matched = sweep["matched_nonlinear"]
    assert 0 <= matched["fixed_alpha"] <= 1
    assert matched["clean_accuracy"] >= sweep["nonlinear"]["clean_accuracy"]
    assert matched["surrogate_robust_accuracy"] is None  # a fixed mixture: AutoAttack only
    assert sweep["nonlinear"]["surrogate_robust_accuracy"] is not None
    result = CliRunner().invoke(plot_results.main, [str(out)])
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())["nonlinear"]
    assert comparison["matched"]["robust_paired"]["n"] == 16
    assert "McNemar" in result.output
