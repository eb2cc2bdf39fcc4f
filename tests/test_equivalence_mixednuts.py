"""The published MixedNUTS mixtures against robustbench 1.1.1's implementation
(``get_nonlin_mixed_classifier``, RobustBench's Bai2024MixedNUTS entries).

For each dataset: robustbench's mixed classifier with random weights, made confident (random
weights give near-uniform outputs that hide mistakes; docs/METHOD.md, "Quirks"), is written in
the layout of docs/METHOD.md ("Published models"); ``load_published_model`` loads it, and the
log-probabilities (true output and gradient surrogate), the argmax, the non-finite pattern and
the state dicts must agree.

Confident here means two things. The ROB map layer-normalises the logits, so scaling them
changes nothing: each image gets its own dominant class (a spike of ``SPIKE`` logit standard
deviations), which is what lets the GELU-power-scale map make ROB's transformed softmax peaked.
STD's hard max reads only the argmax, which the same spike makes image-dependent (and unlike
ROB's, so that the mixture's STD term is visible).

robustbench keeps the constants as float32 parameters, the table (and we) their decimals; at the
calibration's logit range the difference is far below the 1e-4 tolerance. Outputs are compared
under ``torch.no_grad``: robustbench's HardMaxMap takes a smooth approximation when its input has
a grad_fn.

These are published sizes (BiT-M-R152x2 with RaWideResNet-70-16 or WRN-70-16, about 500 M
parameters, 2 GB in fp32): ~10 s to build each model and a few seconds per forward pass of 2
images on 2 CPU cores; one pair of models is alive at a time.
"""
from __future__ import annotations

import contextlib
import gc
import io
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from adaptive_smoothing.compat import import_robustbench
from adaptive_smoothing.models.nonlinear import NonlinearComposite, NonlinearConstants
from adaptive_smoothing.published import load_published_model, published_model

pytestmark = pytest.mark.slow

SPIKE = 6.0  # the dominant class's logit, in logit standard deviations
# (dataset, STD's dominant classes for the two images, ROB's)
CASES = [("cifar10", (3, 7), (5, 1)), ("cifar100", (42, 7), (13, 88))]


def build_robustbench_mixture(dataset: str) -> torch.nn.Module:
    """robustbench's NonLinMixedClassifier with random weights, in eval mode, on the CPU."""
    import_robustbench()
    from robustbench.model_zoo.architectures.comp_model import get_nonlin_mixed_classifier

    # Its BiT calls .cuda() in the constructor (docs/METHOD.md, "Quirks"); it also prints a lot.
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), \
            contextlib.redirect_stdout(io.StringIO()):
        return get_nonlin_mixed_classifier(dataset).eval()


def spiking_hook(classes: tuple[int, int]):
    """A one-shot pre-hook on a classifier head (Linear, or BiT's 1x1 conv) for a batch of two
    images: normalise the logits to unit spread, then add +SPIKE to class ``classes[i]`` on image
    i and -SPIKE on the other image, along the two images' feature difference."""
    done = []

    def hook(module, inputs):
        if done:  # once: the weights it leaves are what the files hold
            return
        done.append(True)
        with torch.no_grad():
            features = inputs[0].flatten(1)
            assert features.shape[0] == 2
            weight = module.weight.view(module.weight.shape[0], -1)
            logits = F.linear(features, weight, module.bias)
            factor = 1.0 / logits.std(1).mean()
            weight.mul_(factor)
            module.bias.mul_(factor)
            half = (features[0] - features[1]) / 2
            centre = (features[0] + features[1]) / 2
            direction = half / half.dot(half)
            for sign, cls in zip((1.0, -1.0), classes):
                weight[cls] += sign * SPIKE * direction
                module.bias[cls] -= sign * SPIKE * direction.dot(centre)
    return hook


