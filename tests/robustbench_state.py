"""Robustbench's ``CompositeModel`` state dict <-> ours: the equivalence tests' instrument for
comparing our composite with robustbench's tensor by tensor (the package itself loads
RobustBench's three files, ``checkpoints.load_robustbench_checkpoints``)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from adaptive_smoothing.checkpoints import (CheckpointError, StateDict, check_state_dict,
                                            strip_prefixes)
from adaptive_smoothing.models import CompositeConstants, CompositeModel


# -- robustbench's CompositeModel state dict ------------------------------------------------
# robustbench prefix -> ours. Its six constants are scalar Parameters; ours are plain floats.
_ROBUSTBENCH_PREFIXES = {"models.0.": "std_model.", "models.1.": "rob_model.",
                         "policy_net.": "mixer.", "bn.": "gamma_bn."}
_ROBUSTBENCH_CONSTANTS = ("gamma_scale", "gamma_bias", "alpha_scale", "alpha_bias",
                          "std_scale", "rob_scale")


def from_robustbench_state_dict(state: Mapping[str, torch.Tensor],
                                source: str = "robustbench state dict"
                                ) -> tuple[StateDict, CompositeConstants]:
    """Convert robustbench's ``CompositeModel`` (or its wrapper's) state dict to ours.

    Returns our composite state dict and the constants robustbench stores as Parameters.
    """
    if any(key.startswith("comp_model.") for key in state):
        # CompositeModelWrapper(parallel=False) registers the same module twice, as comp_model
        # and _comp_model, so its state dict holds every tensor under both prefixes.
        state = {key[len("comp_model."):]: value for key, value in state.items()
                 if key.startswith("comp_model.")}
    state = strip_prefixes(state, ("module.",))
    ours: StateDict = {}
    values: dict[str, float] = {}
    unknown = []
    for key, value in state.items():
        if key in _ROBUSTBENCH_CONSTANTS:
            if value.numel() != 1:
                raise CheckpointError(f"{source}: constant {key!r} has shape "
                                      f"{tuple(value.shape)}; expected a scalar")
            values[key] = _float32_to_decimal(value)
            continue
        for theirs, mine in _ROBUSTBENCH_PREFIXES.items():
            if key.startswith(theirs):
                ours[mine + key[len(theirs):]] = value
                break
        else:
            unknown.append(key)
    missing = [key for key in _ROBUSTBENCH_CONSTANTS if key not in values]
    if unknown or missing:
        raise CheckpointError(f"{source}: not a robustbench CompositeModel state dict: "
                              f"unknown keys {_first(unknown)}, missing constants {missing}; "
                              f"expected keys under {list(_ROBUSTBENCH_PREFIXES)} and the "
                              f"constants {list(_ROBUSTBENCH_CONSTANTS)}")
    try:
        constants = CompositeConstants(
            std_scale=values["std_scale"], rob_scale=values["rob_scale"],
            eval_gamma=(values["gamma_scale"], values["gamma_bias"]),
            alpha_scale=values["alpha_scale"], alpha_bias=values["alpha_bias"])
    except ValueError as exc:
        raise CheckpointError(f"{source}: invalid constants: {exc}") from exc
    return ours, constants


def to_robustbench_state_dict(composite: CompositeModel) -> StateDict:
    """Our composite as a state dict of robustbench's ``CompositeModel`` (no wrapper prefix)."""
    assert composite.mixer is not None, "robustbench's CompositeModel always has a mixer"
    back = {mine: theirs for theirs, mine in _ROBUSTBENCH_PREFIXES.items()}
    state: StateDict = {}
    for key, value in composite.state_dict().items():
        prefix = next(p for p in back if key.startswith(p))
        state[back[prefix] + key[len(prefix):]] = value
    constants = CompositeConstants.from_composite(composite)
    for name, value in (("gamma_scale", constants.eval_gamma[0]),
                        ("gamma_bias", constants.eval_gamma[1]),
                        ("alpha_scale", constants.alpha_scale),
                        ("alpha_bias", constants.alpha_bias),
                        ("std_scale", constants.std_scale), ("rob_scale", constants.rob_scale)):
        state[name] = torch.tensor(value, dtype=torch.float32)
    return state


def load_robustbench_state_dict(composite: CompositeModel, state: Mapping[str, torch.Tensor],
                                source: str = "robustbench state dict") -> None:
    """Load robustbench's composite state dict into ``composite``, constants included."""
    ours, constants = from_robustbench_state_dict(state, source)
    check_state_dict(composite, ours, source=source,
                     expected="robustbench CompositeModel weights converted to ours")
    composite.load_state_dict(ours, strict=True)
    constants.apply_to(composite)


def _float32_to_decimal(value: torch.Tensor) -> float:
    # robustbench keeps constants as float32 (0.96 -> 0.9599999785); the shortest decimal that
    # rounds to the same float32 recovers the intended value.
    return float(str(np.float32(value.detach().cpu().reshape(()).item())))


def _first(keys: list) -> str:
    return "[" + ", ".join(repr(k) for k in keys[:5]) + "]" + (
        f" and {len(keys) - 5} more" if len(keys) > 5 else "")
