"""Attacks: constraints, targets, the mixer term, the randomized schedule and attack strength."""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_smoothing import attacks
from adaptive_smoothing.attacks import (RandomizedAttackSettings, adaptive_attack, apgd,
                                        apgd_cascade, as_attack_target, draw_attack_run,
                                        generate_training_attacks, pgd)
from adaptive_smoothing.models import (BaseClassifier, BaseOutput, CompositeModel,
                                       LogProbClassifier, MixingNet)


# -- small models ---------------------------------------------------------------------------------
def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(10)
    return model


class _TinyBase(BaseClassifier):
    """Two conv feature maps (4 ch full size, 8 ch half size) and a linear head: the smallest
    base model a V3 mixing network with in_planes (4, 4) accepts, to keep CPU tests fast."""

    feature_channels = (4, 8)
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 10)

    def forward_features(self, x: torch.Tensor) -> BaseOutput:
        feat1 = F.relu(self.conv1(x))
        feat2 = F.relu(self.conv2(feat1))
        return BaseOutput(self.head(feat2.mean((2, 3))) * 5, (feat1, feat2))


def _composite() -> CompositeModel:
    torch.manual_seed(0)
    std, rob = _TinyBase(), _TinyBase()
    mixer = MixingNet((4, 4), version=3)
    return CompositeModel(std, rob, mixer, std_scale=2.0, rob_scale=1.0, eval_gamma=(2.0, 0.5),
                          alpha_scale=0.8, alpha_bias=0.1).eval()


def _norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = delta.flatten(1)
    return flat.abs().amax(1), flat.norm(dim=1)


def _assert_no_param_grads(model: nn.Module) -> None:
    assert all(p.grad is None for p in model.parameters())


