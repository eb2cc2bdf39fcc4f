"""The composite classifier against hand computations (docs/METHOD.md, "Composite")."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from adaptive_smoothing.models import CompositeModel, LogProbClassifier, MixingNet, create_model

PACKAGE = Path(__file__).resolve().parents[1] / "adaptive_smoothing"
STD_SCALE, ROB_SCALE = 1.5, 0.5
BN_EPS = 1e-5  # BatchNorm1d's default, used by the gamma BN



def confident(model: torch.nn.Module, head: torch.nn.Linear, spread: float) -> None:
    """Rescale a random model's head so its logits spread by ``spread`` (std over classes):
    random weights give near-uniform outputs, which would hide mistakes."""
    with torch.no_grad():
        std = model(torch.rand(4, 3, 32, 32)).std(1).mean()
        head.weight.mul_(spread / std)
        head.bias.mul_(spread / std)


def base_models(num_classes: int = 10):
    std = create_model("resnet18", num_classes, width=8)
    rob = create_model("dm_wrn", num_classes, depth=10, width=1, activation="silu")
    confident(std, std.linear, 4.0 / STD_SCALE)
    confident(rob, rob.logits, 4.0 / ROB_SCALE)
    return std, rob


def composite(mixer: bool = True, **kwargs) -> CompositeModel:
    std, rob = base_models()
    kwargs.setdefault("std_scale", STD_SCALE)
    kwargs.setdefault("rob_scale", ROB_SCALE)
    return CompositeModel(std, rob, MixingNet((8, 16), version=4) if mixer else None, **kwargs)


def mixture(g: torch.Tensor, h: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    a = alpha.reshape(-1, 1)
    return torch.log((1 - a) * torch.softmax(STD_SCALE * g, 1)
                     + a * torch.softmax(ROB_SCALE * h, 1))


def far_from_uniform(log_probs: torch.Tensor) -> bool:
    """Every row's log-probabilities span more than 1 nat (a uniform output spans 0)."""
    return bool(((log_probs.max(1).values - log_probs.min(1).values) > 1.0).all())


def raw_gamma(model: CompositeModel, x: torch.Tensor) -> torch.Tensor:
    """The mixing network's output before clamp/BN, computed outside the composite."""
    fs = model.std_model.forward_features(x).features
    fr = model.rob_model.forward_features(x).features
    mixer = copy.deepcopy(model.mixer)  # its BN statistics must not move twice in training mode
    return mixer([fs[0], fr[0]], [fs[1], fr[1]]).reshape(-1)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(8, 3, 32, 32)


def count_calls(module: torch.nn.Module) -> list:
    calls: list = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_fixed_gamma_equals_hand_mixture(x):
    # alpha_scale/bias apply to the mixer's alpha only; a fixed gamma is used as is
    # (docs/METHOD.md, "Composite").
    model = composite(mixer=False, gamma=0.7, alpha_scale=0.5, alpha_bias=0.1)
    out = model(x)
    g, h = model.std_model(x), model.rob_model(x)
    a = torch.full((8,), 1 / (1 + math.exp(-0.7)))
    torch.testing.assert_close(out.alpha, a)
    torch.testing.assert_close(out.gamma, torch.full((8,), 0.7))
    torch.testing.assert_close(out.log_probs, mixture(g, h, a), rtol=0, atol=1e-5)
    # The check has teeth: the mixture is far from either model alone and from uniform.
    assert (out.log_probs - torch.log_softmax(STD_SCALE * g, 1)).abs().max() > 0.5
    assert (out.log_probs - torch.log_softmax(ROB_SCALE * h, 1)).abs().max() > 0.5
    assert far_from_uniform(out.log_probs)


@pytest.mark.parametrize("how", ["gamma=-inf", "alpha range (0, 0)"])
def test_std_only(x, how):
    model = (composite(mixer=False, gamma=-math.inf) if how == "gamma=-inf"
             else composite(alpha_scale=0.0, alpha_bias=0.0))
    rob_calls = count_calls(model.rob_model)
    out = model(x)
    torch.testing.assert_close(out.log_probs, STD_SCALE * model.std_model(x), rtol=0, atol=0)
    assert torch.all(out.alpha == 0) and torch.all(out.gamma == -math.inf)
    assert not rob_calls  # the other model is skipped


