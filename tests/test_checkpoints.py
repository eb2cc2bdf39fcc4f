"""Checkpoint formats, their round trips, and clear errors for every kind of bad file.

Small models only (tiny BiT, ResNet-18 width 8, WRN-10-1), so the whole file runs in seconds.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_smoothing import checkpoints as ckpt
from adaptive_smoothing.checkpoints import (CheckpointError, CheckpointNotFoundError,
                                            CompositeConstants)
from adaptive_smoothing.models import CompositeModel, MixingNet, create_model
from adaptive_smoothing.models.bit import ResNetV2
from adaptive_smoothing.published import load_published_model, published_paths
from robustbench_state import (from_robustbench_state_dict, load_robustbench_state_dict,
                               to_robustbench_state_dict)



# -- helpers -------------------------------------------------------------------------------------
def tiny_bit(num_classes: int = 10) -> ResNetV2:
    return ResNetV2((1, 1, 1, 1), 1, num_classes=num_classes)


def small_composite(num_classes: int = 10, **constants) -> CompositeModel:
    std = create_model("resnet18", num_classes, width=8)
    rob = create_model("dm_wrn", num_classes, depth=10, width=1, activation="silu")
    kwargs = dict(std_scale=1.5, rob_scale=0.5, eval_gamma=(2.0, 0.3), alpha_scale=0.6,
                  alpha_bias=0.2)
    kwargs.update(constants)
    return CompositeModel(std, rob, MixingNet((8, 16), version=4), **kwargs)


def randomize_buffers(module: torch.nn.Module) -> None:
    """Give BN running statistics non-default values, so round trips check them too."""
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)


def assert_same_state(a: torch.nn.Module, b_state: dict) -> None:
    a_state = a.state_dict()
    assert set(a_state) == set(b_state)
    for key, value in a_state.items():
        assert torch.equal(value, b_state[key]), key


def differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return any(not torch.equal(v, sb[k]) for k, v in a.state_dict().items()
               if v.is_floating_point())


def with_prefix(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


def load_as_std(model: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` as the STD file of a composite, through the path that
    factory.load_composite_weights takes (checkpoints.load_authors_checkpoints); the ROB file
    beside it is valid."""
    rob = create_model("resnet18", model.num_classes, width=2)
    rob_path = path.parent / "valid_rob.pt"
    torch.save(rob.state_dict(), rob_path)
    ckpt.load_authors_checkpoints(CompositeModel(model, rob, None), path, rob_path, None)


def load_as_rob(model: torch.nn.Module, path: Path) -> None:
    """The same for a ROB file, the STD file beside it valid."""
    std = create_model("resnet18", model.num_classes, width=2)
    std_path = path.parent / "valid_std.pt"
    torch.save({"model": std.state_dict()}, std_path)
    ckpt.load_authors_checkpoints(CompositeModel(std, model, None), std_path, path, None)


def bit_to_npz(model: ResNetV2, path: Path) -> None:
    """Write ``model`` in BiT's TensorFlow layout (HWIO kernels), as BiT's .npz release does."""
    state = model.state_dict()
    arrays = {}
    for ours, theirs in model.tf_names().items():
        value = state[ours].numpy()
        arrays[theirs] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    np.savez(path, **arrays)


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["authors", "plain", "state_dict"])
def test_std_torch_formats_round_trip(tmp_path, layout):
    src, dst = tiny_bit(), tiny_bit()
    randomize_buffers(src)
    state = src.state_dict()
    obj = {"authors": {"model": with_prefix(state, "module."), "optim": {"lr": 0.1}, "step": 3},
           "plain": state,
           "state_dict": {"state_dict": state}}[layout]
    path = tmp_path / "cifar10_bit_rn152.tar"
    torch.save(obj, path)
    assert differs(src, dst)
    load_as_std(dst, path)
    assert_same_state(dst, state)


