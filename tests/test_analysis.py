"""The margin analysis of fixed mixtures (docs/METHOD.md, "Certified robustness"): the threshold
is exactly where an STD output can start to flip the mixture, and the report's shares are consistent."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adaptive_smoothing.analysis import (compare_with_fixed_curve, fixed_mixture_accuracy,
                                         margin_threshold, probability_margin, rob_margin_report)
from adaptive_smoothing.cli import plot_results
from synthetic import synthetic_data, tiny_composite


def test_probability_margin():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    y = torch.tensor([0, 0, 1])
    assert torch.allclose(probability_margin(probs, y), torch.tensor([0.3, -0.3, 0.0]))


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
def test_threshold_is_where_the_worst_std_output_flips_the_mixture(alpha):
    threshold = margin_threshold(alpha)
    for d, survives in ((threshold + 0.01, True), (threshold - 0.01, False)):
        # ROB: class 0 ahead of class 1 by d; the worst STD puts all its mass on class 1.
        rob = torch.tensor([[0.5 + d / 2, 0.5 - d / 2, 0.0]])
        std = torch.tensor([[0.0, 1.0, 0.0]])
        mixture = (1 - alpha) * std + alpha * rob
        assert (mixture.argmax(1).item() == 0) is survives
    with pytest.raises(ValueError, match="alpha must lie in"):
        margin_threshold(0.0)


def test_margin_report_is_consistent():
    composite = tiny_composite(mixer=False)
    # The tiny models are fragile: at eps 0.5/255 about a fifth of the points stay robust.
    x, y = synthetic_data(48, seed=5)
    report = rob_margin_report(composite.rob_model, x, y, [0.5, 0.8, 0.95, 1.0], eps=0.5 / 255,
                               n_iter=10)
    assert report.n == 48
    assert 0 < report.rob_robust_accuracy <= report.rob_clean_accuracy
    kept = [report.kept_at_alpha[a] for a in ("0.5", "0.8", "0.95", "1")]
    # A larger weight on ROB tolerates smaller margins; at alpha 1 every robust point is kept.
    assert kept == sorted(kept) and kept[0] < kept[-1]
    assert kept[-1] == pytest.approx(report.rob_robust_accuracy)
    q = list(report.margin_quantiles.values())
    assert q == sorted(q) and q[0] > 0
    # The fixed mixture at alpha 1 is ROB itself: same clean and robust accuracy.
    clean, robust = fixed_mixture_accuracy(composite, 1.0, x, y, eps=0.5 / 255, n_iter=10)
    assert clean == pytest.approx(report.rob_clean_accuracy)
    assert robust == pytest.approx(report.rob_robust_accuracy)


def test_analyze_margins_script(tmp_path, shared_cifar10):
    script = Path(__file__).resolve().parents[1] / "scripts" / "analyze_margins.py"
    spec = importlib.util.spec_from_file_location("analyze_margins", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    composite = tiny_composite(mixer=False)
    for name, model in (("std.pt", composite.std_model), ("rob.pt", composite.rob_model)):
        torch.save({"model": model.state_dict(), "arch": "resnet18", "arch_kwargs": {"width": 4},
                    "num_classes": 10}, tmp_path / name)
    out = tmp_path / "margins.json"
    result = CliRunner().invoke(module.main, [
        "--std", str(tmp_path / "std.pt"), "--rob", str(tmp_path / "rob.pt"),
        "--data-dir", str(shared_cifar10), "--n-examples", "8", "--alphas", "0.9,0.95",
        "--rob-scales", "1,2", "--n-iter", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n_examples"] == 8 and set(report["rob"]["kept_at_alpha"]) == {"0.9", "0.95"}
    grid = {(m["rob_scale"], m["alpha"]) for m in report["fixed_mixtures"]}
    assert grid == {(1.0, 0.9), (1.0, 0.95), (2.0, 0.9), (2.0, 0.95)}
    bad = CliRunner().invoke(module.main, [
        "--std", str(tmp_path / "std.pt"), "--rob", str(tmp_path / "rob.pt"),
        "--alphas", "0.9,x", "--output", str(out)])
    assert bad.exit_code != 0 and "0.9,x" in bad.output


def _entry(clean: float, robust: float, n: int = 1000, alpha: float = 0.5) -> dict:
    return {"clean_accuracy": clean, "robust_accuracy": robust, "n_examples": n,
            "mean_alpha_clean": alpha, "mean_alpha_adv": alpha}


def test_composite_is_compared_with_the_interpolated_fixed_curve():
    sweep = {"alpha_0.000": _entry(0.90, 0.0), "alpha_0.500": _entry(0.86, 0.10),
             "alpha_1.000": _entry(0.70, 0.40), "adaptive": _entry(0.84, 0.20)}
    cmp = compare_with_fixed_curve(sweep)
    # Between alpha 0.5 (86, 10) and 1 (70, 40): 10 + 30 * (86 - 84) / 16 = 13.75 at 84% clean.
    assert cmp["curve_robust"] == pytest.approx(13.75)
    assert cmp["bracket_alphas"] == [0.5, 1.0]
    assert cmp["above_curve"] == pytest.approx(20 - 13.75)
    assert cmp["clean_above_rob"] == pytest.approx(14.0)
    assert cmp["robust_se"] == pytest.approx(100 * (0.2 * 0.8 / 1000) ** 0.5)
    assert cmp["clean_se"] == pytest.approx(100 * (0.84 * 0.16 / 1000) ** 0.5)


def test_a_non_monotone_curve_is_judged_by_its_best_bracket():
    # 0.2-0.5 brackets 85.5% clean at 3.9% robust, 0.5-0.8 at 12.5%: the composite must beat 12.5.
    sweep = {"alpha_0.000": _entry(0.872, 0.0), "alpha_0.200": _entry(0.873, 0.0),
             "alpha_0.500": _entry(0.85, 0.05), "alpha_0.800": _entry(0.86, 0.20),
             "adaptive": _entry(0.855, 0.10)}
    cmp = compare_with_fixed_curve(sweep)
    assert cmp["bracket_alphas"] == [0.5, 0.8]
    assert cmp["curve_robust"] == pytest.approx(12.5)
    assert cmp["above_curve"] == pytest.approx(-2.5)
    assert cmp["clean_above_rob"] is None  # no alpha 1 entry


def test_comparison_outside_the_curve_and_without_a_composite():
    sweep = {"alpha_0.000": _entry(0.90, 0.0), "alpha_1.000": _entry(0.70, 0.40),
             "adaptive": _entry(0.95, 0.5)}
    cmp = compare_with_fixed_curve(sweep)
    assert cmp["curve_robust"] is None and cmp["above_curve"] is None
    with pytest.raises(ValueError, match="no 'adaptive' entry"):
        compare_with_fixed_curve({k: v for k, v in sweep.items() if k != "adaptive"})


def test_plot_results_writes_the_comparison(tmp_path):
    sweep = {"alpha_0.500": _entry(0.86, 0.10), "alpha_1.000": _entry(0.70, 0.40),
             "adaptive": _entry(0.84, 0.20)}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    (tmp_path / "adaptive" / "batches").mkdir(parents=True)
    (tmp_path / "adaptive" / "batches" / "00000.json").write_text(
        json.dumps({"alpha_clean": [0.6, 0.7], "alpha_adv": [0.8, 0.9]}))
    result = CliRunner().invoke(plot_results.main, [str(tmp_path), "--output-dir",
                                                    str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())["adaptive"]
    assert written["above_curve"] == pytest.approx(6.25)
    assert written["matched"] is None  # the sweep has no matched fixed alpha
    assert "+6.2 points" in result.output or "+6.3 points" in result.output


def test_mcnemar_and_paired_difference_have_their_textbook_values():
    from adaptive_smoothing.analysis import mcnemar_p, paired_comparison

    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # all 6 discordant pairs one way
    assert mcnemar_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    a = [1] * 30 + [0] * 10 + [1] * 5 + [0] * 55   # A robust on 35, B on 40; 5 vs 10 discordant
    b = [1] * 30 + [1] * 10 + [0] * 5 + [0] * 55
    paired = paired_comparison(a, b)
    assert paired["difference"] == pytest.approx(-5.0)
    assert (paired["a_only"], paired["b_only"]) == (5, 10)
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / 100
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 99 / 100)
    assert paired["difference_se"] == pytest.approx(100 * se)
    assert paired["mcnemar_p"] == pytest.approx(mcnemar_p(5, 10))
    with pytest.raises(ValueError, match="different or no images"):
        paired_comparison([1, 0], [1])


def test_comparison_pairs_the_composite_with_its_matched_fixed_alpha(tmp_path):
    from adaptive_smoothing.analysis import compare_sweep

    sweep = {"alpha_0.500": _entry(0.86, 0.10), "alpha_1.000": _entry(0.70, 0.40),
             "nonlinear": _entry(0.80, 0.30), "matched_nonlinear": dict(_entry(0.80, 0.25),
                                                                        fixed_alpha=0.7)}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    n = sweep["nonlinear"]["n_examples"]
    outcomes = {"nonlinear": [1] * int(0.3 * n) + [0] * (n - int(0.3 * n)),
                "matched_nonlinear": [0] * 10 + [1] * int(0.25 * n) + [0] * (n - 10 - int(0.25 * n))}
    for name, robust in outcomes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "per_image.json").write_text(json.dumps({
            "complete": True, "image_ids": list(range(n)),
            "outcomes": {"robust": robust, "clean": [1] * n}}))
    matched = compare_sweep(tmp_path)["nonlinear"]["matched"]
    assert matched["fixed_alpha"] == 0.7
    paired = matched["robust_paired"]
    assert paired["difference"] == pytest.approx(5.0)
    assert paired["a_only"] - paired["b_only"] == int(0.3 * n) - int(0.25 * n)