@pytest.mark.parametrize("how", ["gamma=+inf", "alpha_bias=1"])
def test_rob_only(x, how):
    model = (composite(mixer=False, gamma=math.inf) if how == "gamma=+inf"
             else composite(alpha_scale=0.0, alpha_bias=1.0))
    std_calls = count_calls(model.std_model)
    out = model(x)
    torch.testing.assert_close(out.log_probs, ROB_SCALE * model.rob_model(x), rtol=0, atol=0)
    assert torch.all(out.alpha == 1) and torch.all(out.gamma == math.inf)
    assert not std_calls


def test_eval_alpha_hand_computed_and_inside_range(x):
    model = composite(eval_gamma=(2.0, 0.5), alpha_scale=0.3, alpha_bias=0.6)
    raw = raw_gamma(model, x)
    with torch.no_grad():  # running statistics that spread gamma over the sigmoid's slope
        model.gamma_bn.running_mean.fill_(raw.mean().item())
        model.gamma_bn.running_var.fill_(raw.var().item())
    out = model(x)
    gamma = (raw - raw.mean()) / torch.sqrt(raw.var() + BN_EPS) * 2.0 + 0.5
    alpha = torch.sigmoid(gamma) * 0.3 + 0.6
    torch.testing.assert_close(out.gamma, gamma, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.alpha, alpha, rtol=0, atol=1e-6)
    assert torch.all(out.alpha > 0.6) and torch.all(out.alpha < 0.9)
    assert out.alpha.max() - out.alpha.min() > 0.1 and far_from_uniform(out.log_probs)
    g, h = model.std_model(x), model.rob_model(x)
    torch.testing.assert_close(out.log_probs, mixture(g, h, alpha), rtol=0, atol=1e-5)


def test_training_mode_clamps_and_uses_training_constants(x):
    model = composite(train_gamma=(1.5, -0.4), eval_gamma=(2.0, 0.5), alpha_scale=0.3,
                      alpha_bias=0.6)
    model.train()
    with torch.no_grad():
        model.gamma_bn.running_mean.fill_(0.3)
        model.gamma_bn.running_var.fill_(2.0)
    raw = raw_gamma(model, x).detach()
    mean, std = raw.mean(), raw.std()
    low, high = mean - 0.6 * std, mean + 0.6 * std
    assert ((raw < low) | (raw > high)).any(), "test set-up: the clamp must bind"
    clamped = raw.clamp(low, high)

    def batch_norm(values):
        return (values - values.mean()) / torch.sqrt(values.var(unbiased=False) + BN_EPS)

    out = model(x)
    gamma = batch_norm(clamped) * 1.5 - 0.4
    torch.testing.assert_close(out.gamma, gamma, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.alpha, torch.sigmoid(gamma), rtol=0, atol=1e-6)  # unscaled
    assert (out.gamma - (batch_norm(raw) * 1.5 - 0.4)).abs().max() > 1e-2  # clamp mattered
    # Running statistics of the clamped gamma, momentum 0.01 (unbiased variance, as BN does).
    torch.testing.assert_close(model.gamma_bn.running_mean,
                               (0.99 * 0.3 + 0.01 * clamped.mean()).reshape(1))
    torch.testing.assert_close(model.gamma_bn.running_var,
                               (0.99 * 2.0 + 0.01 * clamped.var()).reshape(1))


def test_scale_alpha_defaults_and_override(x):
    model = composite(alpha_scale=0.3, alpha_bias=0.6)
    wrapper = LogProbClassifier(model)
    assert model.scale_alpha  # constructed in eval mode
    wrapper.train()
    assert not model.scale_alpha and model.training
    wrapper.eval()
    assert model.scale_alpha and not model.training
    model.train(True, scale_alpha=True)
    assert model.scale_alpha
    model.eval(scale_alpha=False)  # e.g. while generating training attacks
    out = model(x)
    torch.testing.assert_close(out.alpha, torch.sigmoid(out.gamma))
    model.eval()
    out = model(x)
    torch.testing.assert_close(out.alpha, torch.sigmoid(out.gamma) * 0.3 + 0.6)
    torch.testing.assert_close(wrapper(x), out.log_probs, rtol=0, atol=0)  # AutoAttack's view


