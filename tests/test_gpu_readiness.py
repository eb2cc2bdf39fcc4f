"""Defects that only a CUDA or NCCL run would hit, reproduced on the CPU (issue 13).

Stand-ins: the "meta" device for CUDA tensors and devices (torch.set_rng_state and torch.quantile
reject tensors on the wrong device as they do CUDA ones), gloo processes with a short timeout for
NCCL's watchdog, monkeypatched torch.cuda functions for machines with a given number of GPUs.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from adaptive_smoothing import analysis, base_training, training
from adaptive_smoothing.checkpoints import save_checkpoint
from adaptive_smoothing.training import Trainer
from synthetic import synthetic_data, tiny_composite
from test_evaluation import _settings
from test_training import _tiny_config, tiny_root  # noqa: F401  (a fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_gloo(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


# -- 1: base-training resume with the checkpoint mapped to the training device ---------------------
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_base_training_resume_on_another_device_does_not_crash_on_the_rng_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    settings = base_training.BaseTrainingSettings(arch_kwargs={"width": 2}, epochs=1,
                                                  batch_size=4, device="cpu", precision="fp32")
    output = tmp_path / "base.pt"
    base_training.train_base_model(settings, TensorDataset(x, y), output)
    saved_rng = torch.load(output, weights_only=True)["rng_state"]
    # A rerun on a GPU (meta stands in for CUDA): the finished checkpoint is loaded and resumed.
    monkeypatch.setattr(base_training, "resolve_device", lambda name: torch.device("meta"))
    torch.manual_seed(123)
    base_training.train_base_model(settings, TensorDataset(x, y), output)
    assert torch.equal(torch.get_rng_state(), saved_rng)


# -- 2: ranks that finish early must not wait in a collective --------------------------------------
def _uneven_worker(rank: int, world: int, port: int, out: str) -> None:
    from adaptive_smoothing import evaluation
    _init_gloo(rank, world, port, timeout_s=2.0)
    try:
        if rank == 1:  # this rank's batch takes longer than the process group's timeout
            original = evaluation.evaluate_batch

            def slow(*args: Any, **kwargs: Any) -> Any:
                time.sleep(4.0)
                return original(*args, **kwargs)
            evaluation.evaluate_batch = slow
        x, y = synthetic_data(16, seed=7)
        evaluation.evaluate(tiny_composite(mixer=True), x, y, _settings(batch_size=8),
                            Path(out), device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_rank_that_finishes_early_does_not_hit_the_process_group_timeout(tmp_path: Path) -> None:
    mp.spawn(_uneven_worker, args=(2, _free_port(), str(tmp_path / "out")), nprocs=2, join=True)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["n_examples"] == 16


# -- 3: only rank 0 downloads the dataset ----------------------------------------------------------
class _FakeCifar:
    """torchvision's CIFAR10 as far as downloads go: a missing dataset is 'downloaded' (slowly,
    so that concurrent downloads overlap) when download=True, else refused."""

    def __init__(self, root: str, train: bool, download: bool, transform: Any) -> None:
        data = Path(root) / "cifar-10-batches-py"
        if not data.exists():
            if not download:
                raise RuntimeError("Dataset not found or corrupted")
            with open(Path(root) / "downloads.log", "a") as log:
                log.write(f"{os.getpid()}\n")
            time.sleep(1.0)
            data.mkdir(exist_ok=True)


def _download_worker(rank: int, world: int, port: int, root: str) -> None:
    import torchvision.datasets
    from adaptive_smoothing.data import build_dataset
    _init_gloo(rank, world, port)
    try:
        torchvision.datasets.CIFAR10 = _FakeCifar
        build_dataset("cifar10", "test", "torchvision", root)
    finally:
        dist.destroy_process_group()


def test_only_rank_zero_downloads_the_dataset(tmp_path: Path) -> None:
    mp.spawn(_download_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert len((tmp_path / "downloads.log").read_text().split()) == 1


# -- 4, 5: resuming the mixer's training on another machine or in another precision ----------------
@pytest.fixture
def saved_trainer(tiny_root: Path, request: pytest.FixtureRequest) -> Trainer:  # noqa: F811
    trainer = Trainer(_tiny_config(tiny_root, f"gpu_{request.node.name}"), resume=False)
    trainer.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(trainer._state(), trainer.checkpoint_path)
    return trainer


def test_resume_with_fewer_visible_gpus_restores_the_common_rng_states(
        saved_trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    path = saved_trainer.checkpoint_path
    state = torch.load(path, weights_only=True)
    state["rng"]["cuda"] = [torch.get_rng_state(), torch.get_rng_state()]  # saved with 2 GPUs
    save_checkpoint(state, path)
    restored: list[int] = []

    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        index = torch.device("cuda", device).index if isinstance(device, int) else 0
        if index >= 1:  # what torch does for a GPU that is not there
            raise IndexError("list index out of range")
        assert new_state.device.type == "cpu" and new_state.dtype == torch.uint8
        restored.append(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    saved_trainer._load(path)  # resumed on a machine with one GPU
    assert restored == [0]


def test_fp16_resume_from_a_bf16_or_fp32_checkpoint_starts_a_fresh_scaler(
        saved_trainer: Trainer, tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not saved_trainer.scaler.is_enabled()  # fp32: the checkpoint's scaler state is empty
    monkeypatch.setattr(training, "resolve_precision", lambda name, device: torch.float16)
    resumed = Trainer(saved_trainer.config, resume=True)
    assert resumed.scaler.is_enabled()
    assert resumed.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


# -- 6: margin quantiles of margins on a GPU ------------------------------------------------------
def test_margin_quantiles_of_device_tensors_do_not_mix_devices() -> None:
    margins = torch.rand(50, device="meta")  # meta stands in for CUDA
    assert analysis._quantiles(margins, (0.1, 0.5)).device == margins.device
    cpu = torch.linspace(0, 1, 11)
    assert torch.allclose(analysis._quantiles(cpu, (0.1, 0.5)), torch.tensor([0.1, 0.5]))
