"""The settings of the randomized training attacks: the config's ``randomized_attack_settings``
section and the arguments of ``attacks.generate_training_attacks`` (one class for both).

Apart from the attacks so that the config package loads and validates without torch.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Norm", "RandomizedAttackSettings"]

Norm = Literal["Linf", "L2"]


# What each field affects (config/provenance.py): eps, norm and n_target are copies of
# pgd_settings' keys, which declare it.
_SHAPES_WEIGHTS = {"affects": ["weights"]}
_COPY: dict = {"affects": []}


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

    eps: float = Field(8 / 255, ge=0, description="attack radius before the per-sample factor",
                       json_schema_extra=_COPY)
    norm: Norm = Field("Linf", description="threat model: 'Linf' or 'L2'",
                       json_schema_extra=_COPY)
    n_target: int = Field(9, ge=0, description="targeted runs (APGD-T / targeted PGD) after the "
                          "untargeted one; targets are the 2nd .. (n_target + 1)-th classes",
                          json_schema_extra=_COPY)
    apgd: bool = Field(True, description="APGD (true) or PGD with random momentum (false)",
                       json_schema_extra=_SHAPES_WEIGHTS)
    random_start: bool = Field(True, description="random start of the training attacks",
                               json_schema_extra=_SHAPES_WEIGHTS)
    eps_factor_loc: float = Field(0.4, ge=0, description="eps_i = eps * U(loc, loc + scale)",
                                  json_schema_extra=_SHAPES_WEIGHTS)
    eps_factor_scale: float = Field(0.7, ge=0, description="see eps_factor_loc",
                                    json_schema_extra=_SHAPES_WEIGHTS)
    mom_decay_loc: float = Field(0.1, ge=0, le=1,
                                 description="PGD momentum ~ U(loc, loc + scale); loc + scale "
                                 "<= 1",
                                 json_schema_extra=_SHAPES_WEIGHTS)
    mom_decay_scale: float = Field(0.3, ge=0, le=1, description="see mom_decay_loc",
                                   json_schema_extra=_SHAPES_WEIGHTS)
    iters_df: float = Field(75.0, gt=0,
                            description="iterations = max(1, round(chi2(iters_df) + "
                            "iters_const))",
                            json_schema_extra=_SHAPES_WEIGHTS)
    iters_const: float = Field(0.0, description="see iters_df",
                               json_schema_extra=_SHAPES_WEIGHTS)
    alpha_factor: float = Field(2.5, gt=0,
                                description="PGD step = eps / iterations * alpha_factor",
                                json_schema_extra=_SHAPES_WEIGHTS)
    comp_loss_wmax: float = Field(0.4, ge=0, le=1,
                                  description="BCE weight w ~ U(0, comp_loss_wmax)",
                                  json_schema_extra=_SHAPES_WEIGHTS)
    curriculum_steps: int = Field(
        0, ge=0, description="adversarial fine-tuning curriculum: over the first this many "
        "optimizer steps, `comp_loss_wmax` and the attack radius (the eps factor's "
        "distribution) ramp linearly from 0, times min(1, step / curriculum_steps) "
        "(docs/TRAINING.md, \"Curriculum\"); 0 = off", json_schema_extra=_SHAPES_WEIGHTS)

    @model_validator(mode="after")
    def _momentum_range_within_one(self) -> "RandomizedAttackSettings":
        total = self.mom_decay_loc + self.mom_decay_scale
        if total > 1 + 1e-12:
            raise ValueError(f"expected mom_decay_loc + mom_decay_scale <= 1 (mom_decay_scale = "
                             f"{self.mom_decay_scale}, sum = {total})")
        return self