def test_std_bit_npz_round_trip(tmp_path):
    src, dst = tiny_bit(), tiny_bit()
    path = tmp_path / "BiT-M-R50x1.npz"
    bit_to_npz(src, path)
    assert differs(src, dst)
    load_as_std(dst, path)
    assert_same_state(dst, src.state_dict())
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_npz_missing_array_names_file_and_tf_name(tmp_path):
    model = tiny_bit()
    path = tmp_path / "partial.npz"
    bit_to_npz(model, path)
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "resnet/head/conv2d/bias"}
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="partial.npz") as err:
        load_as_std(model, path)
    assert "resnet/head/conv2d/bias" in str(err.value)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="evil.npz.*allow_pickle=False"):
        ckpt.read_bit_npz(path, tiny_bit())


@pytest.mark.parametrize("layout", ["edm", "trades"])
def test_rob_formats_round_trip(tmp_path, layout):
    src = create_model("dm_wrn", 10, depth=10, width=1, activation="silu")
    dst = create_model("dm_wrn", 10, depth=10, width=1, activation="silu")
    randomize_buffers(src)
    state = src.state_dict()
    obj = ({"model_state_dict": with_prefix(state, "module.0."), "epoch": 400}
           if layout == "edm" else state)
    path = tmp_path / f"cifar100_linf_{layout}_wrn70-16.pt"
    torch.save(obj, path)
    assert differs(src, dst)
    load_as_rob(dst, path)
    assert_same_state(dst, state)


@pytest.mark.parametrize("prefixed", [False, True])
def test_mixer_round_trip_ignores_training_state(tmp_path, prefixed):
    src, dst = small_composite(), small_composite()
    randomize_buffers(src.mixer)
    randomize_buffers(src.gamma_bn)
    optimizer = torch.optim.AdamW(src.mixer.parameters(), lr=1e-4)
    obj = ckpt.mixer_checkpoint(src, optimizer=optimizer.state_dict(), epoch=2, batch=17)
    if prefixed:  # a mixer trained under DataParallel
        obj["model"] = with_prefix(obj["model"], "module.")
    path = tmp_path / "cifar10_edm_best.pt"
    ckpt.save_checkpoint(obj, path)
    assert differs(src.mixer, dst.mixer) and differs(src.gamma_bn, dst.gamma_bn)
    ckpt.load_mixer_checkpoint(dst, path)
    assert_same_state(dst.mixer, src.mixer.state_dict())
    assert_same_state(dst.gamma_bn, src.gamma_bn.state_dict())


def write_authors_files(composite: CompositeModel, root: Path) -> tuple[Path, Path, Path]:
    paths = (root / "std.tar", root / "rob.pt", root / "mixer.pt")
    torch.save({"model": with_prefix(composite.std_model.state_dict(), "module.")}, paths[0])
    torch.save({"model_state_dict": with_prefix(composite.rob_model.state_dict(), "module.0.")},
               paths[1])
    torch.save({"model": composite.mixer.state_dict(), "bn": composite.gamma_bn.state_dict(),
                "optimizer": {}, "epoch": 3}, paths[2])
    return paths


def write_robustbench_files(composite: CompositeModel, root: Path) -> tuple[Path, Path, Path]:
    paths = tuple(root / f"Bai2023Improving_edm_m{i}.pt" for i in range(3))
    torch.save(composite.std_model.state_dict(), paths[0])
    torch.save(composite.rob_model.state_dict(), paths[1])
    torch.save({"model": composite.mixer.state_dict(), "bn": composite.gamma_bn.state_dict()},
               paths[2])
    return paths


@pytest.mark.parametrize("layout", ["authors", "robustbench"])
def test_composite_files_round_trip(tmp_path, layout):
    src, dst = small_composite(), small_composite()
    for module in (src.std_model, src.rob_model, src.mixer, src.gamma_bn):
        randomize_buffers(module)
    if layout == "authors":
        ckpt.load_authors_checkpoints(dst, *write_authors_files(src, tmp_path))
    else:
        ckpt.load_robustbench_checkpoints(dst, write_robustbench_files(src, tmp_path))
    assert_same_state(dst, src.state_dict())
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(dst(x).log_probs, src(x).log_probs, rtol=0, atol=0)


