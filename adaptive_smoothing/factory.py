"""Build the composite model that a config's ``forward_settings`` describes; load its weights."""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from adaptive_smoothing.config import ConfigError, ForwardSettings, NonlinearSettings
from adaptive_smoothing.models import BaseClassifier, CompositeModel, MixingNet, create_model
from adaptive_smoothing.models.composite import Mixer
from adaptive_smoothing.models.gate import LogitGate
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

    mixer = _build_mixer(fwd, std_model, rob_model, num_classes, source) if fwd.use_policy \
        else None

    if not fwd.policy_graph:
        logger.warning("forward_settings.policy_graph is false: the mixing network's inputs are "
                       "detached, which hides the mixer from gradient-based attacks. Robust "
                       "accuracy measured with this model is NOT VALID (overstated).")
    composite = CompositeModel(
        std_model, rob_model, mixer,
        std_scale=fwd.std_model_scale, rob_scale=fwd.rob_model_scale, gamma=fwd.gamma,
        train_gamma=fwd.gamma_consts.train, eval_gamma=fwd.gamma_consts.eval,
        alpha_scale=fwd.alpha_scale, alpha_bias=fwd.alpha_bias, gamma_norm=fwd.gamma_norm,
        unsafe_detach_mixer_inputs=not fwd.policy_graph, mixer_inputs=fwd.mixer_inputs)
    logger.info("built composite: STD %s, ROB %s, mixer %s", fwd.std_model_type,
                fwd.rob_model_type, _describe_mixer(mixer, fwd.mixer_inputs))
    return composite.to(resolve_device(device))


def _build_mixer(fwd: ForwardSettings, std_model: BaseClassifier, rob_model: BaseClassifier,
                 num_classes: int, source: Optional[str]) -> Mixer:
    """The mixer that ``forward_settings.mixer_inputs`` names (docs/METHOD.md, "Mixer
    inputs"): the mixing network on both models' features or ROB's, or the logit gate."""
    if fwd.mixer_inputs == "rob_logits":
        # The gate reads logits only: no feature maps, so in_planes does not apply.
        if fwd.in_planes is not None:
            logger.info("forward_settings.in_planes is not used: the rob_logits gate reads no "
                        "feature maps")
        return LogitGate(num_classes)
    # Only a mixing network reads features (a RobustBench model may have none), and only those
    # of the models it reads.
    if fwd.mixer_inputs == "both":
        channels = _first_feature_channels(std_model, rob_model, source)
        given = None if fwd.in_planes is None else tuple(fwd.in_planes)
        read: tuple[int, ...] = channels
    else:
        channels = (_feature_channels(rob_model, source),)
        given = None if fwd.in_planes is None else (fwd.in_planes[1],)  # ROB's entry
        read = channels
    if given is not None and given != channels:
        models = (f"base models {channels}" if len(channels) == 2
                  else f"ROB model {channels[0]} as the second entry")
        raise ConfigError(f"expected the first-feature channels of the {models} (or None to "
                          f"read them from the models)", key="forward_settings.in_planes",
                          value=fwd.in_planes, file=source)
    return MixingNet(read, version=fwd.pn_version, width=fwd.mixer_width)


def _describe_mixer(mixer: Optional[Mixer], inputs: str) -> str:
    if isinstance(mixer, MixingNet):
        width = "" if mixer.width is None else f", width x{mixer.width:g}"
        return f"V{mixer.version} on {inputs} {mixer.in_planes}{width}"
    if isinstance(mixer, LogitGate):
        return f"logit gate on ROB's top-{mixer.top_k} logits"
    return "none"


def _first_feature_channels(std_model: BaseClassifier, rob_model: BaseClassifier,
                            source: Optional[str]) -> tuple[int, int]:
    return (_feature_channels(std_model, source), _feature_channels(rob_model, source))


def _feature_channels(model: BaseClassifier, source: Optional[str]) -> int:
    try:
        return model.feature_channels[0]
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
