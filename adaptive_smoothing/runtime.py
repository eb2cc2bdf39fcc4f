"""Device and numeric-precision choices shared by training and evaluation."""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch import nn

from adaptive_smoothing.errors import UserError
from adaptive_smoothing.grad_scaling import call_with_scaled_gradients

logger = logging.getLogger(__name__)

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(UserError, ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present (this process's local rank under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r}: not a device name; expected 'auto', 'cpu', 'cuda' "
                          "or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise DeviceError(f"device {name!r}: CUDA is not available here ({why}); use "
                              "--device cpu, or --device auto to take a GPU when there is one")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}; choose one of them or 'auto'")
    return device


class RuntimeSettingsError(UserError, ValueError):
    """A precision / device / thread setting this machine cannot honour (one-line message)."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (CUDA with bf16 support; a CPU with
    avx512_bf16 or AMX). Elsewhere bf16 autocast is emulated: on this project's AVX2 CPU a
    ResNet-18 forward + backward ran about 10x slower in bf16 than in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``name`` on ``device``.

    'auto' -> bf16 on CUDA, fp32 on CPU (reported numbers stay fp32 on CPU, and bf16 is only
    faster on CPUs with native bf16; choose 'bf16' there, see docs/RESULTS.md). 'bf16' works on
    CUDA and CPU (CPU autocast; a warning where it is emulated). 'fp16' needs CUDA: its gradient
    scaler and fp16 kernels are CUDA features.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _PRECISIONS:
        raise RuntimeSettingsError(f"unknown precision {name!r}; expected 'auto' or one of "
                                   f"{sorted(_PRECISIONS)}")
    dtype = _PRECISIONS[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise RuntimeSettingsError(f"precision 'fp16' needs a CUDA device, but the device is "
                                   f"{device.type!r}; use 'bf16' or 'fp32'")
    if dtype == torch.bfloat16 and not native_bf16(device):
        _warn_emulated_bf16(str(device))
    return dtype


@functools.lru_cache(maxsize=None)  # once per device and process, not at every call
def _warn_emulated_bf16(device: str) -> None:
    logger.warning("precision 'bf16' on %s without native bf16 support: autocast emulates it "
                   "and is much slower than fp32 here (about 10x on an AVX2 CPU)", device)


@functools.lru_cache(maxsize=None)  # once per process and setting
def _warn_oversubscribed(count: int, cores: int) -> None:
    logger.warning(
        "%d torch threads but only %d core(s) available to this process (--threads / "
        "evaluation_settings.threads / OMP_NUM_THREADS): the threads take turns on the cores and "
        "every parallel operation waits for the slowest, so the run is many times slower, not "
        "faster (a run that took 12.7 s with 2 threads on 2 cores did not finish in 300 s with "
        "999); use --threads %d or fewer", count, cores, cores)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def default_threads() -> int:
    """Intra-op threads when none are asked for: OMP_NUM_THREADS if set, else the cores this
    process may run on, shared evenly by the processes torchrun started on this machine."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cores = available_cores()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local_world, 1))


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op thread count for this process (every entry point calls this once,
    first thing); ``None`` -> :func:`default_threads`. Returns the count.

    torch otherwise uses every core however busy the machine is. OpenMP's waiting policy is set
    to PASSIVE (idle threads sleep instead of spinning) in ``adaptive_smoothing/__init__.py``,
    because OpenMP reads it once, when torch loads it.
    """
    if threads is not None and threads < 1:
        raise RuntimeSettingsError(f"threads must be >= 1, got {threads}")
    count = threads if threads is not None else default_threads()
    share = available_cores() // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    if count > max(share, 1):
        _warn_oversubscribed(count, max(share, 1))
    torch.set_num_threads(count)
    logger.info("torch threads: %d (OMP_WAIT_POLICY=%s)", count,
                os.environ.get("OMP_WAIT_POLICY", "unset"))
    return count


def prepare_model(model: nn.Module, *, channels_last: bool = False,
                  compile: bool = False) -> nn.Module:
    """Apply the speed settings to ``model`` in place and return it.

    ``channels_last`` stores 4-d weights as NHWC, so convolutions run (and produce) NHWC tensors
    whatever the input layout (faster with oneDNN and cuDNN, no change of precision).
    ``compile`` compiles the module's call in place (``nn.Module.compile``), so that the module
    keeps its type and attributes (the composite's ``train(mode, scale_alpha)``, ``mixer``...).
    """
    if channels_last:
        unsafe = _unsafe_channels_last_convs(model)
        if unsafe:
            logger.warning("channels_last not applied: %s is a strided 1x1 convolution with "
                           "2-7 input channels, whose channels_last backward pass on the CPU "
                           "corrupts memory in torch %s (crashes seen at widths 2 and 4)",
                           unsafe[0], torch.__version__)
        else:
            model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model


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


def _unsafe_channels_last_convs(model: nn.Module) -> list[str]:
    """Names of the CPU convolutions whose channels_last backward crashes (strided 1x1 with 2-7
    input channels: found with ResNet-18 shortcuts at width 2 and 4; 1 and >= 8 are fine)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.weight.device.type == "cpu"
            and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and 2 <= module.in_channels <= 7]


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
