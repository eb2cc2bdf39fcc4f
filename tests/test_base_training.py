"""Base-model training: a stopped run continues exactly, and refuses changed settings."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from adaptive_smoothing import base_training
from adaptive_smoothing.base_training import BaseTrainingSettings, train_base_model

# FGSM-RS: the random starts and the shuffled order both have to continue where they stopped.
SETTINGS = BaseTrainingSettings(arch_kwargs={"width": 2}, method="fgsm", epochs=2, batch_size=16,
                                device="cpu", precision="fp32")


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 32, 32, generator=generator)
    return TensorDataset(x, torch.randint(0, 10, (48,), generator=generator))


def test_run_stopped_after_an_epoch_resumes_to_the_weights_of_an_uninterrupted_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = train_base_model(SETTINGS, _data(), tmp_path / "whole.pt")

    saved = []
    original = base_training.save_checkpoint

    def stop_after_first_epoch(payload: dict, path: Path) -> None:
        original(payload, path)
        saved.append(path)
        raise KeyboardInterrupt  # Ctrl-C just after the first checkpoint

    monkeypatch.setattr(base_training, "save_checkpoint", stop_after_first_epoch)
    stopped = tmp_path / "stopped.pt"
    with pytest.raises(KeyboardInterrupt):
        train_base_model(SETTINGS, _data(), stopped)
    assert torch.load(stopped, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(base_training, "save_checkpoint", original)
    torch.manual_seed(999)  # the caller's RNG must not matter
    resumed = train_base_model(SETTINGS, _data(), stopped)

    state = torch.load(stopped, weights_only=True)
    assert state["epoch"] == 2 and state["cpu_seconds"] > 0
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_settings_that_would_train_other_weights(tmp_path: Path) -> None:
    output = tmp_path / "base.pt"
    train_base_model(dataclasses.replace(SETTINGS, epochs=1), _data(), output)
    with pytest.raises(ValueError, match=r"base\.pt: cannot resume.*lr: 0\.1 -> 0\.05"):
        train_base_model(dataclasses.replace(SETTINGS, epochs=1, lr=0.05), _data(), output)


def test_wrong_file_as_base_model_names_the_file_and_missing_entry(tmp_path: Path) -> None:
    from adaptive_smoothing.base_training import load_base_model
    from adaptive_smoothing.checkpoints import CheckpointError

    mixer_like = tmp_path / "mixer.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "bn": {}}, mixer_like)
    with pytest.raises(CheckpointError, match=r"mixer\.pt: expected base-training checkpoint.*"
                                              r"missing entries \['arch', 'num_classes'\]"):
        load_base_model(mixer_like)

    trained = tmp_path / "rn18.pt"
    model = train_base_model(dataclasses.replace(SETTINGS, epochs=1), _data(), trained)
    state = torch.load(trained, weights_only=True)
    assert torch.equal(load_base_model(trained).state_dict()["linear.weight"],
                       model.state_dict()["linear.weight"])
    state["num_classes"] = 100  # weights of a 10-class model: the shapes do not fit
    torch.save(state, trained)
    with pytest.raises(CheckpointError, match=r"rn18\.pt: does not match .*wrong shapes"):
        load_base_model(trained)
