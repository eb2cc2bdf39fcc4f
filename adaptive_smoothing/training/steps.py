"""An iteration's training statistics as a named type.

They are summed on the device while the optimizer steps run (no host synchronisation per
mini-batch) and across processes with one all-reduce of their packed tensor; :meth:`metrics`
reads them once, at the end of the iteration.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["StepStatistics"]


class StepStatistics(NamedTuple):
    """Sums over mini-batches (0-d float64 tensors on one device). A mini-batch whose loss is
    not finite adds nothing (its NaN must not reach the sums); ``grad_norm_sum`` counts the
    optimizer steps taken only."""

    loss_sum: torch.Tensor            # each mini-batch's loss at full weight
    minibatches: torch.Tensor         # mini-batches with a finite loss
    gamma_adv_sum: torch.Tensor       # gamma over attacked images (label 1)
    adv: torch.Tensor                 # attacked images
    gamma_pos_adv: torch.Tensor       # attacked images with gamma > 0
    gamma_clean_sum: torch.Tensor     # gamma over clean images (label 0)
    clean: torch.Tensor               # clean images
    gamma_nonpos_clean: torch.Tensor  # clean images with gamma <= 0
    grad_norm_sum: torch.Tensor       # the clipped steps' gradient norms before clipping

    @classmethod
    def zeros(cls, device: torch.device) -> StepStatistics:
        return cls.unpack(torch.zeros(len(cls._fields), dtype=torch.float64, device=device))

    @classmethod
    def of_minibatch(cls, loss: torch.Tensor, gamma: torch.Tensor, labels: torch.Tensor,
                     accum_count: int, finite: torch.Tensor) -> StepStatistics:
        """One mini-batch's sums: ``loss`` as the loss function returned it (divided by the
        ``accum_count`` mini-batches of its step), ``gamma`` and mixer ``labels`` per image,
        ``finite`` whether the loss is finite."""
        gamma = gamma.detach().double()
        adv, clean = labels > 0.5, labels <= 0.5
        zero = torch.zeros_like(gamma)
        sums = torch.stack([
            loss.detach().double() * accum_count, torch.ones_like(gamma[0]),
            torch.where(adv, gamma, zero).sum(), adv.sum(), (adv & (gamma > 0)).sum(),
            torch.where(clean, gamma, zero).sum(), clean.sum(), (clean & (gamma <= 0)).sum(),
            torch.zeros_like(gamma[0])]).double()
        # Masked by where (not multiplied): a NaN loss must not reach the statistics.
        return cls.unpack(torch.where(finite, sums, torch.zeros_like(sums)))

    def pack(self) -> torch.Tensor:
        """The fields as one float64 tensor, in field order."""
        return torch.stack(tuple(self))

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> StepStatistics:
        return cls(*packed.unbind())

    def add(self, other: StepStatistics) -> StepStatistics:
        return self.unpack(self.pack() + other.pack().to(self.loss_sum.device))

    def with_grad_norm(self, grad_norm: torch.Tensor) -> StepStatistics:
        """These sums plus one optimizer step's gradient norm."""
        return self._replace(grad_norm_sum=self.grad_norm_sum
                             + grad_norm.detach().float().to(self.grad_norm_sum))

    def all_reduced(self) -> StepStatistics:
        """Summed over the processes of the group: one collective for every field."""
        packed = self.pack()
        dist.all_reduce(packed)
        return self.unpack(packed)

    def metrics(self, steps: int, world: int) -> dict[str, float]:
        """The logged means (one host synchronisation); ``steps`` optimizer steps per process,
        ``world`` processes summed."""
        s = self.unpack(self.pack().cpu())._asdict()
        s = {k: float(v) for k, v in s.items()}
        return {"loss": s["loss_sum"] / max(s["minibatches"], 1),
                "gamma_adv": s["gamma_adv_sum"] / max(s["adv"], 1),
                "p_gamma_pos_adv": s["gamma_pos_adv"] / max(s["adv"], 1),
                "gamma_clean": s["gamma_clean_sum"] / max(s["clean"], 1),
                "p_gamma_nonpos_clean": s["gamma_nonpos_clean"] / max(s["clean"], 1),
                "grad_norm": s["grad_norm_sum"] / max(steps * world, 1)}
