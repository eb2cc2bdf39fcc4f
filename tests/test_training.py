"""The mixer's training loop (docs/METHOD.md, "Training"): resumption, NaN policy, outputs and
behaviour.

Tiny models (ResNet-18 of width 2, or hand-built synthetic classifiers) and tiny datasets keep
every run to seconds on a shared 2-core CPU; torch runs single-threaded here because two threads
contending with other processes were 5-10x slower.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from adaptive_smoothing.attacks import generate_training_attacks
from adaptive_smoothing.checkpoints import load_mixer_checkpoint
from adaptive_smoothing.config import Config, ConfigError, load_config
from adaptive_smoothing.factory import build_composite, load_composite_weights
from adaptive_smoothing.prepare import prepare, resolve_checkpoints
from adaptive_smoothing.losses import CompLoss
from adaptive_smoothing.models import BaseClassifier, BaseOutput, CompositeModel, create_model
from adaptive_smoothing.models import registry
from adaptive_smoothing.data import IterationData, augment_batch
from adaptive_smoothing.plots import read_validation_curves
from adaptive_smoothing.training import (Trainer, TrainingDivergedError, build_trainer,
                                         run_training)
from synthetic import make_tiny_training_root


# -- a tiny run on random images -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base checkpoints (ResNet-18 width 2, two seeds) and 8 train / 4 test random images."""
    return make_tiny_training_root(tmp_path_factory.mktemp("tiny"))


def _tiny_config(root: Path, out: str, **training_settings: Any) -> Config:
    """2 iterations per epoch (8 images, batch 4), n_target 1: buffers of 16 images, 4
    mini-batches; accum_grad 2 -> 2 optimizer steps per iteration."""
    ts = {"epochs": 2, "batch_size": 4, "lr": "3e-3", "accum_grad": 2, "n_val_examples": 4,
          "batch_size_test_per_gpu": 4, "eval_freq": {"epoch": 1, "iter": 1},
          **training_settings}
    lines = ["seed: 5", f"log_dir: '{root}'", f"log_path: '{out}'",
             "model_load_path: {std: 'Base/std.pt', rob: 'Base/rob.pt', comp: 'None'}",
             "forward_settings: {std_model_type: resnet18, std_model_kwargs: {width: 2}, "
             "rob_model_type: resnet18, rob_model_kwargs: {width: 2}, pn_version: 3, "
             "alpha_scale: 0.75, alpha_bias: 0.2}",
             f"dataset_settings: {{name: CIFAR-10, format: npz, path: '{root / 'data'}'}}",
             f"training_settings: {_flow(ts)}",
             "pgd_settings: {n_target_classes: 1, iters_test: 2}",
             "randomized_attack_settings: {iters_df: 1, iters_const: 0}",
             "evaluation_settings: {device: cpu}"]
    path = root / f"{out}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


def _flow(mapping: dict) -> str:
    items = [f"{k}: {_flow(v) if isinstance(v, dict) else v}" for k, v in mapping.items()]
    return "{" + ", ".join(items) + "}"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=atol, rtol=0), key


@pytest.fixture(scope="module")
def reference_run(tiny_root: Path) -> dict[str, Any]:
    """An uninterrupted 4-iteration (2 epochs) run, shared by several tests."""
    config = _tiny_config(tiny_root, "reference")
    torch.manual_seed(config.seed)  # the trainer's initial mixer too
    initial = build_composite(config.forward_settings, config.dataset_settings.num_classes)
    load_composite_weights(initial, resolve_checkpoints(config))
    trainer = build_trainer(prepare(config))
    path = trainer.fit()
    return {"config": config, "trainer": trainer, "path": path,
            "initial": {k: v.clone() for k, v in initial.state_dict().items()}}


# -- acceptance: exact resumption ------------------------------------------------------------------
class _Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(
        tiny_root: Path, reference_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _tiny_config(tiny_root, "resumed")
    original = Trainer._train_iteration

    def crash_after_three(self: Trainer, *args: Any) -> Any:
        if self.iteration == 3:  # killed in the middle of the second epoch
            raise _Interrupted()
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_iteration", crash_after_three)
    with pytest.raises(_Interrupted):
        run_training(config)
    monkeypatch.setattr(Trainer, "_train_iteration", original)
    interrupted = _load(tiny_root / "resumed" / "checkpoints" / "last.pt")
    assert (interrupted["iteration"], interrupted["epoch"], interrupted["batch"]) == (3, 1, 1)

    path = run_training(config, resume=True)
    resumed, reference = _load(path), _load(reference_run["path"])
    assert resumed["global_step"] == reference["global_step"] == 8
    _assert_states_close(resumed["model"], reference["model"])
    _assert_states_close(resumed["bn"], reference["bn"])
    assert resumed["scheduler"]["last_epoch"] == reference["scheduler"]["last_epoch"]
    # The validation logged at the checkpoint's own step precedes the checkpoint: the resumed
    # run's TensorBoard keeps it, so its curves have every validation of the uninterrupted run.
    assert _validation_steps(tiny_root / "resumed") == _validation_steps(
        Path(reference_run["config"].run.output_dir)) == [2, 4, 6, 8]


def _validation_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in read_validation_curves(run_dir / "tensorboard")["val/robust_acc"]]


