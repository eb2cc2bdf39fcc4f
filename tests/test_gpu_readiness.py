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
from torch.utils.data import TensorDataset

from adaptive_smoothing import analysis, base_training
from adaptive_smoothing.training import loop as training_loop  # where the Trainer looks names up
from adaptive_smoothing.checkpoints import save_checkpoint
from adaptive_smoothing.tools.readiness import SyncRecorder
from adaptive_smoothing.training import Trainer, build_trainer
from adaptive_smoothing.prepare import prepare
from spawn import spawn
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
    monkeypatch.setattr(base_training, "select_device", lambda name: torch.device("meta"))
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


@pytest.mark.distributed
def test_rank_that_finishes_early_does_not_hit_the_process_group_timeout(tmp_path: Path) -> None:
    spawn(_uneven_worker, args=(2, _free_port(), str(tmp_path / "out")), nprocs=2, join=True)
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
            time.sleep(3.0)  # longer than the process group's timeout in the test
            data.mkdir(exist_ok=True)


def _download_worker(rank: int, world: int, port: int, root: str) -> None:
    import torchvision.datasets
    from adaptive_smoothing.data import build_dataset
    _init_gloo(rank, world, port, timeout_s=2.0)  # NCCL's watchdog would abort a long wait
    try:
        torchvision.datasets.CIFAR10 = _FakeCifar
        build_dataset("cifar10", "test", "torchvision", root)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_only_rank_zero_downloads_the_dataset_and_a_slow_download_does_not_time_out(
        tmp_path: Path) -> None:
    spawn(_download_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert len((tmp_path / "downloads.log").read_text().split()) == 1


# -- 4, 5: resuming the mixer's training on another machine or in another precision ----------------
@pytest.fixture
def saved_trainer(tiny_root: Path, request: pytest.FixtureRequest) -> Trainer:  # noqa: F811
    trainer = build_trainer(prepare(_tiny_config(tiny_root, f"gpu_{request.node.name}")), resume=False)
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
        saved_trainer: Trainer, tiny_root: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    assert not saved_trainer.scaler.is_enabled()  # fp32: the checkpoint's scaler state is empty
    monkeypatch.setattr(training_loop, "resolve_precision", lambda name, device: torch.float16)
    # The saved trainer's config (the fixture names its folder after this test).
    config = _tiny_config(tiny_root, f"gpu_{request.node.name}")
    resumed = build_trainer(prepare(config), resume=True)
    assert resumed.scaler.is_enabled()
    assert resumed.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


# -- 6: margin quantiles of margins on a GPU ------------------------------------------------------
def test_margin_quantiles_of_device_tensors_do_not_mix_devices() -> None:
    margins = torch.rand(50, device="meta")  # meta stands in for CUDA
    assert analysis._quantiles(margins, (0.1, 0.5)).device == margins.device
    cpu = torch.linspace(0, 1, 11)
    assert torch.allclose(analysis._quantiles(cpu, (0.1, 0.5)), torch.tensor([0.1, 0.5]))


# -- 7: fp16 attacks: the input gradient of a confidently classified point must not flush to 0 ----
class _LinearIn(torch.nn.Module):
    """A linear classifier computing in ``dtype`` (fp16: what autocast does on a GPU)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.dtype = torch.nn.Parameter(weight, requires_grad=False), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.dtype).flatten(1) @ self.weight.to(self.dtype)).float()


def _confident_linear_models() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor,
                                        torch.Tensor]:
    """fp16 and fp32 versions of one linear model whose logit margins are 40-200: CE gradients
    of ~1e-18 and below, zero in fp16 but not in fp32."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.rand(6, 3, 8, 8, generator=gen), torch.randn(3 * 8 * 8, 10, generator=gen)
    top2 = (x.flatten(1) @ weight).sort(1).values[:, -2:]
    weight *= 40 / (top2[:, 1] - top2[:, 0]).min()
    fp16, fp32 = (_LinearIn(weight, dtype).eval() for dtype in (torch.float16, torch.float32))
    return fp16, fp32, x, fp32(x).argmax(1)


def test_fp16_apgd_moves_confidently_classified_points_as_fp32_does() -> None:
    from adaptive_smoothing.attacks import apgd
    fp16, fp32, x, y = _confident_linear_models()
    assert torch.equal(fp16(x).argmax(1), y)
    # The problem: the fp16 backward flushes these input gradients to exactly zero.
    x_grad = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(fp16(x_grad), y), x_grad)
    assert not grad.any()
    moved = {}
    for name, model in (("fp16", fp16), ("fp32", fp32)):
        result = apgd(model, x, y, 8 / 255, n_iter=5, random_start=False)
        moved[name] = (result.x_adv - x).flatten(1).abs().amax(1) > 0
    assert moved["fp32"].any()  # where fp32 arithmetic has a gradient, fp16 must move too
    assert torch.equal(moved["fp16"], moved["fp32"])


