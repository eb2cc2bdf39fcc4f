"""The settings of the randomized training attacks: the config's ``randomized_attack_settings``
section and the arguments of ``attacks.generate_training_attacks`` (one class for both).

Apart from the attacks so that the config package loads and validates without torch.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Norm", "RandomizedAttackSettings"]

Norm = Literal["Linf", "L2"]


class RandomizedAttackSettings(BaseModel):
    """Settings of the randomized attacks that generate the mixer's adversarial training data.

    Per run: iterations = max(1, round(chi2(iters_df) + iters_const)). Per run and sample:
    eps_i = eps * U(eps_factor_loc, eps_factor_loc + eps_factor_scale), w_i ~ U(0, comp_loss_wmax)
    and, for PGD, momentum decay ~ U(mom_decay_loc, mom_decay_loc + mom_decay_scale).
    The eps, iteration and w defaults are the paper's (docs/METHOD.md, "Training"); the PGD-only
    defaults (momentum, alpha_factor) are this project's choice. The field names are the keys of
    the config's ``randomized_attack_settings`` section; ``eps``, ``norm`` and ``n_target`` are
    the training threat model (in the authors' layout: ``pgd_settings``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    eps: float = Field(8 / 255, ge=0, description="attack radius before the per-sample factor")
    norm: Norm = Field("Linf", description="threat model: 'Linf' or 'L2'")
    n_target: int = Field(9, ge=0, description="targeted runs (APGD-T / targeted PGD) after the "
                          "untargeted one; targets are the 2nd .. (n_target + 1)-th classes")
    apgd: bool = Field(True, description="APGD (true) or PGD with random momentum (false)")
    random_start: bool = Field(True, description="random start of the training attacks")
    eps_factor_loc: float = Field(0.4, ge=0, description="eps_i = eps * U(loc, loc + scale)")
    eps_factor_scale: float = Field(0.7, ge=0, description="see eps_factor_loc")
    mom_decay_loc: float = Field(0.1, ge=0, le=1,
                                 description="PGD momentum ~ U(loc, loc + scale); loc + scale "
                                 "<= 1")
    mom_decay_scale: float = Field(0.3, ge=0, le=1, description="see mom_decay_loc")
    iters_df: float = Field(75.0, gt=0,
                            description="iterations = max(1, round(chi2(iters_df) + "
                            "iters_const))")
    iters_const: float = Field(0.0, description="see iters_df")
    alpha_factor: float = Field(2.5, gt=0,
                                description="PGD step = eps / iterations * alpha_factor")
    comp_loss_wmax: float = Field(0.4, ge=0, le=1,
                                  description="BCE weight w ~ U(0, comp_loss_wmax)")

    @model_validator(mode="after")
    def _momentum_range_within_one(self) -> "RandomizedAttackSettings":
        total = self.mom_decay_loc + self.mom_decay_scale
        if total > 1 + 1e-12:
            raise ValueError(f"expected mom_decay_loc + mom_decay_scale <= 1 (mom_decay_scale = "
                             f"{self.mom_decay_scale}, sum = {total})")
        return self
