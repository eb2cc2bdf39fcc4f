"""Batch statistics over all processes, so that DDP training at a global batch B is the same
computation as one process at batch B.

The mixer's BatchNorm layers, the gamma BatchNorm and the training-mode clamp of gamma all use
statistics of the mini-batch. Under DDP each process would see only its B / world images, and a
two-process run would follow a different trajectory from a one-process run of the same global
batch. ``torch.nn.SyncBatchNorm`` fixes that on CUDA only (its kernels do not exist on CPU), so
the statistics are all-reduced here with a differentiable all-reduce that works on every backend
(gloo, NCCL): the backward pass all-reduces the gradient of the statistics, as SyncBatchNorm
does. Outside torch.distributed (or in eval mode) these
modules are plain BatchNorm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GlobalBatchNorm", "convert_to_global_batchnorm", "distributed_world",
           "global_mean_std"]


def distributed_world() -> int:
    """Number of processes in the default group (1 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradients over processes (each process's loss
    depends on every process's statistics)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


def global_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached mean and unbiased standard deviation of ``x`` over all processes' elements
    (``x.mean()`` / ``x.std()`` in one process)."""
    x = x.detach()
    if distributed_world() == 1:
        return x.mean(), x.std()
    count = torch.tensor(float(x.numel()), device=x.device, dtype=torch.float64)
    dist.all_reduce(count)
    total = x.double().sum()
    dist.all_reduce(total)
    mean = total / count
    squares = (x.double() - mean).square().sum()  # two passes: no cancellation in the variance
    dist.all_reduce(squares)
    std = (squares / (count - 1)).sqrt()
    return mean.to(x.dtype), std.to(x.dtype)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics cover the batch of every process.

    Same parameters, buffers and state_dict keys as ``nn.BatchNorm1d/2d``; with one process or in
    eval mode it is plain BatchNorm. Inputs of any rank >= 2 (N, C, ...) are accepted.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or distributed_world() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        # Statistics in fp32 (or fp64), as BatchNorm does under autocast.
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims = [0, *range(2, x.dim())]
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=x.dtype)
        dist.all_reduce(count)
        mean = _all_reduce_sum(x.sum(dims)) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.reshape(shape)
        var = _all_reduce_sum(centred.square().sum(dims)) / count  # biased, for normalising
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach() * factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach() * factor)
        return out.to(input.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``module`` (or ``module`` itself) by a
    :class:`GlobalBatchNorm` sharing its parameters and buffers; returns the converted module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, eps=module.eps,
                                    momentum=module.momentum, affine=module.affine,
                                    track_running_stats=module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_batchnorm(child))
    return module