def test_mode_context_restores_the_callers_mode_also_on_error(x):
    model = composite(alpha_scale=0.3, alpha_bias=0.6)
    model.train(True, scale_alpha=True)  # an unusual mode: it must come back unchanged
    with model.mode(False, scale_alpha=False):
        assert not model.training and not model.scale_alpha and not model.mixer.training
    assert model.training and model.scale_alpha and model.mixer.training
    with pytest.raises(RuntimeError, match="inside"):
        with model.mode(False):
            assert model.scale_alpha and not model.gamma_bn.training  # eval default: scaled
            raise RuntimeError("inside")
    assert model.training and model.scale_alpha and model.gamma_bn.training


def test_mixer_wrapper_passed_to_forward_is_called_instead_of_the_mixer(x):
    model = composite().eval()
    calls = []

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel(model.mixer)
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, firsts, seconds):
            calls.append(1)
            return self.inner(firsts, seconds)

    plain = model(x)
    wrapped = model(x, mixer=Wrapper(model.mixer))
    assert calls == [1]
    torch.testing.assert_close(wrapped.log_probs, plain.log_probs, rtol=0, atol=0)
    assert not any(k.startswith("inner") for k in model.state_dict())  # nothing was swapped in


def test_base_models_stay_frozen_in_training_mode(x):
    model = composite()
    model.train()
    assert model.mixer.training and model.gamma_bn.training
    assert not model.std_model.training and not model.rob_model.training
    assert not any(p.requires_grad for p in model.std_model.parameters())
    assert not any(p.requires_grad for p in model.rob_model.parameters())
    assert all(p.requires_grad for p in model.mixer.parameters())
    base_stats = {k: v.clone() for k, v in model.rob_model.state_dict().items()}
    mixer_stats = model.mixer.layers[0][0].bn1.running_mean.clone()
    model(x).log_probs.sum().backward()
    for key, value in model.rob_model.state_dict().items():
        assert torch.equal(value, base_stats[key]), key  # eval-mode BN: statistics unchanged
    assert not torch.equal(model.mixer.layers[0][0].bn1.running_mean, mixer_stats)
    assert model.mixer.linear.weight.grad is not None


def input_gradient(model: CompositeModel, x: torch.Tensor, y: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.log_probs.gather(1, y[:, None]).sum().backward()
    return x.grad, out


def change_mixer_keeping_alpha(model: CompositeModel, x: torch.Tensor) -> None:
    """Change the mixer's last layer along directions orthogonal to the pooled features of ``x``.

    gamma (and so alpha and the output) stays the same at ``x``, but its gradient w.r.t. ``x``
    does not: only a model that differentiates through the mixer sees the change.
    """
    pooled = []
    hook = model.mixer.linear.register_forward_hook(lambda m, i, o: pooled.append(i[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    basis, _ = torch.linalg.qr(pooled[0].T)  # (P3, batch), orthonormal columns
    weight = model.mixer.linear.weight
    delta = torch.randn_like(weight)
    delta -= (delta @ basis) @ basis.T
    with torch.no_grad():
        weight += delta * (5 * weight.norm() / delta.norm())


def test_input_gradient_flows_through_the_mixer():
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 7])
    model = composite(alpha_scale=1.0, alpha_bias=0.0, eval_gamma=(2.0, 0.0))
    grad_before, out_before = input_gradient(model, x, y)
    change_mixer_keeping_alpha(model, x)
    grad_after, out_after = input_gradient(model, x, y)
    torch.testing.assert_close(out_after.alpha, out_before.alpha, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_after.log_probs, out_before.log_probs, rtol=0, atol=1e-4)
    assert (grad_after - grad_before).norm() > 0.05 * grad_before.norm()


def test_unsafe_detach_hides_the_mixer_from_the_gradient():
    # unsafe_detach_mixer_inputs=True is the original's "policy_graph: false": the attacker's
    # gradient ignores the mixer, so robustness measured in this mode is NOT valid.
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 7])
    model = composite(alpha_scale=1.0, alpha_bias=0.0, eval_gamma=(2.0, 0.0),
                      unsafe_detach_mixer_inputs=True)
    grad_before, _ = input_gradient(model, x, y)
    change_mixer_keeping_alpha(model, x)
    grad_after, _ = input_gradient(model, x, y)
    torch.testing.assert_close(grad_after, grad_before, rtol=1e-3,
                               atol=1e-3 * grad_before.abs().max().item())
    model.unsafe_detach_mixer_inputs = False
    grad_full, _ = input_gradient(model, x, y)
    assert (grad_full - grad_after).norm() > 0.05 * grad_after.norm()