def test_resume_of_a_finished_run_does_nothing(reference_run: dict) -> None:
    before = reference_run["path"].stat().st_mtime_ns
    assert run_training(reference_run["config"], resume=True) == reference_run["path"]
    assert reference_run["path"].stat().st_mtime_ns == before


# -- acceptance: non-finite losses -----------------------------------------------------------------
def _nan_loss_on(calls: set[int] | None, start: Optional[int] = None) -> Any:
    """A CompLoss.forward returning NaN on the given (0-based) calls, or on every call from
    ``start`` on."""
    original = CompLoss.forward
    counter = {"n": 0}

    def forward(self: CompLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = original(self, *args, **kwargs)
        n = counter["n"]
        counter["n"] += 1
        if (calls is not None and n in calls) or (start is not None and n >= start):
            return loss * math.nan
        return loss
    return forward


def test_a_nan_loss_skips_the_step_with_a_warning(
        tiny_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = _tiny_config(tiny_root, "one_nan", epochs=1, max_nonfinite_steps=2)
    monkeypatch.setattr(CompLoss, "forward", _nan_loss_on({1}))  # 2nd mini-batch of step 0
    caplog.set_level(logging.WARNING, logger="adaptive_smoothing.training")
    trainer = build_trainer(prepare(config))
    trainer.fit()
    warnings = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    state = _load(trainer.checkpoint_path)
    assert state["iteration"] == 2 and state["global_step"] == 4
    assert state["scheduler"]["last_epoch"] == 3  # the skipped step did not move the schedule
    assert state["nonfinite_streak"] == 0
    assert all(torch.isfinite(v).all() for v in [*state["model"].values(), *state["bn"].values()])


def test_repeated_nan_losses_stop_the_run_and_keep_the_last_good_checkpoint(
        tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every loss from the 3rd iteration on is NaN (4 mini-batches per iteration).
    config = _tiny_config(tiny_root, "nans", max_nonfinite_steps=3,
                          eval_freq={"epoch": 1, "iter": 2})
    monkeypatch.setattr(CompLoss, "forward", _nan_loss_on(None, start=8))
    trainer = build_trainer(prepare(config))
    with pytest.raises(TrainingDivergedError, match="3 consecutive optimizer steps.*last good "
                       "checkpoint"):
        trainer.fit()
    state = _load(trainer.checkpoint_path)
    assert state["iteration"] == 2 and state["global_step"] == 4
    # Skipped steps change nothing (the BN statistics are restored), so the model in memory is
    # still the one of the checkpoint, i.e. the state before the NaNs.
    _assert_states_close(state["model"], trainer.mixer.state_dict(), atol=0)
    _assert_states_close(state["bn"], trainer.composite.gamma_bn.state_dict(), atol=0)
    fresh = build_composite(config.forward_settings, config.dataset_settings.num_classes)
    load_mixer_checkpoint(fresh, trainer.checkpoint_path)


# -- outputs ---------------------------------------------------------------------------------------
def test_only_the_mixer_and_gamma_bn_change(reference_run: dict, tiny_root: Path) -> None:
    trained = reference_run["trainer"].composite.state_dict()
    initial = reference_run["initial"]
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert changed and all(k.startswith(("mixer.", "gamma_bn.")) for k in changed)
    assert any(k.startswith("gamma_bn.running") for k in changed)
    assert any(k.startswith("mixer.") and k.endswith("weight") for k in changed)
    for name in ("std", "rob"):  # and the base models equal their checkpoints
        saved = _load(tiny_root / "Base" / f"{name}.pt")["model"]
        model = getattr(reference_run["trainer"].composite, f"{name}_model")
        _assert_states_close(saved, model.state_dict(), atol=0)


def test_checkpoint_is_weights_only_and_a_mixer_checkpoint(reference_run: dict) -> None:
    state = _load(reference_run["path"])  # weights_only=True
    for key in ("model", "bn", "optimizer", "scheduler", "warmup", "scaler", "rng", "epoch",
                "batch", "iteration", "global_step", "config"):
        assert key in state, key
    assert state["config"]["training_settings"]["batch_size"] == 4
    fresh = build_composite(reference_run["config"].forward_settings,
                            reference_run["config"].dataset_settings.num_classes)
    load_mixer_checkpoint(fresh, reference_run["path"])
    _assert_states_close(fresh.mixer.state_dict(), reference_run["trainer"].mixer.state_dict(), 0)
    epoch_file = reference_run["path"].parent / "epoch_002.pt"
    load_mixer_checkpoint(build_composite(reference_run["config"].forward_settings,
                                          reference_run["config"].dataset_settings.num_classes),
                          epoch_file)


def test_the_latest_mixer_alone_is_saved_beside_last_pt(reference_run: dict) -> None:
    path = reference_run["path"].parent / "mixer.pt"
    saved = _load(path)
    assert "optimizer" not in saved and saved["global_step"] == 8
    fresh = build_composite(reference_run["config"].forward_settings,
                            reference_run["config"].dataset_settings.num_classes)
    load_mixer_checkpoint(fresh, path)
    _assert_states_close(fresh.mixer.state_dict(), reference_run["trainer"].mixer.state_dict(), 0)
    _assert_states_close(fresh.gamma_bn.state_dict(),
                         reference_run["trainer"].composite.gamma_bn.state_dict(), 0)


def test_tensorboard_scalars_are_written(reference_run: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = Path(reference_run["config"].run.output_dir) / "tensorboard"
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/gamma_mean_label1", "train/gamma_mean_label0",
                "train/p_gamma_pos_label1", "train/p_gamma_nonpos_label0", "train/lr",
                "train/grad_scale", "val/clean_acc", "val/robust_acc", "val/gamma_clean",
                "val/gamma_adv", "val/auc_fixed", "val/auc_adaptive", "val/det_alpha_clean",
                "val/det_alpha_fixed", "val/det_alpha_adaptive"}
    assert expected <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert len(events.Scalars("val/robust_acc")) == 4  # eval_freq.iter = 1


def test_final_results_hold_the_detection_aucs_of_the_saved_mixer(reference_run: dict) -> None:
    import json
    from adaptive_smoothing.detection import roc_auc
    trainer = reference_run["trainer"]
    out = Path(reference_run["config"].run.output_dir)
    results = json.loads((out / "training_results.json").read_text())
    saved = _load(reference_run["path"])
    assert results["iteration"] == saved["iteration"] == 4
    assert results["validation"] == pytest.approx(saved["validation"])
    # The fixed-attack AUC is that of the deployed composite's gamma on the cached images.
    composite = build_composite(reference_run["config"].forward_settings,
                                reference_run["config"].dataset_settings.num_classes)
    load_composite_weights(composite, resolve_checkpoints(reference_run["config"]))
    load_mixer_checkpoint(composite, reference_run["path"])
    with torch.no_grad():
        clean = composite.eval()(trainer.x_val[:trainer.monitor.n_detection]).gamma
        attacked = composite(trainer.monitor.x_det_fixed).gamma
    assert results["validation"]["auc_fixed"] == pytest.approx(roc_auc(clean, attacked),
                                                               abs=1e-6)


def test_saved_gamma_bn_is_reestimated_on_the_last_buffer(reference_run: dict) -> None:
    trainer = reference_run["trainer"]
    saved = _load(reference_run["path"])
    composite = build_composite(reference_run["config"].forward_settings,
                                reference_run["config"].dataset_settings.num_classes)
    load_composite_weights(composite, resolve_checkpoints(reference_run["config"]))
    load_mixer_checkpoint(composite, reference_run["path"])
    composite.gamma_bn.running_mean.fill_(123.0)
    xs, minibatches = trainer.last_buffer
    composite.reestimate_gamma_bn(xs[idx] for idx in minibatches)
    assert saved["bn"]["running_mean"].item() == pytest.approx(
        composite.gamma_bn.running_mean.item(), abs=1e-6)
    assert saved["bn"]["running_var"].item() == pytest.approx(
        composite.gamma_bn.running_var.item(), rel=1e-5)


def test_missing_pre_attacked_file_is_an_error_naming_key_and_file(tiny_root: Path) -> None:
    config = _tiny_config(tiny_root, "pa_missing")
    from adaptive_smoothing.config import ConfigError, apply_overrides
    config = apply_overrides(config, **{"dataset_settings.pa_path": str(tiny_root / "pa.pt"),
                                        "dataset_settings.gamma_0": 7.1})
    with pytest.raises(ConfigError, match=r"dataset_settings\.pa_path.*pa\.pt.*not found"):
        build_trainer(prepare(config))


def test_pre_attacked_data_joins_every_buffer_with_its_labels_and_scale(
        tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_smoothing.config import apply_overrides
    from adaptive_smoothing.data import build_dataset, load_tensors
    from adaptive_smoothing.pre_attack import generate_blocks, save_blocks
    config = _tiny_config(tiny_root, "pa", epochs=1, accum_grad=-1,
                          comp_loss_params={"scale": {"clean": 2.0, "ada": 1.0, "pa": 3.0}})
    composite = build_composite(config.forward_settings, config.dataset_settings.num_classes)
    load_composite_weights(composite, resolve_checkpoints(config))
    x, y = load_tensors(build_dataset("cifar10", "train", "npz", str(tiny_root / "data")))
    gammas = (-math.inf, 0.0, 5.0, 8.0, math.inf)  # gamma_0 7.1: labels 1, 1, 1, 0, 0
    save_blocks(generate_blocks(composite, x, y, torch.arange(len(y)), gammas=gammas,
                                eps=8 / 255, iterations=1), tiny_root / "pa_blocks.pt")
    config = apply_overrides(config, **{"dataset_settings.pa_path": str(tiny_root / "pa_blocks.pt"),
                                        "dataset_settings.gamma_0": 7.1,
                                        "dataset_settings.blocks": 5})
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = CompLoss.forward

    def record(self: CompLoss, log_probs: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor,
               label: torch.Tensor, scale: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        seen.append((label.clone(), scale.clone()))
        return original(self, log_probs, gamma, y, label, scale, **kwargs)

    monkeypatch.setattr(CompLoss, "forward", record)
    trainer = build_trainer(prepare(config))
    assert trainer.batch == 4 * 5 // 5 and trainer.pa_slice == 2 * 4
    # The slice of an iteration is a function of the position (resume reads the same one).
    trainer.iteration = 1
    xa, ya, la = trainer._pre_attacked_slice()
    other = build_trainer(prepare(config))
    other.iteration = 1
    xb, yb, lb = other._pre_attacked_slice()
    assert torch.equal(xa, xb) and torch.equal(la, lb) and xa.shape == (8, 3, 32, 32)
    trainer.iteration = 0
    trainer.fit()
    labels, scales = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
    per_iteration = 4 + 4 + 2 * 4 + 8
    assert len(labels) == trainer.iteration * per_iteration
    # Clean (label 0, scale 2), online attacks (label 1, scale 1), pre-attacked (scale 3).
    pa = scales == 3.0
    assert int(pa.sum()) == trainer.iteration * 8
    assert int(((scales == 2.0) & (labels == 0)).sum()) == trainer.iteration * 8
    assert int(((scales == 1.0) & (labels == 1)).sum()) == trainer.iteration * 8
    # Pre-attacked labels come from the blocks' gammas: flat index // 8 images is the block.
    expected = (torch.tensor(gammas) < 7.1).float().repeat_interleave(len(y))
    assert torch.equal(trainer.pre_attacked["label"], expected)


def test_validation_starts_at_val_start_and_refuses_an_index_past_the_test_set(
        tiny_root: Path) -> None:
    from adaptive_smoothing.data import build_dataset, load_tensors

    x_test, y_test = load_tensors(build_dataset("cifar10", "test", "npz", tiny_root / "data",
                                                augment=False))
    trainer = build_trainer(prepare(_tiny_config(tiny_root, "val_start", val_start=1, n_val_examples=2)))
    assert torch.equal(trainer.x_val, x_test[1:3]) and torch.equal(trainer.y_val, y_test[1:3])
    with pytest.raises(ConfigError, match=r"training_settings.val_start = 4: expected less "
                                          r"than the 4 test images"):
        build_trainer(prepare(_tiny_config(tiny_root, "val_start_bad", val_start=4)))


def test_a_trainer_under_torchrun_outside_the_process_group_is_refused(
        tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adaptive_smoothing.prepare as prepare_module

    # A caller that builds the Trainer without joining the group torchrun set up.
    monkeypatch.setattr(prepare_module, "init_distributed",
                        lambda device: (0, 1, torch.device("cpu")))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE > 1\) outside a process group"):
        build_trainer(prepare(_tiny_config(tiny_root, "no_group", epochs=1)))


def test_debug_mode_runs_two_iterations(tiny_root: Path) -> None:
    config = _tiny_config(tiny_root, "debug", epochs=5, eval_freq={"epoch": 1, "iter": 100})
    path = run_training(config, debug=True)
    assert path == tiny_root / "debug" / "debug" / "checkpoints" / "last.pt"
    state = _load(path)
    assert state["iteration"] == 2 and state["global_step"] == 4
    assert state["validation"]["n"] == 4


@pytest.mark.parametrize("accum_grad, steps_per_iteration", [(-1, 1), (3, 2)])
def test_optimizer_steps_per_buffer(tiny_root: Path, accum_grad: int,
                                    steps_per_iteration: int) -> None:
    config = _tiny_config(tiny_root, f"accum{accum_grad}", epochs=1, accum_grad=accum_grad,
                          eval_freq={"epoch": 1, "iter": 100})
    trainer = build_trainer(prepare(config))
    calls = {"n": 0}
    trainer.optimizer.register_step_post_hook(lambda *_: calls.update(n=calls["n"] + 1))
    trainer.fit()
    assert calls["n"] == 2 * steps_per_iteration == trainer.global_step


def test_max_steps_caps_the_run(tiny_root: Path) -> None:
    config = _tiny_config(tiny_root, "capped", max_steps=3, eval_freq={"epoch": 1, "iter": 100})
    trainer = build_trainer(prepare(config))
    trainer.fit()
    state = _load(trainer.checkpoint_path)
    assert state["global_step"] == 3 and state["iteration"] == 2
    assert state["scheduler"]["T_max"] == 3


def test_augmentation_is_reproducible_and_shape_preserving() -> None:
    x = torch.rand(6, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    identity_like = [torch.equal(a[i], x[i]) or torch.equal(a[i], x[i].flip(-1))
                     for i in range(6)]
    assert not all(identity_like)


def test_each_epoch_sees_every_image_once() -> None:
    class Indexed(Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.full((3, 32, 32), float(i)), i

    data = IterationData(Indexed(), batch=2, extra=4, seed=0, shuffle=True, rank=0, world=1)
    seen = [int(y) for _, ys, _, _ in data.epoch(0, 0) for y in ys]
    assert sorted(seen) == list(range(10))
    resumed = [int(y) for _, ys, _, _ in data.epoch(0, 3) for y in ys]
    assert resumed == seen[6:]
    extras = [int(y) for _, _, _, ye in data.epoch(0, 0) for y in ye]
    assert sorted(extras[:10]) == list(range(10))  # the extra stream cycles over the data too


# -- acceptance: behaviour -------------------------------------------------------------------------
# A synthetic task on which the two base models really differ:
# image = 0.5 + COARSE_AMP * coarse code of class c' (8x8-pixel blocks; c' = label with prob. 0.7,
#         else another class) + a smooth random background + FINE_AMP * fine code of the label
#         (2x2-pixel blocks of random signs times a checkerboard).
# STD reads the fine code (a linear matched filter): always right on clean images but flipped by
#     any perturbation larger than FINE_AMP (eps = 8/255 is six times larger).
# ROB reads the coarse code: right on 70% of the images, and no eps-perturbation changes that.
# Both expose a 2x2 checkerboard filter response in their features. Clean images have almost
# none (block-constant content has none), attacked images a lot (gradient-sign steps on STD
# follow the fine codes' checkerboard), so the mixer can learn to tell them apart.
FINE_AMP, COARSE_AMP, BACKGROUND_AMP, COARSE_RIGHT = 0.005, 0.15, 0.05, 0.7
LOGIT_MARGIN = 10.0


def _codes() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    blocks = torch.randint(0, 2, (10, 3, 16, 16), generator=g).float() * 2 - 1
    checker = (torch.arange(32)[:, None] + torch.arange(32)).remainder(2).float() * -2 + 1
    fine = blocks.repeat_interleave(2, 2).repeat_interleave(2, 3) * checker
    coarse = (torch.randint(0, 2, (10, 3, 4, 4), generator=g).float() * 2 - 1)
    coarse = coarse.repeat_interleave(8, 2).repeat_interleave(8, 3)
    return fine, coarse


class _Synthetic(BaseClassifier):
    feature_channels = (4, 8)

    def __init__(self, which: str, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        fine, coarse = _codes()
        code, amp = (fine, FINE_AMP) if which == "std" else (coarse, COARSE_AMP)
        self.register_buffer("code", code * LOGIT_MARGIN / (amp * code[0].numel()))
        kernel = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).expand(3, 1, 2, 2).clone()
        self.register_buffer("checker", kernel)

    def forward_features(self, x: torch.Tensor) -> BaseOutput:
        # Only the checkerboard response: it does not see the zero padding of the training
        # augmentation (straight edges), so augmented and plain images look alike to the mixer.
        h = F.conv2d(F.pad(x, (0, 1, 0, 1), mode="replicate"), self.checker, groups=3).abs()
        feat1 = torch.cat([h, h.sum(1, keepdim=True)], 1) * 20
        feat2 = torch.cat([F.avg_pool2d(feat1, 2), F.max_pool2d(feat1, 2)], 1)
        logits = torch.einsum("bchw,kchw->bk", x - 0.5, self.code)
        return BaseOutput(logits, (feat1, feat2))


class _SyntheticData(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        fine, coarse = _codes()
        self.y = torch.randint(0, 10, (n,), generator=g)
        shift = torch.randint(1, 10, (n,), generator=g)
        wrong = torch.rand(n, generator=g) > COARSE_RIGHT
        coarse_class = torch.where(wrong, (self.y + shift) % 10, self.y)
        background = (torch.rand(n, 3, 8, 8, generator=g) * 2 - 1) * BACKGROUND_AMP
        background = background.repeat_interleave(4, 2).repeat_interleave(4, 3)
        self.x = (0.5 + COARSE_AMP * coarse[coarse_class] + background
                  + FINE_AMP * fine[self.y]).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def _behaviour_config(root: Path) -> Config:
    text = f"""
seed: 0
log_dir: '{root}'
log_path: 'out'
model_load_path: {{std: 'std.pt', rob: 'rob.pt', comp: 'None'}}
forward_settings: {{std_model_type: synthetic_std, rob_model_type: synthetic_rob, pn_version: 3,
                   alpha_scale: 1.0, alpha_bias: 0.0}}
dataset_settings: {{name: CIFAR-10}}
training_settings:
  epochs: 3
  batch_size: 16
  lr: 2e-3
  accum_grad: 2
  gamma_consts: {{train: '(2., 0.)', eval: '(2., 0.)'}}
  n_val_examples: 32
  eval_freq: {{epoch: 1, iter: 1000}}
pgd_settings: {{n_target_classes: 2, iters_test: 5}}
randomized_attack_settings: {{iters_df: 4, iters_const: 2}}
evaluation_settings: {{device: cpu}}
"""
    (root / "config.yaml").write_text(text)
    return load_config(root / "config.yaml")


def _robust_accuracy(model: CompositeModel, x: torch.Tensor, y: torch.Tensor,
                     adversarial: list[torch.Tensor]) -> float:
    with torch.no_grad():
        robust = model(x).log_probs.argmax(1) == y
        for x_adv in adversarial:
            robust &= model(x_adv).log_probs.argmax(1) == y
    return robust.float().mean().item()


@pytest.mark.e2e
def test_trained_mixer_separates_clean_from_attacked_inputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for which in ("std", "rob"):
        monkeypatch.setitem(registry._MODEL_BUILDERS, f"synthetic_{which}",
                            lambda num_classes=10, which=which: _Synthetic(which, num_classes))
        torch.save({"model": _Synthetic(which).state_dict()}, tmp_path / f"{which}.pt")
    config = _behaviour_config(tmp_path)
    test_set = _SyntheticData(64, seed=2)
    trainer = build_trainer(prepare(config), train_set=_SyntheticData(512, seed=1),
                            val_set=(test_set.x, test_set.y))
    trainer.fit()

    # Held-out points, attacked as in training (fresh seed).
    composite = trainer.composite.eval()
    x, y = test_set.x, test_set.y
    settings = trainer.attack_settings
    adversarial = generate_training_attacks(composite, x, y, settings,
                                            torch.Generator().manual_seed(99))
    composite.eval()
    with torch.no_grad():
        clean_out = composite(x)
        adv_outs = [composite(x_adv) for x_adv in adversarial]
    gamma_adv = torch.cat([o.gamma for o in adv_outs])
    clean_right = (clean_out.gamma <= 0).float().mean().item()
    adv_right = (gamma_adv > 0).float().mean().item()
    mixer_accuracy = (clean_right + adv_right) / 2
    # The fixed-alpha model gets the trained model's mean alpha on these (clean) points, so both
    # behave alike on clean inputs; the mixer's worth is the robustness it adds on top.
    mean_alpha = clean_out.alpha.mean().item()

    fixed = CompositeModel(composite.std_model, composite.rob_model, None,
                           gamma=math.log(mean_alpha / (1 - mean_alpha))).eval()
    fixed_adversarial = generate_training_attacks(fixed, x, y, settings,
                                                  torch.Generator().manual_seed(99))
    trained_robust = _robust_accuracy(composite, x, y, adversarial)
    fixed_robust = _robust_accuracy(fixed, x, y, fixed_adversarial)
    trained_clean = _robust_accuracy(composite, x, y, [])
    fixed_clean = _robust_accuracy(fixed, x, y, [])
    logging.getLogger(__name__).warning(
        "behaviour: mixer accuracy %.3f (clean %.3f, attacked %.3f); mean alpha %.3f; clean / "
        "robust accuracy: trained %.3f / %.3f, fixed alpha %.3f / %.3f", mixer_accuracy,
        clean_right, adv_right, mean_alpha, trained_clean, trained_robust, fixed_clean,
        fixed_robust)
    assert mixer_accuracy >= 0.8
    assert trained_clean >= fixed_clean - 0.05
    assert trained_robust >= fixed_robust + 0.2


# -- resuming only what the config still describes (issue: silently ignored changes) -------------
from adaptive_smoothing.config import apply_overrides  # noqa: E402
from adaptive_smoothing.rundir import RunDirError, RunLock  # noqa: E402
from adaptive_smoothing.training import TrainingResumeError  # noqa: E402


@pytest.fixture(scope="module")
def one_step_run(tiny_root: Path) -> Path:
    """A run killed after its first checkpoint (1 iteration of 2): something to resume."""
    config = _tiny_config(tiny_root, "one_step", epochs=1, eval_freq={"epoch": 1, "iter": 1})
    original = Trainer._train_iteration

    def crash_at_second(self: Trainer, *args: Any) -> Any:
        if self.iteration == 1:
            raise _Interrupted()
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_train_iteration", crash_at_second)
        with pytest.raises(_Interrupted):
            run_training(config)
    return tiny_root / "one_step" / "checkpoints" / "last.pt"


def _resumable_copy(one_step_run: Path, tiny_root: Path, name: str) -> Path:
    target = tiny_root / name / "checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    (target / "last.pt").write_bytes(one_step_run.read_bytes())
    return target / "last.pt"


@pytest.mark.parametrize("key, value", [
    ("training_settings.lr", "1e-4"), ("pgd_settings.eps", "4/255"), ("seed", 6),
    ("training_settings.comp_loss_params.consts.bce", 0.5), ("forward_settings.pn_version", 4)])
def test_resume_refuses_a_changed_config_key_naming_it(
        one_step_run: Path, tiny_root: Path, key: str, value: Any) -> None:
    _resumable_copy(one_step_run, tiny_root, f"changed_{key}")
    config = apply_overrides(_tiny_config(tiny_root, f"changed_{key}", epochs=1),
                             **{key: value})
    with pytest.raises(TrainingResumeError, match=rf"{key}: .* -> .*--allow-config-change {key}"):
        build_trainer(prepare(config))


def test_resume_ignores_how_it_computes_and_what_it_reports_even_if_the_checkpoint_recorded_it(
        one_step_run: Path, tiny_root: Path) -> None:
    path = _resumable_copy(one_step_run, tiny_root, "computes_differently")
    # Recorded as shaping the weights (older versions did): a key that no longer counts must not
    # block the resume as a change to None.
    state = _load(path)
    state["identity"].update({"training_settings.channels_last": True,
                              "training_settings.n_detection_examples": 200})
    torch.save(state, path)
    config = apply_overrides(_tiny_config(tiny_root, "computes_differently", epochs=1), **{
        "training_settings.channels_last": False, "training_settings.n_detection_examples": 0,
        "training_settings.detection_alpha": 0.3, "training_settings.val_start": 1})
    assert build_trainer(prepare(config)).iteration == 1


def test_a_trainer_built_without_a_config_resumes(one_step_run: Path, tiny_root: Path) -> None:
    from adaptive_smoothing.data import build_dataset

    path = _resumable_copy(one_step_run, tiny_root, "explicit")
    state = _load(path)
    state["config"] = {"note": "no config file"}  # as a Trainer built without a config saves
    torch.save(state, path)
    config = _tiny_config(tiny_root, "explicit", epochs=1)
    built = build_trainer(prepare(config), resume=False)  # only for the arguments
    trainer = Trainer(built.composite,
                      build_dataset("cifar10", "train", "npz", tiny_root / "data", augment=False),
                      (built.x_val, built.y_val), settings=config.training_settings,
                      attack=config.randomized_attack_settings, validation=built.validation,
                      seed=config.seed, output_dir=config.run.output_dir,
                      device=torch.device("cpu"), identity=built.identity,
                      config_record={"note": "no config file"})
    old_lr = _load(one_step_run)["optimizer"]["param_groups"][0]["lr"]
    assert trainer.iteration == 1
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(old_lr)


def test_resume_refuses_a_replaced_base_checkpoint(one_step_run: Path, tiny_root: Path) -> None:
    _resumable_copy(one_step_run, tiny_root, "new_std")
    torch.manual_seed(9)
    other = create_model("resnet18", 10, width=2)
    torch.save({"model": other.state_dict()}, tiny_root / "Base" / "std_other.pt")
    config = apply_overrides(_tiny_config(tiny_root, "new_std", epochs=1),
                             **{"model_load_path.std": "Base/std_other.pt"})
    with pytest.raises(TrainingResumeError, match="STD checkpoint's content"):
        build_trainer(prepare(config))


def test_allowed_lr_change_is_applied_and_recorded(one_step_run: Path, tiny_root: Path) -> None:
    _resumable_copy(one_step_run, tiny_root, "allowed_lr")
    old = _load(one_step_run)
    old_lr = old["optimizer"]["param_groups"][0]["lr"]
    config = apply_overrides(_tiny_config(tiny_root, "allowed_lr", epochs=1),
                             **{"training_settings.lr": "3e-4"})  # 10x lower than 3e-3
    trainer = build_trainer(prepare(config), allow_config_change=["training_settings.lr"])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(old_lr / 10)
    assert trainer.scheduler.base_lrs == [pytest.approx(3e-4)]
    path = trainer.fit()
    state = _load(path)
    assert state["config"]["training_settings"]["lr"] == pytest.approx(3e-4)
    (change,) = state["config_changes"]
    assert change["changes"]["training_settings.lr"] == [pytest.approx(3e-3), pytest.approx(3e-4)]
    assert change["iteration"] == 1


def test_resume_from_a_mixer_only_file_says_what_it_is(tiny_root: Path) -> None:
    config = _tiny_config(tiny_root, "mixer_only", epochs=1)
    path = tiny_root / "mixer_only" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    composite = build_composite(config.forward_settings, config.dataset_settings.num_classes)
    torch.save({"model": composite.mixer.state_dict(), "bn": composite.gamma_bn.state_dict()},
               path)
    with pytest.raises(TrainingResumeError, match=r"last\.pt: not a training checkpoint.*"
                                                  r"mixer-only.*--no-resume"):
        build_trainer(prepare(config))


def test_second_training_into_a_locked_folder_is_refused(tiny_root: Path) -> None:
    config = _tiny_config(tiny_root, "locked", epochs=1)
    with RunLock(tiny_root / "locked"):
        with pytest.raises(RunDirError, match=r"in use by another run \(pid \d+"):
            run_training(config)


def test_progress_bar_follows_max_steps(tiny_root: Path) -> None:
    config = _tiny_config(tiny_root, "bar", epochs=50, max_steps=3)
    trainer = build_trainer(prepare(config))
    # 100 iterations of 2 optimizer steps are configured, but max_steps stops after 2.
    assert trainer.total_iterations == 100 and trainer.planned_iterations == 2


def test_a_run_resolves_its_device_and_checkpoints_once(tiny_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare.py is the one place that resolves them; training and evaluation take the Run."""
    import adaptive_smoothing.prepare as prepare_module
    from adaptive_smoothing.config import apply_overrides
    from adaptive_smoothing.evaluation import run_alpha_sweep, run_evaluation

    calls = {"device": 0, "checkpoints": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(prepare_module, "init_distributed",
                        counted("device", prepare_module.init_distributed))
    monkeypatch.setattr(prepare_module, "resolve_checkpoints",
                        counted("checkpoints", prepare_module.resolve_checkpoints))
    config = _tiny_config(tiny_root, "resolved_once", epochs=1)
    run_training(config, debug=True)
    assert calls == {"device": 1, "checkpoints": 1}
    config = apply_overrides(config, **{"evaluation_settings.n_examples": 4,
                                        "evaluation_settings.attacks_to_run": []})
    for evaluate in (lambda: run_evaluation(config),
                     lambda: run_alpha_sweep(config, [0.5], with_composite=True)):
        calls.update(device=0, checkpoints=0)
        evaluate()
        assert calls == {"device": 1, "checkpoints": 1}
