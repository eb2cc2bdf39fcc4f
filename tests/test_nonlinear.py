"""The nonlinear composite (models/nonlinear.py): its maps against their formulas, the decision
guarantee, log-space finiteness, its config section and its evaluation's extra attacks."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_smoothing.config import ConfigError, NonlinearSettings, apply_overrides, load_config
from adaptive_smoothing.config.schema import EvaluationSettings
from adaptive_smoothing.evaluation import evaluate, evaluate_batch, matched_alpha
from adaptive_smoothing.models import BaseClassifier, BaseOutput
from adaptive_smoothing.models.composite import fixed_alpha_composite
from adaptive_smoothing.models.nonlinear import (NonlinearComposite, SurrogateGradientClassifier,
                                                 hard_max_log_probs, rob_map,
                                                 transformed_margins)
from synthetic import synthetic_data, tiny_base

CPU = torch.device("cpu")


class FixedLogits(BaseClassifier):
    """A 'classifier' whose logits are a fixed linear function of the input's first pixels."""

    feature_channels = (1, 1)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.num_classes = weight.shape[0]

    def forward_features(self, x: torch.Tensor) -> BaseOutput:
        logits = x.flatten(1)[:, :self.weight.shape[1]] @ self.weight.T
        return BaseOutput(logits, (x[:, :1], x[:, :1]))


