"""Per-sample power-of-two scaling of input gradients, so fp16 backward passes do not flush them.

In fp16 (autocast), the backward pass through the model runs in fp16, whose smallest subnormal is
6e-8. On a confidently classified point the cross-entropy gradient w.r.t. the logits is far
smaller (1 - p_y ~ 1e-10), so it flushes to zero, sign(0) = 0, and a gradient attack stops moving
there: robust accuracy is overstated. :func:`call_with_scaled_gradients` runs the model between two
identity functions: at the output, the backward multiplies each sample's incoming gradient by a
power of two that brings its largest entry into [1, 2); at the input, it multiplies the gradient
by the inverse. Multiplying by a power of two is exact in floating point (short of overflow or
underflow, which is what it prevents), so in fp32 the gradient is bit for bit the unscaled one and
in fp16 it is what fp32 arithmetic over the same forward would give, up to fp16 rounding.

Samples are scaled independently only when the model treats them independently (eval mode);
a model in training mode (batch statistics couple the samples) gets one scale for the batch.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["call_with_scaled_gradients"]

# Largest per-sample output-gradient entry after scaling: in [2^(_PEAK_EXPONENT - 1), 2^_PEAK).
_PEAK_EXPONENT = 1
# Exponents of normal float32 numbers, so that the scale and its inverse are both exact.
_MIN_EXPONENT, _MAX_EXPONENT = -126, 126


class _Scale:
    """Carries the inverse scale from the output's backward to the input's backward."""

    __slots__ = ("inverse",)

    def __init__(self) -> None:
        self.inverse: Optional[torch.Tensor] = None


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2 ** exponent as float32, built from the exponent bits (exact; no pow/exp2 rounding)."""
    biased = (exponent.clamp(_MIN_EXPONENT, _MAX_EXPONENT) + 127).to(torch.int32)
    return (biased << 23).view(torch.float32)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.view(-1, *([1] * (like.dim() - 1))) if value.dim() else value


class _ScaleInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scale: _Scale, x: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        inverse = ctx.scale.inverse
        if inverse is None:
            return None, grad
        return None, grad * _per_sample(inverse, grad).to(grad.dtype)


class _ScaleOutputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scale: _Scale, per_sample: bool,
                *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.scale, ctx.per_sample = scale, per_sample
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        present = [g for g in grads if g is not None and g.dim() > 0 and g.numel() > 0]
        if not present:
            return (None, None, *grads)
        if ctx.per_sample:
            peak = torch.stack([g.detach().float().abs().flatten(1).amax(1) if g.dim() > 1
                                else g.detach().float().abs() for g in present]).amax(0)
        else:
            peak = torch.stack([g.detach().float().abs().amax() for g in present]).amax()
        _, exponent = torch.frexp(peak)  # peak = m * 2^exponent, m in [0.5, 1); 0 -> exponent 0
        shift = _PEAK_EXPONENT - exponent
        scale, ctx.scale.inverse = _power_of_two(shift), _power_of_two(-shift)
        scaled = tuple(None if g is None else
                       (g.float() * _per_sample(scale, g)).to(g.dtype) if g.dim() > 0 else g
                       for g in grads)
        return (None, None, *scaled)


def call_with_scaled_gradients(fn: Callable[[torch.Tensor], Any], x: torch.Tensor,
                               per_sample: bool = True) -> Any:
    """``fn(x)`` (a tensor, or a tuple / NamedTuple of tensors with the batch first) whose
    backward to ``x`` runs at a per-sample power-of-two scale (see the module docstring).

    Without a gradient to compute (no grad mode, or ``x`` not requiring grad) it is ``fn(x)``.
    ``per_sample`` False: one scale for the batch (for models that couple samples).
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x)
    scale = _Scale()
    out = fn(_ScaleInput.apply(scale, x))
    if isinstance(out, torch.Tensor):
        return _ScaleOutputs.apply(scale, per_sample, out)[0]
    if isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out):
        values = _ScaleOutputs.apply(scale, per_sample, *out)
        return type(out)(*values) if hasattr(out, "_fields") else tuple(values)
    return out