def test_moves_with_to(x):
    model = composite(alpha_scale=0.3, alpha_bias=0.6)
    reference = model(x[:2]).log_probs
    assert model.to(torch.device("cpu")) is model
    torch.testing.assert_close(model(x[:2]).log_probs, reference, rtol=0, atol=0)
    # A device other than the CPU, without a GPU: every tensor, Normalize's non-persistent
    # constants included, must follow .to(), and forward must create its tensors there too.
    assert model.to("meta") is model
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "meta" for t in tensors)
    out = model(torch.rand(2, 3, 32, 32, device="meta"))
    assert out.log_probs.device.type == "meta" and out.log_probs.shape == (2, 10)
    assert out.alpha.device.type == "meta"


def test_no_cuda_calls_in_the_package():
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if ".cuda(" in p.read_text()]
    assert not offenders, f"use .to(device) instead of .cuda(): {offenders}"


def _mixture_float64(model: CompositeModel, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The mixture's log-probabilities in float64 with logsumexp: the exact reference."""
    with torch.no_grad():
        g = model.std_model(x).double() * model.std_scale
        h = model.rob_model(x).double() * model.rob_scale
    a = alpha.double().reshape(-1, 1)
    return torch.logaddexp(torch.log1p(-a) + torch.log_softmax(g, 1),
                           torch.log(a) + torch.log_softmax(h, 1))


def test_confident_models_give_finite_log_probs_and_gradients():
    """Logits so spread that float32 softmax probabilities underflow to 0 for some classes in
    both models: log of the mixed probabilities would be -inf, with NaN gradients."""
    torch.manual_seed(0)
    model = composite(alpha_scale=0.75, alpha_bias=0.2).eval()
    for head in (model.std_model.linear, model.rob_model.logits):
        with torch.no_grad():
            head.weight.mul_(100.0)
            head.bias.mul_(100.0)
    x = torch.rand(6, 3, 32, 32, requires_grad=True)
    with torch.no_grad():
        g = torch.softmax(model.std_model(x) * model.std_scale, 1)
        h = torch.softmax(model.rob_model(x) * model.rob_scale, 1)
    assert ((g == 0) & (h == 0)).any()  # the direct form would take log(0) here
    out = model(x)
    assert torch.isfinite(out.log_probs).all()
    reference = _mixture_float64(model, x.detach(), out.alpha.detach())
    assert torch.allclose(out.log_probs.double(), reference, rtol=1e-5, atol=1e-3)
    out.log_probs.min(1).values.sum().backward()  # the smallest entries: the underflowing ones
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0



def test_alpha_range_accepts_float32_round_off_and_refuses_a_real_excess() -> None:
    from adaptive_smoothing.models.composite import check_alpha_range
    from adaptive_smoothing.models.constants import CompositeConstants

    # robustbench stores alpha_bias and alpha_scale as float32 scalars: 0.85 + 0.15 read back
    # from float32 exceeds 1 by 3e-8 and must load, in the constants and in the model.
    bias, scale = (torch.tensor(v, dtype=torch.float32).item() for v in (0.85, 0.15))
    assert bias + scale > 1
    check_alpha_range(bias, scale)
    CompositeConstants(1.0, 1.0, (2.0, 1.3), scale, bias)
    for low, width in ((0.85, 0.16), (-0.01, 0.5), (0.5, -0.01)):
        with pytest.raises(ValueError, match="alpha range"):
            check_alpha_range(low, width)
        with pytest.raises(ValueError, match="alpha range"):
            CompositeConstants(1.0, 1.0, (2.0, 1.3), width, low)
