"""The three published models against robustbench's implementation (``get_composite_model``).

For each model: robustbench's architecture with random weights, made confident (random weights
give near-uniform outputs that hide mistakes; docs/METHOD.md, "Quirks"), is written in the
authors' file layout and in RobustBench's three files; ours loads each, and the outputs, gammas and state dicts
must agree.

These are the published sizes (about 567 M parameters, 2.3 GB in fp32, ~10 s to build and a few
seconds per forward pass of 2 images on 2 CPU cores): one pair of models is alive at a time.
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

from adaptive_smoothing.checkpoints import CompositeConstants
from adaptive_smoothing.compat import import_robustbench
from adaptive_smoothing.published import (load_published_model, load_robustbench_files,
                                          published_model)
from robustbench_state import (from_robustbench_state_dict, load_robustbench_state_dict,
                               to_robustbench_state_dict)

pytestmark = pytest.mark.slow

PUBLISHED = [("cifar10", "edm"), ("cifar100", "edm"), ("cifar100", "trades")]
# The authors' README, their benchmark script and the download each name the STD file differently.
STD_FILE_NAMES = {("cifar10", "edm"): "cifar10_bit_rn152.tar",
                  ("cifar100", "edm"): "cifar100_std_rn152.pt",
                  ("cifar100", "trades"): "cifar100_bit_rn152.pt"}
LOGIT_SPREAD = 4.0  # std over classes of s * logits after calibration: confident base models


def build_robustbench_composite(dataset: str, name: str) -> torch.nn.Module:
    """robustbench's CompositeModel with random weights, in eval mode, on the CPU."""
    import_robustbench()
    from robustbench.model_zoo.architectures.comp_model import get_composite_model

    # Its BiT calls .cuda() in the constructor (docs/METHOD.md, "Quirks"); it also prints a lot.
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), \
            contextlib.redirect_stdout(io.StringIO()):
        wrapper = get_composite_model(name, dataset)
    return wrapper.comp_model.eval()


def calibrating_hooks(theirs: torch.nn.Module, std_scale: float, rob_scale: float) -> list:
    """One-shot hooks that, during the first forward pass, rescale both classifier heads so the
    base models are confident, scale the mixer's last layer so its two outputs are 2 apart, and
    centre the gamma BN on them (normalised gammas -1 and +1, spread over the sigmoid's slope).

    Each change happens before the layer is used, so the forward pass sees the final weights,
    which are then what the checkpoint files hold.
    """
    def head_hook(spread):
        def hook(module, inputs):
            with torch.no_grad():
                # Not module(...): that would run this hook again.
                if isinstance(module, torch.nn.Conv2d):  # BiT's 1x1 head conv
                    logits = F.conv2d(inputs[0], module.weight, module.bias).flatten(1)
                else:
                    logits = F.linear(inputs[0], module.weight, module.bias)
                factor = spread / logits.std(1).mean()
                module.weight.mul_(factor)
                module.bias.mul_(factor)
        return hook

    def mixer_linear_hook(module, inputs):
        with torch.no_grad():
            raw = F.linear(inputs[0], module.weight)
            module.weight.mul_(2.0 / (raw.max() - raw.min()))

    def mixer_output_hook(module, inputs, output):
        with torch.no_grad():
            theirs.bn.running_mean.fill_(output.mean().item())
            theirs.bn.running_var.fill_(1.0 - theirs.bn.eps)

    return [theirs.models[0].head.conv.register_forward_pre_hook(
                head_hook(LOGIT_SPREAD / std_scale)),
            theirs.models[1].logits.register_forward_pre_hook(head_hook(LOGIT_SPREAD / rob_scale)),
            theirs.policy_net.linear.register_forward_pre_hook(mixer_linear_hook),
            theirs.policy_net.register_forward_hook(mixer_output_hook)]