def test_robustbench_state_dict_conversion_round_trip():
    src = small_composite(std_scale=1.2, rob_scale=0.3, eval_gamma=(2.0, 1.05),
                          alpha_scale=0.04, alpha_bias=0.96)
    randomize_buffers(src)
    theirs = to_robustbench_state_dict(src)
    assert {k.split(".")[0] for k in theirs} == {
        "models", "policy_net", "bn", "gamma_scale", "gamma_bias", "alpha_scale", "alpha_bias",
        "std_scale", "rob_scale"}
    assert torch.equal(theirs["models.0.linear.weight"], src.std_model.linear.weight)
    assert torch.equal(theirs["models.1.logits.weight"], src.rob_model.logits.weight)
    assert torch.equal(theirs["policy_net.linear.weight"], src.mixer.linear.weight)
    assert torch.equal(theirs["bn.running_var"], src.gamma_bn.running_var)
    # robustbench stores float32 Parameters; the intended decimals come back exactly.
    assert theirs["alpha_bias"].dtype == torch.float32 and theirs["alpha_bias"].ndim == 0
    ours, constants = from_robustbench_state_dict(theirs)
    assert constants == CompositeConstants(std_scale=1.2, rob_scale=0.3, eval_gamma=(2.0, 1.05),
                                           alpha_scale=0.04, alpha_bias=0.96)
    assert_same_state(src, ours)

    # robustbench's CompositeModelWrapper(parallel=False) holds every tensor twice.
    wrapped = {**with_prefix(theirs, "comp_model."), **with_prefix(theirs, "_comp_model.")}
    dst = small_composite()  # other constants
    load_robustbench_state_dict(dst, wrapped)
    assert CompositeConstants.from_composite(dst) == constants
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(dst(x).log_probs, src(x).log_probs, rtol=0, atol=0)


def test_robustbench_state_dict_with_unknown_keys_is_refused():
    theirs = to_robustbench_state_dict(small_composite())
    theirs["models.2.weight"] = torch.zeros(1)
    del theirs["rob_scale"]
    with pytest.raises(CheckpointError, match=r"models\.2\.weight.*rob_scale"):
        from_robustbench_state_dict(theirs)


# -- bad files -------------------------------------------------------------------------------------
def _resnet(num_classes: int = 10, width: int = 8):
    return create_model("resnet18", num_classes, width=width)


@pytest.mark.parametrize("case, patterns", [
    ("missing_key", ["1 missing keys", "'linear.weight'"]),
    ("unexpected_key", ["1 unexpected keys", "'extra.weight'"]),
    ("wrong_shape", ["wrong shapes",
                     r"conv1.weight: file \(16, 3, 3, 3\) vs model \(8, 3, 3, 3\)"]),
    ("wrong_classes", [r"linear.weight: file \(100, 64\) vs model \(10, 64\)",
                       "file has 100 classes, the model 10"]),
])
def test_mismatched_state_dict_is_refused_and_nothing_loads(tmp_path, case, patterns):
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if case == "missing_key":
        del state["linear.weight"]
    elif case == "unexpected_key":
        state["extra.weight"] = torch.zeros(3)
    elif case == "wrong_shape":
        state = _resnet(width=16).state_dict()
    else:
        state = _resnet(num_classes=100).state_dict()
    path = tmp_path / f"{case}.pt"
    torch.save({"model": with_prefix(state, "module.")}, path)
    with pytest.raises(CheckpointError) as err:
        load_as_std(model, path)
    message = str(err.value)
    assert f"{case}.pt" in message and "expected STD checkpoint" in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert_same_state(model, before)  # validated before anything was copied