def test_rob_map_equals_its_formula_on_hand_made_logits():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.3, 0.2, 0.1, 4.0]])
    s, p, c = 1.7, 2.5, -0.4
    for clamp, fn in (("gelu", F.gelu), ("relu", F.relu), ("none", lambda v: v)):
        for k in (None, 2, 3):
            out = rob_map(logits, s=s, p=p, c=c, clamp=clamp, k=k)
            for row, l in enumerate(logits.double()):
                top = sorted(l.tolist(), reverse=True)[:k or len(l)]
                mean = sum(top) / len(top)
                var = sum((t - mean) ** 2 for t in top) / (len(top) - 1)  # unbiased
                for j, value in enumerate(l.tolist()):
                    u = float(fn(torch.tensor((value - mean) / math.sqrt(var + 1e-8) + c,
                                              dtype=torch.float64)))
                    expected = s * math.copysign(abs(u) ** p, u) if u else 0.0
                    assert out[row, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_relu_power_below_one_has_finite_gradients_at_zero():
    logits = torch.tensor([[3.0, 0.0, -2.0]], requires_grad=True)
    out = rob_map(logits, s=1.0, p=0.5, c=-0.5, clamp="relu")
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_hard_max_is_log_one_hot_and_mixture_stays_finite_with_its_zeros():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.5]])
    assert torch.equal(hard_max_log_probs(logits).exp(),
                       torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    std, rob = FixedLogits(torch.randn(10, 12) * 50), FixedLogits(torch.randn(10, 12) * 50)
    model = NonlinearComposite(std, rob, alpha=0.9, s=50.0, p=4.0, c=0.0)
    x = torch.rand(6, 3, 2, 2, requires_grad=True)
    out = model(x).log_probs
    assert torch.isfinite(out).all()
    # Probabilities of the mixture: (1 - alpha) one-hot + alpha softmax(T), summing to 1.
    assert torch.allclose(out.double().exp().sum(1), torch.ones(6, dtype=torch.float64),
                          atol=1e-5)
    F.cross_entropy(out, torch.arange(6) % 10).backward()
    assert torch.isfinite(x.grad).all()


def test_mixture_is_the_formula_in_probability_space():
    torch.manual_seed(0)
    std, rob = FixedLogits(torch.randn(10, 12)), FixedLogits(torch.randn(10, 12))
    x = torch.rand(5, 3, 2, 2)
    for std_map in ("hard_max", "identity"):
        model = NonlinearComposite(std, rob, alpha=0.7, s=2.0, p=1.5, c=-0.3, std_map=std_map,
                                   std_scale=1.3)
        g, h = std(x).double(), rob(x).double()
        m_std = (F.one_hot(g.argmax(1), 10).double() if std_map == "hard_max"
                 else torch.softmax(1.3 * g, 1))
        p = 0.3 * m_std + 0.7 * torch.softmax(rob_map(h, s=2.0, p=1.5, c=-0.3), 1)
        assert torch.allclose(model(x).log_probs.double(), p.log(), atol=1e-5)


def test_decision_guarantee_by_brute_force():
    """Wherever ROB's transformed margin is at least (1 - alpha) / alpha, the mixture predicts
    ROB's class whatever STD says (every STD class tried)."""
    torch.manual_seed(1)
    h = torch.randn(400, 10) * 2
    for alpha, (s, p, c) in itertools.product((0.75, 0.9, 0.99),
                                              ((4.0, 1.0, 0.0), (3.0, 2.0, -1.0))):
        margin = transformed_margins(h, s=s, p=p, c=c)
        rob_log = torch.log_softmax(rob_map(h, s=s, p=p, c=c), 1)
        safe = margin >= (1 - alpha) / alpha
        assert safe.any() and (~safe).any()
        for std_class in range(10):
            std_log = hard_max_log_probs(F.one_hot(torch.full((400,), std_class), 10).double())
            mixed = torch.logaddexp(math.log1p(-alpha) + std_log, math.log(alpha) + rob_log)
            assert torch.equal(mixed.argmax(1)[safe], h.argmax(1)[safe])
        # ... and the bound is tight: below it, some STD class flips some decisions.
        flipped = torch.zeros(400, dtype=torch.bool)
        for std_class in range(10):
            std_log = hard_max_log_probs(F.one_hot(torch.full((400,), std_class), 10).double())
            mixed = torch.logaddexp(math.log1p(-alpha) + std_log, math.log(alpha) + rob_log)
            flipped |= mixed.argmax(1) != h.argmax(1)
        assert flipped[~safe].any()


def test_surrogate_classifier_has_true_values_and_surrogate_gradients():
    torch.manual_seed(2)
    std, rob = FixedLogits(torch.randn(10, 12)), FixedLogits(torch.randn(10, 12))
    model = NonlinearComposite(std, rob, alpha=0.8, s=2.0, p=2.0, c=-0.5, surrogate_alpha=0.6)
    x = torch.rand(4, 3, 2, 2, requires_grad=True)
    out = SurrogateGradientClassifier(model)(x)
    assert torch.allclose(out, model(x).log_probs, atol=1e-6)
    grad, = torch.autograd.grad(out[:, 0].sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    expected, = torch.autograd.grad(model.surrogate_log_probs(x2)[:, 0].sum(), x2)
    assert torch.allclose(grad, expected, atol=1e-6)
    # The surrogate: (1 - a) softmax(g) + a (0.9 softmax(h) + 0.1 softmax(T(h))).
    g, h = std(x).double(), rob(x).double()
    sur = 0.4 * torch.softmax(g, 1) + 0.6 * (0.9 * torch.softmax(h, 1) + 0.1 * torch.softmax(
        rob_map(h, s=2.0, p=2.0, c=-0.5), 1))
    assert torch.allclose(model.surrogate_log_probs(x).double(), sur.log(), atol=1e-5)


def test_fixed_alpha_composite_of_a_nonlinear_composite_is_the_linear_mixture():
    torch.manual_seed(3)
    std, rob = FixedLogits(torch.randn(10, 12)), FixedLogits(torch.randn(10, 12))
    model = NonlinearComposite(std, rob, alpha=0.9, s=2.0, p=2.0, c=0.0, std_scale=2.0)
    fixed = fixed_alpha_composite(model, 0.3)
    x = torch.rand(4, 3, 2, 2)
    expected = (0.7 * torch.softmax(2 * std(x), 1) + 0.3 * torch.softmax(rob(x), 1)).log()
    assert torch.allclose(fixed(x).log_probs, expected, atol=1e-5)


@pytest.mark.parametrize("key, value, problem", [
    ("p", 0, "> 0"), ("p", -1, "> 0"), ("s", 0, "> 0"), ("alpha", 0, "> 0"),
    ("alpha", 1.2, "<= 1"), ("k", 1, ">= 2"), ("clamp", "tanh", "gelu"),
    ("std_map", "soft", "hard_max"), ("surrogate_alpha", 1.5, "<= 1"),
    ("square_examples", -1, ">= 0")])
def test_nonlinear_settings_errors_name_the_key_and_the_expectation(key, value, problem):
    config = load_config("configs/demo.yaml")
    with pytest.raises(ConfigError, match=rf"nonlinear_settings\.{key}.*{problem}"):
        apply_overrides(config, **{f"nonlinear_settings.{key}": value})


def test_nonlinear_settings_default_is_off_and_keeps_other_configs_unchanged():
    assert NonlinearSettings().enabled is False
    assert load_config("configs/demo.yaml").nonlinear_settings == NonlinearSettings()


# -- evaluation -----------------------------------------------------------------------------------
def _settings(**kw) -> EvaluationSettings:
    base = dict(n_examples=32, batch_size=16, precision="fp32", data_dir="unused",
                attacks_to_run=("apgd-ce", "apgd-t"), norm="Linf", eps=16 / 255,
                autoattack_iterations=10, seed=0)
    base.update(kw)
    return EvaluationSettings(**base)


@pytest.fixture(scope="module")
def bases():
    return tiny_base(0), tiny_base(1)


def test_surrogate_attack_finds_what_autoattack_on_the_masked_output_misses(bases):
    """A ROB map clamped to zero (ReLU after a shift below every normalised logit) leaves ROB's
    term uniform and the output STD's hard max: piecewise constant, its gradient exactly zero.
    AutoAttack on the output then reports robustness that is not there; the surrogate attack,
    judged on the same true output, finds it."""
    std, rob = bases
    model = NonlinearComposite(std, rob, alpha=0.9, s=1.0, p=1.0, c=-5.0, clamp="relu",
                               surrogate_alpha=0.3)
    x, y = synthetic_data(32, seed=3)
    x.requires_grad_(True)
    F.cross_entropy(model(x).log_probs, y).backward()
    assert torch.count_nonzero(x.grad) == 0  # the output alone gives attacks nothing
    nl = NonlinearSettings(enabled=True, transfer_attacks=False, square_examples=0)
    counters, _ = evaluate_batch(model, x.detach(), y, _settings(eps=2 / 255), device=CPU,
                                 dtype=torch.float32, nonlinear=nl)
    assert counters["clean_correct"] >= 24
    # Masked: AutoAttack's random starts may still land on a point STD gets wrong (one image of
    # 29 on some CPUs' rounding), but its gradient steps find nothing.
    assert counters["autoattack_robust"] >= counters["clean_correct"] - 2
    assert counters["surrogate_robust"] <= counters["clean_correct"] // 4
    assert counters["robust"] == counters["surrogate_robust"]


def test_nonlinear_evaluation_reports_every_attack_and_the_worst_case(bases, tmp_path):
    std, rob = bases
    model = NonlinearComposite(std, rob, alpha=0.95, s=2.0, p=2.0, c=-0.5)
    x, y = synthetic_data(32, seed=4)
    nl = NonlinearSettings(enabled=True, square_examples=8, square_queries=20)
    summary = evaluate(model, x, y, _settings(eps=4 / 255), tmp_path, device=CPU, nonlinear=nl)
    names = ("autoattack", "surrogate", "transfer_rob", "transfer_linear")
    for name in names:
        assert summary[f"{name}_robust_accuracy"] is not None
        assert summary["robust_accuracy"] <= summary[f"{name}_robust_accuracy"]
    assert summary["square_examples"] == 8 and summary["square_robust_accuracy"] is not None
    assert summary["kind"] == "nonlinear" and summary["valid"]
    table = (tmp_path / "results.md").read_text()
    assert "surrogate" in table and "Square (20 queries; first 8 images)" in table
    per_image = __import__("json").loads((tmp_path / "per_image.json").read_text())
    assert per_image["complete"] and per_image["image_ids"] == list(range(32))
    robust = torch.tensor(per_image["outcomes"]["robust"])
    worst = torch.ones(32, dtype=torch.int64)
    for name in ("clean", *names):
        worst &= torch.tensor(per_image["outcomes"][name])
    square = torch.tensor(per_image["outcomes"]["square"])
    worst[:8] &= square[:8]
    assert (square[8:] == -1).all()
    assert torch.equal(robust, worst)
    assert summary["robust_accuracy"] == pytest.approx(float(robust.float().mean()))


def test_nonlinear_evaluation_without_the_surrogate_is_marked_not_valid(bases, tmp_path):
    std, rob = bases
    model = NonlinearComposite(std, rob, alpha=0.95, s=2.0, p=2.0, c=-0.5)
    x, y = synthetic_data(8, seed=5)
    nl = NonlinearSettings(enabled=True, surrogate_attack=False, transfer_attacks=False,
                           square_examples=0)
    summary = evaluate(model, x, y, _settings(autoattack_iterations=2), tmp_path, device=CPU,
                       nonlinear=nl)
    assert summary["valid"] is False
    assert "NOT VALID" in (tmp_path / "results.md").read_text()


def test_matched_alpha_hits_the_target_clean_accuracy(bases):
    std, rob = bases
    model = NonlinearComposite(std, rob, alpha=0.9, s=2.0, p=2.0, c=0.0)
    x, y = synthetic_data(200, seed=6)
    with torch.no_grad():
        std_log = torch.log_softmax(std(x), 1).double()
        rob_log = torch.log_softmax(rob(x), 1).double()

    def accuracy(alpha: float) -> float:
        mixed = torch.logaddexp(math.log1p(-alpha) + std_log, math.log(alpha) + rob_log)
        return float((mixed.argmax(1) == y).double().mean())

    # Targets the fixed curve passes through: its own value at a few alphas. The match is at
    # least as accurate, and no larger alpha (on a fine scan) is.
    for a in (0.3, 0.6, 0.8):
        target = accuracy(a)
        found = matched_alpha(model, x, y, target, device=CPU, dtype=torch.float32)
        assert accuracy(found) >= target and found >= a
        assert all(accuracy(b) < target for b in torch.linspace(found + 1e-3, 0.999, 300).tolist())
