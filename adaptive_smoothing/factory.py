"""Build the composite model that a config's ``forward_settings`` describes; load its weights."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch

from adaptive_smoothing.config import Config, ConfigError, ForwardSettings, NonlinearSettings
from adaptive_smoothing.models import BaseClassifier, CompositeModel, MixingNet, create_model
from adaptive_smoothing.models.composite import Mixer
from adaptive_smoothing.models.gate import LogitGate
from adaptive_smoothing.models.nonlinear import NonlinearComposite
from adaptive_smoothing.models.robustbench_zoo import (DATASET_BY_CLASSES, ZOO_THREAT_MODEL,
                                                       is_zoo_name, zoo_model_name)
from adaptive_smoothing.published import std_alternative, weight_file_for
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
        alpha_scale=fwd.alpha_scale, alpha_bias=fwd.alpha_bias,
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


def robustbench_model_dir(fwd: ForwardSettings) -> Path:
    """robustbench's local model folder for ``robustbench:<Name>`` base models (the derived
    default is ``log_dir/robustbench``; robustbench's own ``models`` where none is set)."""
    return Path(fwd.robustbench_model_dir or "models")


def zoo_file(fwd: ForwardSettings, which: str, num_classes: int) -> Optional[Path]:
    """Where robustbench keeps the weights of a ``robustbench:<Name>`` STD/ROB (``which``),
    ``<model_dir>/<dataset>/Linf/<Name>.pt``; None for a registry architecture."""
    name = getattr(fwd, f"{which}_model_type")
    if not is_zoo_name(name):
        return None
    return (robustbench_model_dir(fwd) / DATASET_BY_CLASSES.get(num_classes, "unknown")
            / ZOO_THREAT_MODEL / f"{zoo_model_name(name)}.pt")


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


def checkpoint_paths(config: Config) -> dict[str, Optional[Path]]:
    """The checkpoint files the composite is loaded from: std, rob, comp (None: no mixer file)."""
    comp = (config.model_path("comp") if config.forward_settings.use_policy
            and not config.nonlinear_settings.enabled else None)
    classes = config.dataset_settings.num_classes
    # A RobustBench base model's weights are robustbench's file, not model_load_path's.
    std = zoo_file(config.forward_settings, "std", classes) or _existing_std_path(config)
    rob = zoo_file(config.forward_settings, "rob", classes) or config.model_path("rob")
    return {"std": std, "rob": rob, "comp": comp}


def load_composite_weights(composite: Composite, config: Config) -> None:
    """Load the checkpoints of ``config.model_load_path`` (relative to ``log_dir``).

    STD and ROB are always loaded; the mixer when ``comp`` is set and the model has one.
    All files are checked before any is loaded (see ``checkpoints.load_authors_checkpoints``).
    """
    from adaptive_smoothing.checkpoints import load_authors_checkpoints

    require_checkpoint_files(config)
    fwd, classes = config.forward_settings, config.dataset_settings.num_classes
    # RobustBench base models came with their weights (robustbench's load_model).
    std_path = None if zoo_file(fwd, "std", classes) else _existing_std_path(config)
    rob_path = None if zoo_file(fwd, "rob", classes) else config.model_path("rob")
    for which, zoo in (("std", fwd.std_model_type), ("rob", fwd.rob_model_type)):
        if is_zoo_name(zoo):
            logger.info("model_load_path.%s is ignored: %s has robustbench's weights", which, zoo)
    mixer_path = config.model_path("comp")
    if config.nonlinear_settings.enabled:
        mixer_path = None  # the nonlinear composite has no mixing network
    if mixer_path is not None and composite.mixer is None:
        logger.warning("model_load_path.comp (%s) is ignored: forward_settings.use_policy is "
                       "false, so the model has no mixing network", mixer_path)
        mixer_path = None
    if mixer_path is None and composite.mixer is not None:
        logger.info("no mixer checkpoint (model_load_path.comp is None): the mixing network "
                    "keeps its random initial weights")
    load_authors_checkpoints(composite, std_path, rob_path, mixer_path)


def require_checkpoint_files(config: Config) -> None:
    """Raise CheckpointNotFoundError, naming the script that makes or downloads it, for the
    first checkpoint of ``model_load_path`` that does not exist (before building large models)."""
    from adaptive_smoothing.checkpoints import CheckpointNotFoundError

    fwd = config.forward_settings
    for which, path in checkpoint_paths(config).items():
        if which != "comp" and is_zoo_name(getattr(fwd, f"{which}_model_type")):
            continue  # robustbench downloads a missing zoo file itself
        if path is not None and not path.is_file():
            # The full path, and what a relative log_dir resolves against: run from another
            # folder, "demo/std.pt" alone does not say where it was looked for.
            cwd = ("" if Path(config.log_dir).is_absolute()
                   else f", itself relative to the working directory {Path.cwd()}")
            raise CheckpointNotFoundError(
                f"checkpoint file not found: {path.absolute()} (model_load_path.{which} = "
                f"{getattr(config.model_load_path, which)!r} of {config.source or 'the config'}"
                f", relative to log_dir {config.log_dir!r}{cwd}); "
                f"{_how_to_make(config, which, path)}")


def _how_to_make(config: Config, which: str, path: Path) -> str:
    """Which script makes or downloads a missing checkpoint."""
    published = weight_file_for(getattr(config.model_load_path, which))
    if published is not None:
        return (f"it is a published checkpoint: python3 scripts/download_models.py "
                f"--root-dir {config.log_dir} --only {published.name}")
    if which == "comp":
        return ("train a mixer with run.py --training (it writes OUTPUT_DIR/checkpoints/"
                "last.pt), or set model_load_path.comp to None for an untrained one")
    return (f"train it with python3 scripts/train_base.py --output {path} (see "
            "scripts/reproduce_rn18_cpu.sh for both base models), or use the trained "
            "ResNet-18s in demo/ (configs/demo.yaml)")


def _existing_std_path(config: Config) -> Path:
    """``model_load_path.std``, or the first accepted other name of it that exists: the published
    table's names for a published STD file, else the other suffix (.tar <-> .pt)."""
    path = config.model_path("std")
    assert path is not None  # model_load_path.std is a required key
    published = weight_file_for(config.model_load_path.std)
    if published is not None:
        candidates = published.candidates(config.log_dir)
        candidates = (path, *(c for c in candidates if c != path))
    else:
        candidates = (path, *filter(None, [std_alternative(path)]))
    for candidate in candidates:
        if candidate.exists():
            if candidate != path:
                logger.info("STD checkpoint %s not found; using %s", path, candidate)
            return candidate
    return path
