"""Detection AUC (rank-based, ties) and the gamma BN's re-estimation, against hand computations."""
from __future__ import annotations

import copy

import pytest
import torch

from adaptive_smoothing.detection import detection_metrics, fixed_attack_images, roc_auc
from adaptive_smoothing.models import CompositeModel, MixingNet, create_model


def test_auc_with_ties_matches_hand_count() -> None:
    # Pairs (pos, neg) with pos > neg count 1, ties 1/2: pos 1 -> 1 + 2 * 0.5 = 2; pos 2 -> 3 +
    # 0.5 = 3.5; pos 3 -> 4. Total 9.5 of 12 pairs.
    neg, pos = torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])
    assert roc_auc(neg, pos) == pytest.approx(9.5 / 12, abs=1e-12)
    # The order of the inputs does not matter, only the scores.
    assert roc_auc(neg.flip(0), pos[[2, 0, 1]]) == pytest.approx(9.5 / 12, abs=1e-12)


def test_auc_extremes_and_all_ties() -> None:
    low, high = torch.tensor([-3.0, -2.0, -1.0]), torch.tensor([0.5, 4.0])
    assert roc_auc(low, high) == 1.0
    assert roc_auc(high, low) == 0.0
    assert roc_auc(torch.zeros(5), torch.zeros(3)) == 0.5


def test_auc_matches_brute_force_on_random_scores_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 6, (40,), generator=g).float()
    pos = torch.randint(2, 8, (30,), generator=g).float()
    diff = pos[:, None] - neg[None, :]
    brute = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert roc_auc(neg, pos) == pytest.approx(brute, abs=1e-12)


def test_auc_refuses_nan_scores() -> None:
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(torch.tensor([0.0, float("nan")]), torch.tensor([1.0]))


def _composite() -> CompositeModel:
    torch.manual_seed(0)
    std = create_model("resnet18", 10, width=2)
    rob = create_model("resnet18", 10, width=2)
    return CompositeModel(std, rob, MixingNet((2, 2), version=3), alpha_scale=0.75,
                          alpha_bias=0.2).eval()


def test_gamma_bn_reestimation_equals_average_of_clamped_eval_mode_batch_statistics() -> None:
    model = _composite()
    x = torch.rand(24, 3, 32, 32)
    batches = list(x.split(8))
    # Training steps move the mixer's own BN statistics; give them non-trivial values.
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32) * 0.5)
    model.eval()
    # A stale gamma BN, as after a fast-moving training run.
    model.gamma_bn.running_mean.fill_(50.0)
    model.gamma_bn.running_var.fill_(1e-4)
    mixer_buffers = {k: v.clone() for k, v in model.mixer.state_dict().items()}

    model.train()  # the training loop calls it in training mode: the mixer must run in eval
    assert model.reestimate_gamma_bn(batches) == 3
    assert model.training and model.mixer.training  # mode restored

    means, variances = [], []
    mixer = copy.deepcopy(model.mixer).eval()
    with torch.no_grad():
        for xb in batches:
            fs = model.std_model.forward_features(xb).features
            fr = model.rob_model.forward_features(xb).features
            raw = mixer([fs[0], fr[0]], [fs[1], fr[1]]).reshape(-1).double()
            m, s = raw.mean(), raw.std()
            clamped = raw.clamp(m - 0.6 * s, m + 0.6 * s)
            means.append(clamped.mean())
            variances.append(clamped.var())
    assert model.gamma_bn.running_mean.item() == pytest.approx(torch.stack(means).mean().item(),
                                                               rel=1e-5)
    assert model.gamma_bn.running_var.item() == pytest.approx(
        torch.stack(variances).mean().item(), rel=1e-4)
    for key, value in model.mixer.state_dict().items():  # the mixer's BN stats are untouched
        assert torch.equal(value, mixer_buffers[key]), key

    # Deployed: the eval-mode gamma of these images is now centred near the evaluation bias
    # (within the clamp's asymmetry), not at (raw - 50) / 0.01.
    model.eval()
    with torch.no_grad():
        gamma = model(x).gamma
    assert abs(gamma.mean().item() - model.eval_gamma[1]) < 3 * model.eval_gamma[0]


def test_detection_metrics_are_the_aucs_of_eval_mode_gamma() -> None:
    model = _composite()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    cpu = torch.device("cpu")
    fixed = fixed_attack_images(model, x, y, alpha=0.5, eps=8 / 255, norm="Linf", n_iter=2,
                                batch_size=4, device=cpu, dtype=torch.float32,
                                generator=torch.Generator().manual_seed(0))
    assert fixed.shape == x.shape
    assert (fixed - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(fixed, x)
    model.train()
    out = detection_metrics(model, x, y, fixed, eps=8 / 255, norm="Linf", n_iter=2,
                            bce_weight=0.5, batch_size=4, device=cpu, dtype=torch.float32,
                            generator=torch.Generator().manual_seed(1))
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        clean, attacked = model(x), model(fixed)
    assert out["auc_fixed"] == pytest.approx(roc_auc(clean.gamma, attacked.gamma), abs=1e-9)
    assert out["det_alpha_clean"] == pytest.approx(clean.alpha.mean().item(), abs=1e-6)
    assert out["det_alpha_fixed"] == pytest.approx(attacked.alpha.mean().item(), abs=1e-6)
    assert 0.0 <= out["auc_adaptive"] <= 1.0
    assert 0.2 <= out["det_alpha_adaptive"] <= 0.95
