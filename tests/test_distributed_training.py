"""DDP training of the mixer (what torchrun starts), on CPU over gloo: two processes that each
hold half of every mini-batch end with the same mixer as one process that holds all of it.

What this pins: DDP's gradient averaging, gradient accumulation without sync, clipping, the
optimizer and the batch statistics (mixer BatchNorm, gamma clamp, gamma BatchNorm, made global by
models/distributed_bn.py) together make a step over a global batch B split across processes the
same computation as one step over B images in one process. (Whole runs at different process
counts see different batches: data order and attack draws are seeded per rank.)
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from adaptive_smoothing.config import load_config
from adaptive_smoothing.training import build_trainer
from adaptive_smoothing.prepare import prepare
from spawn import spawn
from synthetic import make_tiny_training_root
from test_training import _tiny_config

STEPS = 3          # optimizer steps
GROUP = 2          # mini-batches per step (the config's accum_grad)
GLOBAL_BATCH = 8   # images per mini-batch over all processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_buffer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """STEPS * GROUP mini-batches of GLOBAL_BATCH images, half labelled attacked."""
    n = STEPS * GROUP * GLOBAL_BATCH
    generator = torch.Generator().manual_seed(11)
    xs = torch.rand(n, 3, 32, 32, generator=generator)
    ys = torch.randint(0, 10, (n,), generator=generator)
    labels = (torch.arange(n) % 4 >= 2).float()  # each process's share holds both labels
    return xs, ys, labels


def _write_config(root: Path, world: int) -> Path:
    """The run's config file, written once by the parent process: workers that each wrote it
    raced (one read the file while another truncated it: 'the file is empty')."""
    _tiny_config(root, f"ddp{world}", batch_size=GLOBAL_BATCH, accum_grad=GROUP, lr="1e-3")
    return root / f"ddp{world}.yaml"


def _train_steps(root: Path, rank: int, world: int) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps of Trainer on this process's rows of the global buffer."""
    trainer = build_trainer(prepare(load_config(root / f"ddp{world}.yaml")))
    xs, ys, labels = (t[rank::world] for t in _global_buffer())  # half of every mini-batch
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        groups = [torch.arange(local) + (step * GROUP + j) * local for j in range(GROUP)]
        trainer._optimizer_step(xs, ys, labels, groups)
    state = {f"mixer.{k}": v.detach().clone() for k, v in trainer.mixer.state_dict().items()}
    state.update({f"bn.{k}": v.detach().clone()
                  for k, v in trainer.composite.gamma_bn.state_dict().items()})
    return state


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    # What torchrun sets; build_trainer joins the process group (runtime.init_distributed).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        state = _train_steps(Path(root), rank, world)
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_train_the_same_mixer_as_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tiny_training_root(root)
    _write_config(root, 1)
    _write_config(root, 2)
    single = _train_steps(root, 0, 1)

    spawn(_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    initial = build_trainer(prepare(_tiny_config(root, "initial"))).mixer.state_dict()
    for rank in range(2):
        multi = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(multi) == set(single)
        for key, value in single.items():
            # 1e-4, 30 times below how far the steps move the mixer: summing a gradient in
            # another order can change a coordinate whose gradient is near 0 by 1e-8, which
            # Adam's g / sqrt(v) turns into up to lr-sized steps (seen: one weight of 2,304 off
            # by 2e-5 on an AVX-512 CPU, every other value within 3e-6).
            assert torch.allclose(multi[key].double(), value.double(), atol=1e-4, rtol=0), (
                rank, key, (multi[key].double() - value.double()).abs().max())
    # The steps did move the mixer (a comparison of untrained mixers would prove nothing).
    moved = max((single[f"mixer.{k}"].double() - v.double()).abs().max().item()
                for k, v in initial.items() if v.is_floating_point())
    assert moved > 1e-3


def test_bf16_training_steps_run_under_cpu_autocast(tmp_path: Path) -> None:
    """The training autocast path without a GPU: the composite's convolutions run in bf16 on the
    CPU and the mixer still takes finite steps (fp32 master weights)."""
    root = tmp_path / "root"
    make_tiny_training_root(root)
    config = _tiny_config(root, "bf16", batch_size=GLOBAL_BATCH, accum_grad=GROUP,
                          precision="bf16")
    trainer = build_trainer(prepare(config))
    assert trainer.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in trainer.mixer.state_dict().items()}
    dtypes: list[torch.dtype] = []
    hook = trainer.composite.std_model.conv1.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype))
    xs, ys, labels = _global_buffer()
    groups = [torch.arange(GLOBAL_BATCH) + j * GLOBAL_BATCH for j in range(GROUP)]
    trainer._optimizer_step(xs, ys, labels, groups)
    hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    after = trainer.mixer.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # fp32 master weights
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert trainer.global_step == 1 and trainer.nonfinite_streak == 0
    assert max((after[k].double() - v.double()).abs().max().item()
               for k, v in before.items() if v.is_floating_point()) > 1e-4