def test_fp16_autoattack_through_the_autocast_module_moves_like_fp32() -> None:
    from pyautoattack.autopgd_base import APGDAttack
    from adaptive_smoothing.runtime import AutocastModule
    _, fp32, x, y = _confident_linear_models()
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10, bias=False)).eval()
    linear[1].weight.data = fp32.weight.data.t().clone()
    linear.requires_grad_(False)
    found = {}
    for dtype in (torch.float16, torch.float32):  # CPU autocast computes the Linear in fp16
        model = AutocastModule(linear, torch.device("cpu"), dtype)
        attack = APGDAttack(model, n_iter=5, eps=8 / 255, device="cpu", seed=0)
        found[dtype] = (attack.perturb(x, y) - x).flatten(1).abs().amax(1) > 0
    assert found[torch.float32].any()
    assert torch.equal(found[torch.float16], found[torch.float32])


def test_gradient_scaling_leaves_fp32_gradients_bit_for_bit_unchanged() -> None:
    from adaptive_smoothing.grad_scaling import call_with_scaled_gradients
    composite = tiny_composite(mixer=True, alpha_bias=0.2, alpha_scale=0.75).eval()
    x, y = synthetic_data(8, seed=3)
    grads = []
    for scaled in (False, True):
        x_grad = x.clone().requires_grad_(True)
        out = call_with_scaled_gradients(composite, x_grad) if scaled else composite(x_grad)
        loss = torch.nn.functional.nll_loss(out.log_probs, y, reduction="none") * 1e-3 + (
            out.gamma * torch.linspace(-3, 3, 8))
        grads.append(torch.autograd.grad(loss.sum(), x_grad)[0])
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


# -- 10, 11: no host-device synchronisation in the composite's forward and an APGD step ------------
def test_composite_forward_and_apgd_steps_do_not_synchronise_with_the_device() -> None:
    from adaptive_smoothing.attacks import apgd
    composite = tiny_composite(mixer=True, alpha_bias=0.2, alpha_scale=0.75).eval()
    x, y = synthetic_data(8, seed=1)
    with SyncRecorder() as recorder:
        composite(x)
    assert recorder.found == []
    # 3 iterations: the step-size checkpoint (halving, restart from the best point) comes at 1.
    with SyncRecorder() as recorder:
        apgd(composite, x, y, 8 / 255, n_iter=3, loss="ce", bce_weight=0.3)
    assert recorder.found == []


# -- 12: the frozen BiT standardises its weights once ---------------------------------------------
def test_frozen_bit_does_not_restandardise_its_weights_every_forward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_smoothing.models import bit, create_model
    model = create_model("bit_m_r50x1", num_classes=10).eval().requires_grad_(False)
    fresh = create_model("bit_m_r50x1", num_classes=10).eval().requires_grad_(False)
    x = torch.rand(2, 3, 32, 32)
    model(x)
    calls = {"n": 0}
    original = torch.var_mean

    def counting_var_mean(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(bit.torch, "var_mean", counting_var_mean)
    x_grad = x.clone().requires_grad_(True)
    model(x_grad).sum().backward()  # an attack step: gradient w.r.t. the input only
    assert calls["n"] == 0 and x_grad.grad.abs().sum() > 0
    # Changed weights (a checkpoint loaded into it) invalidate the cache.
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), fresh.train(False)(x))
    assert calls["n"] > 0