def with_prefix(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


def write_authors_layout(theirs: torch.nn.Module, root: Path, dataset: str, name: str) -> None:
    """The files as the authors distribute them, in the layout their README asks for."""
    (root / "Base").mkdir(parents=True)
    (root / "CompModel").mkdir()
    torch.save({"model": with_prefix(theirs.models[0].state_dict(), "module."), "step": 1000},
               root / "Base" / STD_FILE_NAMES[dataset, name])
    rob_state = theirs.models[1].state_dict()
    rob = ({"model_state_dict": with_prefix(rob_state, "module.0.")} if name == "edm"
           else rob_state)  # EDM: DM-Improves-AT's format; TRADES: DeepMind's plain state_dict
    torch.save(rob, root / "Base" / f"{dataset}_linf_{name}_wrn70-16.pt")
    torch.save({"model": theirs.policy_net.state_dict(), "bn": theirs.bn.state_dict(),
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "batch": 0},
               root / "CompModel" / f"{dataset}_{name}_best.pt")


def write_robustbench_files(theirs: torch.nn.Module, folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"model_m{i}.pt" for i in range(3)]
    torch.save(theirs.models[0].state_dict(), paths[0])
    torch.save(theirs.models[1].state_dict(), paths[1])
    torch.save({"model": theirs.policy_net.state_dict(), "bn": theirs.bn.state_dict()}, paths[2])
    return paths


def assert_states_equal(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    different = [key for key, value in reference.items() if not torch.equal(ours[key], value)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # several GB of checkpoints per model


@pytest.mark.parametrize("dataset, name", PUBLISHED)
def test_published_model_matches_robustbench(workdir, dataset, name):
    spec = published_model(dataset, name)
    x = torch.rand(2, 3, 32, 32)

    theirs = build_robustbench_composite(dataset, name)
    hooks = calibrating_hooks(theirs, spec.constants.std_scale, spec.constants.rob_scale)
    with torch.no_grad():
        reference, reference_gamma = theirs(x)
    for hook in hooks:
        hook.remove()
    spread = reference.max(1).values - reference.min(1).values
    assert (spread > 2.0).all(), f"calibration failed: near-uniform output {reference}"
    assert (reference_gamma[0] - reference_gamma[1]).abs() > 1.0

    write_authors_layout(theirs, workdir / "models", dataset, name)
    rb_paths = write_robustbench_files(theirs, workdir / "robustbench")

    # (c) the authors' files through load_published_model, and (b) the same outputs.
    model = load_published_model(workdir / "models", dataset, name)
    composite = model.composite
    assert not model.training and composite.scale_alpha
    with torch.no_grad():
        out = composite(x)
    torch.testing.assert_close(out.log_probs, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.gamma, reference_gamma.float(), rtol=0, atol=1e-4)
    low = spec.constants.alpha_bias
    high = low + spec.constants.alpha_scale
    assert ((out.alpha > low) & (out.alpha < high)).all()
    assert (out.alpha[0] - out.alpha[1]).abs() > 0.1 * spec.constants.alpha_scale

    # (a) robustbench's state dict loads strictly into ours and gives the same tensors and the
    # table's constants; ours loads strictly into robustbench's.
    their_state = theirs.state_dict()
    converted, constants = from_robustbench_state_dict(their_state)
    assert constants == spec.constants
    assert_states_equal(composite.state_dict(), converted)
    load_robustbench_state_dict(composite, their_state)
    with torch.no_grad():
        for tensor in their_state.values():
            tensor.zero_()
    theirs.load_state_dict(to_robustbench_state_dict(composite), strict=True)
    expected, their_constants = from_robustbench_state_dict(theirs.state_dict())
    assert_states_equal(expected, composite.state_dict())
    assert their_constants == spec.constants

    del model, composite, their_state, converted
    gc.collect()

    # (c) RobustBench's three files give back exactly the state whose outputs matched
    # robustbench's above (a forward pass would cost more than it adds).
    from_files = load_robustbench_files(rb_paths, dataset, name)
    assert not from_files.training and from_files.composite.scale_alpha
    assert CompositeConstants.from_composite(from_files.composite) == spec.constants
    assert_states_equal(from_files.composite.state_dict(), expected)
    del theirs, expected, from_files
    gc.collect()