def with_prefix(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


def std_state(theirs: torch.nn.Module) -> dict:
    # bit_rn_v2 keeps its normalisation constants as Parameters; the authors' BiT files (and
    # ours) have none, and robustbench tolerates their absence when it loads the file.
    return {k: v for k, v in theirs.std_model.state_dict().items() if k not in ("mean", "std")}


def write_layout(theirs: torch.nn.Module, root: Path, dataset: str) -> None:
    """The files in the layout of docs/METHOD.md: the authors' BiT file, and for ROB the
    RobustBench Peng2023Robust file (CIFAR-10) or DM-Improves-AT's EDM file (CIFAR-100)."""
    spec = published_model(dataset, "mixednuts")
    (root / "Base").mkdir(parents=True)
    torch.save({"model": with_prefix(std_state(theirs), "module."), "step": 1000},
               root / spec.std.target)
    rob = theirs.rob_model.state_dict()
    torch.save(rob if dataset == "cifar10" else {"model_state_dict": with_prefix(rob, "module.0.")},
               root / spec.rob.target)


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # 2 GB of checkpoints per model


def assert_same_log_probs(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(ours.isfinite(), reference.isfinite())
    finite = reference.isfinite()
    torch.testing.assert_close(ours[finite], reference[finite].float(), rtol=0, atol=1e-4)
    assert torch.equal(ours.argmax(1), reference.argmax(1))


@pytest.mark.parametrize("dataset, std_classes, rob_classes", CASES)
def test_mixednuts_matches_robustbench(workdir, dataset, std_classes, rob_classes):
    spec = published_model(dataset, "mixednuts")
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)

    theirs = build_robustbench_mixture(dataset)
    hooks = [theirs.std_model.head.conv.register_forward_pre_hook(spiking_hook(std_classes)),
             theirs.rob_model.logits.register_forward_pre_hook(spiking_hook(rob_classes))]
    with torch.no_grad():
        reference, reference_surrogate, reference_alpha = theirs(x, return_all=True)
        # The calibrated base models: image-dependent argmaxes, the ones asked for.
        assert theirs.std_model(x).argmax(1).tolist() == list(std_classes)
        rob_logits = theirs.rob_model(x)
    for hook in hooks:
        hook.remove()
    assert rob_logits.argmax(1).tolist() == list(rob_classes)
    # Confident: ROB's transformed softmax (and so the mixture) is far from uniform, and the
    # mixture keeps ROB's decision over STD's one-hot.
    probs = reference.exp()
    assert (probs.max(1).values > 0.3).all(), f"calibration failed: near-uniform {probs}"
    assert reference.argmax(1).tolist() == list(rob_classes)
    assert torch.allclose(reference_alpha, torch.tensor(spec.nonlinear.alpha))

    write_layout(theirs, workdir / "models", dataset)
    model = load_published_model(workdir / "models", dataset, "mixednuts")
    composite = model.composite
    assert isinstance(composite, NonlinearComposite) and not model.training
    assert NonlinearConstants.from_composite(composite) == spec.nonlinear
    with torch.no_grad():
        true, surrogate = composite.true_and_surrogate(x)
        through_wrapper = model(x)
    assert_same_log_probs(true, reference)
    assert_same_log_probs(through_wrapper, reference)
    assert_same_log_probs(surrogate, reference_surrogate)
    # STD's hard max is in the mixture: at STD's class, the (1 - alpha) one-hot term.
    for image, cls in enumerate(std_classes):
        rob_only = composite._log_probs(None, rob_logits)[image, cls].double().exp()
        expected = (1 - spec.nonlinear.alpha) + spec.nonlinear.alpha * rob_only
        assert true[image, cls].double().exp() == pytest.approx(expected.item(), rel=1e-4)

    # The loaded weights are robustbench's, tensor for tensor.
    ours_std, ours_rob = composite.std_model.state_dict(), composite.rob_model.state_dict()
    for mine, reference_state in ((ours_std, std_state(theirs)),
                                  (ours_rob, theirs.rob_model.state_dict())):
        assert set(mine) == set(reference_state)
        different = [k for k, v in reference_state.items() if not torch.equal(mine[k], v)]
        assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    del model, composite, theirs
    gc.collect()
