"""Device and numeric-precision choices shared by training and evaluation."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

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
