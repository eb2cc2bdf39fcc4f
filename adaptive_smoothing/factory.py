"""Build the composite model that a config's ``forward_settings`` describes; load its weights."""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from adaptive_smoothing.config import ConfigError, ForwardSettings, NonlinearSettings
from adaptive_smoothing.models import BaseClassifier, CompositeModel, MixingNet, create_model
from adaptive_smoothing.models.nonlinear import NonlinearComposite
from adaptive_smoothing.models.robustbench_zoo import is_zoo_name
from adaptive_smoothing.prepare import CheckpointFiles, robustbench_model_dir
from adaptive_smoothing.runtime import resolve_device

logger = logging.getLogger(__name__)


Composite = Union[CompositeModel, NonlinearComposite]


def build_composite(model: ForwardSettings, num_classes: int,
                    device: Union[str, torch.device] = "cpu", *,
                    source: Optional[str] = None,
                    nonlinear: Optional[NonlinearSettings] = None) -> Composite:
    """Base models (random weights), the mixing network and the composite that ``model`` (the
    config's ``forward_settings``) describes, on ``device``; with ``nonlinear`` enabled (the
    config's ``nonlinear_settings``) the nonlinear composite of the same base models instead.
    ``source`` names the config file in errors. Weights are loaded separately by
    :func:`load_composite_weights`."""
    fwd = model
    std_kwargs = dict(fwd.std_model_kwargs)
    if fwd.std_resize is not None:
        std_kwargs["resize_to"] = fwd.std_resize
    rob_kwargs = dict(fwd.rob_model_kwargs)
    for name, kwargs in ((fwd.std_model_type, std_kwargs), (fwd.rob_model_type, rob_kwargs)):
        if is_zoo_name(name):
            kwargs.setdefault("model_dir", robustbench_model_dir(fwd))
    std_model = _create("std", fwd.std_model_type, num_classes, std_kwargs, source)
    rob_model = _create("rob", fwd.rob_model_type, num_classes, rob_kwargs, source)
    if nonlinear is not None and nonlinear.enabled:
        nl = nonlinear
        composite = NonlinearComposite(
            std_model, rob_model, alpha=nl.alpha, s=nl.s, p=nl.p, c=nl.c, clamp=nl.clamp,
            k=nl.k, std_map=nl.std_map, std_scale=fwd.std_model_scale,
            rob_scale=fwd.rob_model_scale, surrogate_alpha=nl.surrogate_alpha,
            surrogate_raw_share=nl.surrogate_raw_share)
        logger.info("built nonlinear composite: STD %s (%s), ROB %s (LN-%s-power-scale s=%g "
                    "p=%g c=%g), alpha %g", fwd.std_model_type, nl.std_map, fwd.rob_model_type,
                    nl.clamp, nl.s, nl.p, nl.c, nl.alpha)
        return composite.to(resolve_device(device))

    mixer: Optional[MixingNet] = None
    channels: Optional[tuple[int, int]] = None
    if fwd.use_policy:
        # Only a mixer reads features (a RobustBench model may have none).
        channels = _first_feature_channels(std_model, rob_model, source)
        if fwd.in_planes is not None and tuple(fwd.in_planes) != channels:
            raise ConfigError(f"expected the first-feature channels of the base models "
                              f"{channels} (or None to read them from the models)",
                              key="forward_settings.in_planes", value=fwd.in_planes,
                              file=source)
        mixer = MixingNet(channels, version=fwd.pn_version)

    if not fwd.policy_graph:
        logger.warning("forward_settings.policy_graph is false: the mixing network's inputs are "
                       "detached, which hides the mixer from gradient-based attacks. Robust "
                       "accuracy measured with this model is NOT VALID (overstated).")
    composite = CompositeModel(
        std_model, rob_model, mixer,
        std_scale=fwd.std_model_scale, rob_scale=fwd.rob_model_scale, gamma=fwd.gamma,
        train_gamma=fwd.gamma_consts.train, eval_gamma=fwd.gamma_consts.eval,
        alpha_scale=fwd.alpha_scale, alpha_bias=fwd.alpha_bias,
        unsafe_detach_mixer_inputs=not fwd.policy_graph)
    logger.info("built composite: STD %s, ROB %s, mixer %s", fwd.std_model_type,
                fwd.rob_model_type, f"V{fwd.pn_version} {channels}" if mixer else "none")
    return composite.to(resolve_device(device))


def _first_feature_channels(std_model: BaseClassifier, rob_model: BaseClassifier,
                            source: Optional[str]) -> tuple[int, int]:
    try:
        return (std_model.feature_channels[0], rob_model.feature_channels[0])
    except ValueError as err:  # a RobustBench architecture without known feature modules
        raise ConfigError(str(err), key="forward_settings.use_policy", value=True,
                          file=source) from None


def _create(which: str, name: str, num_classes: int, kwargs: dict,
            source: Optional[str]) -> BaseClassifier:
    try:
        return create_model(name, num_classes=num_classes, **kwargs)
    except (ValueError, ImportError) as err:
        if is_zoo_name(name) or isinstance(err, ImportError):
            # An unknown zoo name, or robustbench missing: the model type is at fault.
            raise ConfigError(str(err), key=f"forward_settings.{which}_model_type", value=name,
                              file=source) from None
        raise ConfigError(f"cannot build {name!r} with these arguments: {err}",
                          key=f"forward_settings.{which}_model_kwargs", value=kwargs,
                          file=source) from None
    except TypeError as err:
        # Bad architecture arguments come from the config's *_model_kwargs (or std_resize).
        raise ConfigError(f"cannot build {name!r} with these arguments: {err}",
                          key=f"forward_settings.{which}_model_kwargs", value=kwargs,
                          file=source) from None


def load_composite_weights(composite: Composite, files: CheckpointFiles) -> None:
    """Load the base models' and the mixer's weights from ``files`` (:func:`prepare.prepare`
    resolved and checked them). A RobustBench base came with its weights (robustbench's
    load_model). All files are checked before any is loaded
    (see ``checkpoints.load_authors_checkpoints``)."""
    from adaptive_smoothing.checkpoints import load_authors_checkpoints

    mixer = files.comp if composite.mixer is not None else None
    load_authors_checkpoints(composite, None if "std" in files.zoo else files.std,
                             None if "rob" in files.zoo else files.rob, mixer)