# -- constraints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_respects_per_sample_eps(norm: str, loss: str) -> None:
    model = _tiny_cnn()
    x = torch.rand(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    scale = 0.1 if norm == "Linf" else 2.0
    eps = torch.linspace(0, 1, 8) * scale
    for return_adversarial in (False, True):
        result = apgd(model, x, y, eps, norm=norm, n_iter=10, loss=loss,
                      return_adversarial=return_adversarial)
        linf, l2 = _norms(result.x_adv - x)
        size = linf if norm == "Linf" else l2
        assert (size <= eps + 1e-6).all()
        assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
        assert result.loss.shape == (8,) and result.fooled.dtype == torch.bool
    _assert_no_param_grads(model)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_respects_per_sample_eps(norm: str) -> None:
    model = _tiny_cnn()
    x = torch.rand(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    eps = torch.linspace(0, 1, 8) * (0.1 if norm == "Linf" else 2.0)
    result = pgd(model, x, y, eps, norm=norm, n_iter=5, alpha_factor=2.5,
                 momentum_decay=torch.linspace(0, 1, 8))
    linf, l2 = _norms(result.x_adv - x)
    assert ((linf if norm == "Linf" else l2) <= eps + 1e-6).all()
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    _assert_no_param_grads(model)


def test_pgd_raises_the_loss() -> None:
    model = _linear()
    x = torch.rand(16, 3, 16, 16)
    y = model(x).argmax(1)
    result = pgd(model, x, y, 0.02, n_iter=10, random_start=False)
    clean_loss = F.cross_entropy(model(x), y, reduction="none")
    assert (result.loss > clean_loss).all()


# -- targets and the mixer term -------------------------------------------------------------------
def test_targeted_apgd_reaches_target() -> None:
    """Targeted DLR pushes the target above the true class (it does not ask for the target to be
    on top: pyautoattack's APGD-T leaves a third class on top for many points as well)."""
    model = _linear()
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y_target = logits.argmin(1)  # the hardest target: currently ranked last
    result = apgd(model, x, y, 0.1, n_iter=20, loss="dlr_targeted", y_target=y_target)
    with torch.no_grad():
        adv_logits = model(result.x_adv)

    def rank(z: torch.Tensor) -> torch.Tensor:  # 0 = top
        return (z > z.gather(1, y_target[:, None])).sum(1)

    assert (rank(adv_logits) < rank(logits)).all()
    z_t = adv_logits.gather(1, y_target[:, None])
    z_y = adv_logits.gather(1, y[:, None])
    assert (z_t > z_y).all()
    assert result.fooled.all() and (adv_logits.argmax(1) != y).all()


def test_bce_only_attack_lowers_gamma() -> None:
    composite = _composite()
    x = torch.rand(4, 3, 16, 16)
    y = torch.randint(0, 10, (4,))
    with torch.no_grad():
        gamma_clean = composite(x).gamma
    result = apgd(composite, x, y, 8 / 255, n_iter=5, bce_weight=1.0)
    with torch.no_grad():
        gamma_adv = composite(result.x_adv).gamma
    assert (gamma_adv < gamma_clean).all()
    # The caller's mode is kept, and no parameter gradient is accumulated.
    assert not composite.training and composite.scale_alpha
    _assert_no_param_grads(composite)


def test_attack_target_adapter() -> None:
    composite = _composite()
    x = torch.rand(2, 3, 16, 16)
    logits, gamma = as_attack_target(composite)(x)
    assert logits.shape == (2, 10) and gamma.shape == (2,)
    logits2, gamma2 = as_attack_target(LogProbClassifier(composite))(x)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(gamma2, gamma)
    assert as_attack_target(_tiny_cnn())(torch.rand(2, 3, 16, 16))[1] is None
    target = as_attack_target(composite)
    assert as_attack_target(target) is target


@pytest.mark.parametrize("gamma", [math.inf, -math.inf])
def test_one_model_composite_attack_has_no_nan(gamma: float) -> None:
    composite = CompositeModel(_TinyBase(), _TinyBase(), None, gamma=gamma).eval()
    x = torch.rand(2, 3, 16, 16)
    result = apgd(composite, x, torch.tensor([1, 2]), 8 / 255, n_iter=3, bce_weight=0.5)
    assert torch.isfinite(result.x_adv).all() and torch.isfinite(result.loss).all()


# -- randomized training attacks ------------------------------------------------------------------
def test_draw_attack_run_ranges_and_reproducible() -> None:
    settings = RandomizedAttackSettings(eps=0.03, iters_df=10, iters_const=-4, eps_factor_loc=0.4,
                                        eps_factor_scale=0.7, mom_decay_loc=0.2,
                                        mom_decay_scale=0.5, comp_loss_wmax=0.4)
    gen = torch.Generator().manual_seed(123)
    draws = [draw_attack_run(settings, 16, gen) for _ in range(300)]
    iters = np.array([d.n_iter for d in draws])
    assert all(isinstance(d.n_iter, int) for d in draws) and iters.min() >= 1
    assert abs(iters.mean() - 6) < 1.0  # E[max(1, round(chi2(10) - 4))] is about 6.1
    eps = torch.stack([d.eps for d in draws])
    assert eps.min() >= 0.03 * 0.4 and eps.max() <= 0.03 * 1.1 + 1e-9
    assert eps.max() - eps.min() > 0.03 * 0.6  # the whole range is used
    w = torch.stack([d.bce_weight for d in draws])
    assert w.min() >= 0 and w.max() <= 0.4 and w.max() > 0.35
    mom = torch.stack([d.momentum_decay for d in draws])
    assert mom.min() >= 0.2 and mom.max() <= 0.7
    assert (eps[0] != eps[1]).any()  # per run, not one draw reused

    again = draw_attack_run(settings, 16, torch.Generator().manual_seed(123))
    assert again.n_iter == draws[0].n_iter
    torch.testing.assert_close(again.eps, draws[0].eps)
    torch.testing.assert_close(again.bce_weight, draws[0].bce_weight)

    never_zero = RandomizedAttackSettings(iters_df=1, iters_const=-100)
    assert draw_attack_run(never_zero, 2, gen).n_iter == 1


def test_generate_training_attacks(monkeypatch: pytest.MonkeyPatch) -> None:
    composite = _composite()
    composite.train(True, scale_alpha=True)  # an unusual mode: it must come back unchanged
    x = torch.rand(4, 3, 16, 16)
    y = torch.randint(0, 10, (4,))
    settings = RandomizedAttackSettings(eps=8 / 255, n_target=2, iters_df=1, iters_const=1)

    calls = []
    real_apgd = attacks.apgd

    def spy(*args, **kwargs):
        calls.append({"y_target": kwargs["y_target"], "training": composite.training,
                      "scale_alpha": composite.scale_alpha, "eps": args[3]})
        return real_apgd(*args, **kwargs)

    monkeypatch.setattr(attacks, "apgd", spy)
    batches = generate_training_attacks(composite, x, y, settings, torch.Generator().manual_seed(1))
    assert composite.training and composite.scale_alpha

    assert len(batches) == 1 + settings.n_target and len(calls) == len(batches)
    assert all(not c["training"] and not c["scale_alpha"] for c in calls)
    composite.train(False, scale_alpha=False)
    with torch.no_grad():
        ranking = composite(x).log_probs.argsort(dim=1, descending=True)
    assert calls[0]["y_target"] is None
    for j, call in enumerate(calls[1:], start=1):
        torch.testing.assert_close(call["y_target"], ranking[:, j])
    for batch, call in zip(batches, calls):
        assert batch.shape == x.shape and batch.min() >= 0 and batch.max() <= 1
        assert ((batch - x).flatten(1).abs().amax(1) <= call["eps"] + 1e-6).all()
        assert (call["eps"] <= 8 / 255 * 1.1 + 1e-7).all()
    _assert_no_param_grads(composite)

    # Reproducible with the same generator seed; the PGD variant runs too.
    monkeypatch.setattr(attacks, "apgd", real_apgd)
    composite.train(True, scale_alpha=True)
    again = generate_training_attacks(composite, x, y, settings, torch.Generator().manual_seed(1))
    for a, b in zip(batches, again):
        torch.testing.assert_close(a, b)
    pgd_settings = RandomizedAttackSettings(n_target=1, apgd=False, iters_df=1)
    assert len(generate_training_attacks(composite, x, y, pgd_settings)) == 2
    assert composite.training and composite.scale_alpha


# -- evaluation-side adaptive attack --------------------------------------------------------------
def test_adaptive_attack_worst_case() -> None:
    model = _linear()
    x = torch.rand(16, 3, 16, 16)
    y = torch.randint(0, 10, (16,))
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
    none = adaptive_attack(model, x, y, 0.0, n_iter=3, n_target=2)
    assert torch.equal(none.robust, clean_correct)
    assert torch.equal(none.clean_correct, clean_correct)
    strong = adaptive_attack(model, x, y, 0.1, n_iter=10, n_target=2)
    assert not strong.robust.any()
    with torch.no_grad():
        assert (model(strong.x_adv).argmax(1) != y).all()
    assert ((strong.x_adv - x).flatten(1).abs().amax(1) <= 0.1 + 1e-6).all()


def test_adaptive_attack_on_composite() -> None:
    composite = _composite()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        y = composite(x).log_probs.argmax(1)
    result = adaptive_attack(composite, x, y, 8 / 255, n_iter=3, n_target=2)
    assert result.clean_correct.all()
    assert (result.robust <= result.clean_correct).all()
    with torch.no_grad():
        pred = composite(result.x_adv).log_probs.argmax(1)
    assert torch.equal(pred == y, result.robust)  # every non-robust point has its example
    assert not composite.training and composite.scale_alpha
    _assert_no_param_grads(composite)


def test_cascade_attacks_only_points_still_robust(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _linear()
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[:4] = (y[:4] + 1) % 10  # four points misclassified on x
    calls = []
    real_apgd = attacks.apgd

    def spy(target, xs, ys, eps, **kwargs):
        result = real_apgd(target, xs, ys, eps, **kwargs)
        calls.append({"n": len(xs), "loss": kwargs["loss"], "y_target": kwargs["y_target"],
                      "x": xs, "fooled": result.fooled})
        return result

    monkeypatch.setattr(attacks, "apgd", spy)
    result = apgd_cascade(model, x, y, 0.005, n_iter=3, n_target=2,
                          generator=torch.Generator().manual_seed(0))
    assert [c["loss"] for c in calls] == ["ce", "dlr_targeted", "dlr_targeted"]
    assert calls[0]["n"] == 12  # the misclassified points are not attacked
    still = 12 - int(calls[0]["fooled"].sum())
    assert 0 < still < 12 and calls[1]["n"] == still  # APGD-T: the survivors of APGD-CE only
    with torch.no_grad():
        second = model(calls[1]["x"]).argsort(1, descending=True)[:, 1]
    assert torch.equal(calls[1]["y_target"], second)
    assert not result.robust[:4].any() and not result.clean_correct[:4].any()
    fooled_total = sum(int(c["fooled"].sum()) for c in calls)
    assert int(result.robust.sum()) == 12 - fooled_total  # each point is fooled at most once

    calls.clear()
    all_first = apgd_cascade(model, x, y, 0.005, n_iter=3, n_target=0, first_on_all=True,
                             generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and calls[0]["n"] == 16  # validation: every point is attacked
    moved = (all_first.first_x_adv - x).flatten(1).abs().amax(1)
    assert (moved > 0).all() and (moved <= 0.005 + 1e-6).all()


# -- attack strength against the reference implementation ----------------------------------------
def _cifar_prefix(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image
    data = np.load(path / "test.npz")
    jpeg, offsets = data["jpeg"], data["offsets"]
    images = [np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes()))
                         .convert("RGB")) for i in range(n)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).contiguous()
    return x, torch.from_numpy(data["labels"][:n]).long()


@functools.lru_cache(maxsize=1)
def _train_cifar_cnn(path: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = _cifar_prefix(path, 2256)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 8 * 8, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_train, y_train = x[256:], y[256:]
    for _ in range(3):
        for batch in torch.randperm(len(x_train)).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            opt.step()
    model.eval().requires_grad_(False)
    return model, x[:256], y[:256]


@pytest.fixture
def cifar_cnn(shared_cifar10: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN trained for a few seconds on 2,000 offline CIFAR-10 test images (the first 256
    are held out and attacked; about 40% clean accuracy). Trained once per session."""
    return _train_cifar_cnn(shared_cifar10)


@pytest.mark.parametrize("norm, eps", [("Linf", 4 / 255), ("L2", 0.5)])
def test_apgd_as_strong_as_autoattack(cifar_cnn, norm: str, eps: float) -> None:
    from pyautoattack.autopgd_base import APGDAttack
    model, x, y = cifar_cnn
    n_iter = 20
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
    clean_acc = clean_correct.float().mean().item()

    reference = APGDAttack(model, n_iter=n_iter, norm=norm, eps=eps, loss="ce", n_restarts=1,
                           seed=0)
    x_ref = reference.perturb(x, y)
    with torch.no_grad():
        ref_robust = model(x_ref).argmax(1) == y
    ref_acc = ref_robust.float().mean().item()
    assert 0 < ref_acc < clean_acc, "the comparison needs a non-trivial robust accuracy"

    # Same points as the reference attacks (the clean-correct ones) and the same random start
    # stream (a generator seeded like AutoAttack's global seed).
    idx = clean_correct.nonzero().squeeze(1)
    result = apgd(model, x[idx], y[idx], eps, norm=norm, n_iter=n_iter, loss="ce",
                  return_adversarial=True, generator=torch.Generator().manual_seed(0))
    ours_robust = clean_correct.clone()
    ours_robust[idx[result.fooled]] = False
    x_ours = x.clone()
    x_ours[idx] = result.x_adv
    with torch.no_grad():
        assert torch.equal(model(x_ours).argmax(1) == y, ours_robust)
    ours_acc = ours_robust.float().mean().item()

    assert len(y) >= 200
    assert ours_acc <= ref_acc + 0.02, (ours_acc, ref_acc)
    assert ours_acc < clean_acc
    # Same algorithm, same start: the per-point outcomes should (nearly) coincide.
    assert (ours_robust == ref_robust).float().mean() >= 0.98


def test_per_image_random_starts_do_not_depend_on_the_batch():
    """An image's random start must be the same alone or inside any batch (else robust accuracy
    changes with --batch-size or the number of processes)."""
    from adaptive_smoothing.attacks import PerImageRandom, _random_start

    x = torch.rand(6, 3, 8, 8)
    eps = torch.full((1, 1, 1, 1), 8 / 255)
    whole = _random_start(x, eps, "Linf", PerImageRandom(3, range(10, 16)))
    part = _random_start(x[4:], eps, "Linf", PerImageRandom(3, [14, 15]))
    assert torch.equal(whole[4:], part)
    other_seed = _random_start(x, eps, "Linf", PerImageRandom(4, range(10, 16)))
    assert not torch.equal(whole, other_seed)
    # A second draw for the same image (e.g. APGD-T's next target) is a new one.
    random = PerImageRandom(3, [10])
    assert not torch.equal(random.draw((1, 5)), random.draw((1, 5)))
    subset = PerImageRandom(3, range(10, 16)).subset(torch.tensor([False, True, False, False,
                                                                   False, False]))
    assert subset.image_ids == [11]