# -- 13: the mixer's training under DDP ----------------------------------------------------------
def test_mixer_optimizer_step_waits_for_the_device_once_not_per_mini_batch(
        saved_trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = saved_trainer
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    labels = torch.tensor([0.0] * 4 + [1.0] * 4)
    groups = [torch.tensor([0, 5, 2, 7]), torch.tensor([4, 1, 6, 3])]  # two accumulated batches
    syncs_before_step: list[list[str]] = []
    original_step = trainer.scaler.step

    def step(*args: Any, **kwargs: Any) -> Any:
        syncs_before_step.append(list(recorder.found))
        return original_step(*args, **kwargs)
    monkeypatch.setattr(trainer.scaler, "step", step)
    with SyncRecorder() as recorder:
        trainer._optimizer_step(xs, ys, labels, groups)
    # One decision (finite losses and gradient norm) for the whole accumulation group.
    assert syncs_before_step == [["_local_scalar_dense"]]


def test_training_attacks_run_the_same_iteration_counts_on_every_rank(
        saved_trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_smoothing import attacks
    trainer = saved_trainer
    trainer.attack_settings = trainer.attack_settings.model_copy(update={"iters_df": 40.0})
    counts: list[int] = []

    def recording_apgd(model: Any, x: torch.Tensor, y: torch.Tensor, eps: Any,
                       **kwargs: Any) -> attacks.AttackResult:
        counts.append(kwargs["n_iter"])
        return attacks.AttackResult(x, torch.zeros(len(x)), torch.zeros(len(x), dtype=torch.bool))
    monkeypatch.setattr(attacks, "apgd", recording_apgd)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    per_rank = []
    for rank in (0, 1):  # the same iteration on two processes of a DDP run
        trainer.rank, trainer.iteration = rank, 5
        counts.clear()
        trainer._train_iteration(x, y, x, y)
        per_rank.append(list(counts))
    assert len(per_rank[0]) == 1 + trainer.n_target
    assert per_rank[0] == per_rank[1]


# -- 14: torchrun and --device cuda:N --------------------------------------------------------------
def test_device_cuda_n_becomes_the_current_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_smoothing import runtime
    current: list[torch.device] = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # cuda:1 exists
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
    assert runtime.init_distributed("cuda:1") == (0, 1, torch.device("cuda", 1))
    assert [torch.device(d) for d in current] == [torch.device("cuda", 1)]


def test_nccl_process_group_is_bound_to_the_local_rank_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_smoothing import runtime
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert runtime.init_distributed("auto") == (1, 2, torch.device("cuda", 1))
    (args, kwargs), = calls
    assert kwargs.get("backend", args[0] if args else None) == "nccl"
    assert kwargs["device_id"] == torch.device("cuda", 1)


def _torchrun_eval_worker(rank: int, world: int, port: int, config_path: str, data: str,
                          out: str) -> None:
    from adaptive_smoothing.config import apply_overrides, load_config
    from adaptive_smoothing.evaluation import run_evaluation
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    config = apply_overrides(load_config(Path(config_path)), **{
        "dataset_settings.path": data, "dataset_settings.format": "npz",
        "evaluation_settings.data_dir": data, "evaluation_settings.n_examples": 16,
        "evaluation_settings.attacks_to_run": [], "evaluation_settings.device": "cpu",
        "evaluation_settings.output_dir": out})
    table = run_evaluation(config)  # joins the process group itself, as under torchrun
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"table": table, "group_left": not dist.is_initialized()}))


@pytest.mark.distributed
def test_torchrun_evaluation_prints_once_and_shuts_the_process_group_down(
        tmp_path: Path, shared_cifar10: Path) -> None:
    from test_cli import _write_config
    config = _write_config(tmp_path, shared_cifar10)
    out = tmp_path / "out"
    spawn(_torchrun_eval_worker, args=(2, _free_port(), str(config), str(shared_cifar10),
                                          str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "clean accuracy" in ranks[0]["table"] and ranks[1]["table"] is None
    assert ranks[0]["group_left"] and ranks[1]["group_left"]


def test_run_robustbench_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from adaptive_smoothing.robustbench_eval import run_benchmark
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="runs in one process.*python.*--device cuda:N"):
        run_benchmark(tmp_path, "cifar10", "edm", device="cpu", output_dir=tmp_path)



# The device checks of scripts/gpu_readiness.py run at tiny sizes on the CPU in
# tests/test_benchmark_scripts.py (through scripts/gpu_check.sh, which calls them).