def _write_bad(path: Path, kind: str) -> None:
    if kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("model weights are at https://example.org\n")
    elif kind == "html":
        path.write_text("<!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning"
                        "</title></head><body>Download anyway</body></html>\n")
    elif kind == "truncated":
        torch.save({"model": _resnet().state_dict()}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "needs_code":
        import argparse
        torch.save({"model": _resnet().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_a_dict":
        torch.save(torch.zeros(3), path)
    elif kind == "no_state_dict":
        torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)


@pytest.mark.parametrize("kind, reason", [
    ("random_bytes", "not a torch checkpoint"),
    ("text", "not a torch checkpoint"),
    ("html", "HTML page"),
    ("truncated", "truncated"),
    ("needs_code", "GLOBAL argparse.Namespace"),
    ("empty", "empty"),
    ("not_a_dict", "holds a Tensor, not a dict"),
    ("no_state_dict", "not all tensors"),
])
def test_unusable_files_raise_checkpoint_error(tmp_path, kind, reason):
    path = tmp_path / f"{kind}.pt"
    _write_bad(path, kind)
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_as_rob(model, path)
    message = str(err.value)
    assert str(path) in message and reason in message, message
    assert "expected ROB checkpoint" in message
    assert_same_state(model, before)


def test_missing_file_is_a_checkpoint_error_and_file_not_found(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointNotFoundError, match="nowhere.pt") as err:
        ckpt.read_checkpoint(path)
    assert isinstance(err.value, CheckpointError) and isinstance(err.value, FileNotFoundError)


def test_mixer_file_without_bn_names_the_key(tmp_path):
    composite = small_composite()
    path = tmp_path / "mixer.pt"
    torch.save({"model": composite.mixer.state_dict(), "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match=r"mixer.pt: expected mixer checkpoint.*'bn'"):
        ckpt.load_mixer_checkpoint(composite, path)


def test_bad_last_file_leaves_the_whole_composite_unchanged(tmp_path):
    src, dst = small_composite(), small_composite()
    std_path, rob_path, mixer_path = write_authors_files(src, tmp_path)
    # A mixer for other base models: in_planes (16, 16) gives other shapes.
    other = MixingNet((16, 16), version=4)
    torch.save({"model": other.state_dict(), "bn": src.gamma_bn.state_dict()}, mixer_path)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"mixer.pt entry 'model'.*wrong shapes"):
        ckpt.load_authors_checkpoints(dst, std_path, rob_path, mixer_path)
    assert_same_state(dst, before)


# -- atomic save -----------------------------------------------------------------------------------
def test_save_checkpoint_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "mixer.pt"
    ckpt.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    ckpt.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert ckpt.read_checkpoint(path)["epoch"] == 2

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")  # then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint({"epoch": 3, "w": torch.full((3,), 5.0)}, path)
    monkeypatch.undo()
    loaded = ckpt.read_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixer.pt"]  # no temporary file left


# -- the published layout ------------------------------------------------------------------------
def test_published_missing_files_lists_every_expected_path(tmp_path):
    (tmp_path / "Base").mkdir()
    rob = tmp_path / "Base" / "cifar100_linf_trades_wrn70-16.pt"
    rob.write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError) as err:
        load_published_model(tmp_path, "cifar100", "trades")
    message = str(err.value)
    for name in ("Base/cifar100_bit_rn152.tar", "Base/cifar100_bit_rn152.pt",
                 "Base/cifar100_std_rn152.pt", "Base/cifar100_linf_trades_wrn70-16.pt",
                 "CompModel/cifar100_trades_best.pt"):
        assert str(tmp_path / name) in message, name
    assert f"found {rob}" in message and message.count("MISSING") == 2


def test_published_accepts_every_std_file_name(tmp_path):
    for sub in ("Base", "CompModel"):
        (tmp_path / sub).mkdir()
    (tmp_path / "Base" / "cifar10_linf_edm_wrn70-16.pt").touch()
    (tmp_path / "CompModel" / "cifar10_edm_best.pt").touch()
    for name in ("cifar10_std_rn152.pt", "cifar10_bit_rn152.pt", "cifar10_bit_rn152.tar"):
        (tmp_path / "Base" / name).touch()
        assert published_paths(tmp_path, "cifar10", "edm")[0] == tmp_path / "Base" / name


@pytest.mark.parametrize("dataset, name", [("cifar10", "trades"), ("imagenet", "edm")])
def test_unpublished_model_is_a_value_error(tmp_path, dataset, name):
    with pytest.raises(ValueError, match=f"no published model {dataset}/{name}.*cifar100/trades"):
        load_published_model(tmp_path, dataset, name)
