"""Device and numeric-precision choices shared by training and evaluation."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch import nn

from adaptive_smoothing.grad_scaling import call_with_scaled_gradients

logger = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present (this process's local rank under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu'")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on CPU. fp16/bf16 autocast on CPU is refused as too slow and
    not what the published numbers used."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected 'auto' or one of "
                         f"{sorted(_PRECISIONS)}")
    dtype = _PRECISIONS[name]
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"precision {name!r} needs a CUDA device; use fp32 on CPU")
    return dtype


def autocast_context(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Mixed-precision autocast for ``dtype`` (a no-op for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def select_device(name: str = "auto") -> torch.device:
    """:func:`resolve_device`, and for ``cuda:N`` also make GPU N the current CUDA device, so
    that code using the current device (AutoAttack, RobustBench, cuDNN handles) follows it."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns
    ``(rank, world_size, device)``. Each process uses the GPU of its LOCAL_RANK."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, select_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda and device_name not in ("auto", "cuda"):
        logger.warning("under torchrun each process uses the GPU of its LOCAL_RANK; ignoring "
                       "device %r (select GPUs with CUDA_VISIBLE_DEVICES)", device_name)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id binds the NCCL communicator to this process's GPU at once (without it NCCL
        # guesses the device and may create its context on GPU 0 of every process).
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                **({"device_id": device} if use_cuda else {}))
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def distributed_session(device_name: str = "auto") -> Iterator[tuple[int, int, torch.device]]:
    """:func:`init_distributed` for a whole run: destroys the process group it created on exit
    (also on error), so NCCL's resources are released and torchrun sees a clean shutdown. A group
    that already existed (a caller's) is left alone."""
    import torch.distributed as dist

    created = (int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available()
               and not dist.is_initialized())
    try:
        yield init_distributed(device_name)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(timeout: Optional[datetime.timedelta] = None) -> None:
    """Wait for every process. ``timeout``: for waits that may outlast the default group's
    timeout (NCCL's watchdog aborts the job after 10 minutes), a gloo group with this timeout,
    which waits on the CPU, is used instead."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if timeout is None:
        dist.barrier()
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


class AutocastModule(nn.Module):
    """Runs a model under autocast and returns fp32 outputs (what AutoAttack expects)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.device, self.dtype = model, device, dtype

    def forward(self, x: torch.Tensor) -> Any:
        if self.dtype == torch.float16:
            # fp16 backward passes flush small input gradients to zero; AutoAttack and
            # RobustBench compute theirs through this module (grad_scaling.py).
            return call_with_scaled_gradients(self._forward, x,
                                              per_sample=not self.model.training)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> Any:
        with autocast_context(self.device, self.dtype):
            out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out.float()
        return type(out)(*(t.float() for t in out))  # e.g. CompositeOutput
