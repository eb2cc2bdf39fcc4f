"""Reading, checking and writing every checkpoint format of the project (docs/METHOD.md,
"Published models").

Formats read:

- STD (BiT): a torch file whose ``"model"`` entry is the state_dict (``module.`` prefix from
  DataParallel), a plain state_dict, or BiT's own ``.npz`` release (TensorFlow names).
- ROB: EDM (DM-Improves-AT) files hold ``"model_state_dict"`` with keys prefixed ``module.0.``;
  DeepMind's TRADES files are a plain state_dict.
- Mixer: ``{"model": mixing-network state_dict, "bn": gamma BatchNorm state, ...training state}``
  (the logit gate's state dict in ``"model"`` likewise; a file of another mixer kind than the
  config's is refused naming ``forward_settings.mixer_inputs``).
- RobustBench: three files per model (BiT state_dict, WRN state_dict, ``{"model", "bn"}``).
  (Converting robustbench's in-memory ``CompositeModel`` state dict is test code:
  tests/robustbench_state.py, used by the equivalence tests.)

Checkpoints come from the internet, so every torch file is read with ``weights_only=True`` and
``.npz`` files with ``allow_pickle=False``. Every problem with a file raises
:class:`CheckpointError` naming the file, what was expected and the first differing keys/shapes.
Loading validates every part against the module first and only then copies, so a failed load
changes nothing.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from adaptive_smoothing.errors import UserError
from adaptive_smoothing.models.bit import ResNetV2
from adaptive_smoothing.models.composite import CompositeModel
from adaptive_smoothing.models.gate import MARGIN_PARAMETER, LogitGate
from adaptive_smoothing.models.mixing import MixingNet
# Re-exported: it lives beside the composite.
from adaptive_smoothing.models.constants import CompositeConstants  # noqa: F401
from adaptive_smoothing.persist import write_atomic

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]

# How many offending keys an error message lists before it says "and N more".
_SHOWN = 5
# The mixing network's first BatchNorm: its width is the channel count of the features it reads.
_FIRST_MIXER_BN = "layers.0.0.bn1.weight"

STD_FORMAT = ("STD checkpoint: a torch file whose 'model' entry is the BiT state_dict "
              "('module.' prefix allowed), a plain BiT state_dict, or BiT's .npz release")
ROB_FORMAT = ("ROB checkpoint: a torch file whose 'model_state_dict' entry is the WideResNet "
              "state_dict (EDM, keys prefixed 'module.0.'), or a plain state_dict (TRADES)")
ROBUSTBENCH_STD_FORMAT = "RobustBench file 0: the BiT state_dict"
ROBUSTBENCH_ROB_FORMAT = "RobustBench file 1: the WideResNet state_dict"
BASE_TRAINING_FORMAT = ("base-training checkpoint (scripts/train_base.py): a torch file with entries "
                        "'model' (state_dict), 'arch' and 'num_classes'")
MIXER_FORMAT = ("mixer checkpoint: a torch file with entries 'model' (mixing-network state_dict) "
                "and 'bn' (gamma BatchNorm state)")


# How scripts/train_base.py records its training method ("method" entry): which are adversarial.
STANDARD_METHODS = ("standard",)
ADVERSARIAL_METHODS = ("pgd", "fgsm")


def std_format(module: nn.Module) -> str:
    """STD_FORMAT naming ``module``'s architecture (a ResNet-18 STD is no BiT state_dict)."""
    if isinstance(module, ResNetV2):
        return STD_FORMAT
    arch = type(module).__name__
    return (f"STD checkpoint: a torch file whose 'model' entry is the {arch} state_dict "
            f"('module.' prefix allowed), or a plain {arch} state_dict")


def rob_format(module: nn.Module) -> str:
    """ROB_FORMAT naming ``module``'s architecture."""
    arch = type(module).__name__
    if arch == "WideResNet":
        return ROB_FORMAT
    return (f"ROB checkpoint: a torch file whose 'model_state_dict' or 'model' entry is the "
            f"{arch} state_dict ('module.' / 'module.0.' prefixes allowed), or a plain {arch} "
            "state_dict")


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable, or does not match the model it is loaded into."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file does not exist (also a FileNotFoundError)."""


# -- reading files --------------------------------------------------------------------------
def read_checkpoint(path: PathLike, expected: str = "a torch.save file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with clear errors.

    ``expected`` describes the format the caller wants, for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    # Mapping the file keeps the tensors in the page cache until they are copied into the model,
    # instead of a second in-memory copy (2.3 GB for a published model). Only torch's zip format
    # (the default since 1.6) can be mapped; older files and non-zip junk are read normally.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises several types for corrupt input; all mean "bad file"
        raise CheckpointError(f"{path}: unreadable, {_describe_unreadable(path, exc)}; "
                              f"expected {expected}") from exc


def read_entries(path: PathLike, keys: Sequence[str], expected: str) -> Mapping[str, Any]:
    """A checkpoint that is a dict holding every entry of ``keys``; otherwise CheckpointError
    naming the file and the missing entries."""
    obj = read_checkpoint(path, expected)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected {expected}; the file holds a "
                              f"{type(obj).__name__}, not a dict")
    missing = [key for key in keys if key not in obj]
    if missing:
        raise CheckpointError(f"{path}: expected {expected}; missing entries {missing} "
                              f"(found {_first(list(obj))})")
    return obj


def _describe_unreadable(path: Path, exc: Exception) -> str:
    with open(path, "rb") as handle:
        head = handle.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "it is an HTML page, probably a failed download (e.g. a login or quota page)"
    if not head:
        return "the file is empty"
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return (f"it needs code to unpickle (GLOBAL {match.group(1)}), which weights_only=True "
                f"refuses because files from the internet are untrusted")
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", text)
    if match:
        detail = match.group(1)
    else:
        first_line = text.strip().splitlines()[0] if text.strip() else ""
        detail = f"{type(exc).__name__}: {first_line}"
    if head.startswith(b"pk"):
        return f"a zip archive that is truncated or not a torch file ({detail})"
    return f"not a torch checkpoint ({detail})"


def extract_state_dict(obj: Any, source: PathLike, *, entries: Sequence[str],
                       prefixes: Sequence[str], expected: str) -> StateDict:
    """The state dict inside a loaded checkpoint: ``obj[entry]`` for the first present entry,
    else ``obj`` itself if it is a plain state dict. Wrapper prefixes (``module.`` from
    DataParallel, ``0.`` from nn.Sequential) are removed while every key carries them.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected {expected}; the file holds a "
                              f"{type(obj).__name__}, not a dict")
    for entry in entries:
        if entry in obj:
            state = obj[entry]
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{source}: expected {expected}; entry {entry!r} is a "
                                      f"{type(state).__name__}, not a state_dict")
            where = f"entry {entry!r}"
            break
    else:
        state, where = obj, "top level"
    state = dict(state)
    if not state:
        raise CheckpointError(f"{source}: expected {expected}; the state_dict ({where}) is empty")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        found = f"top-level keys {_first(list(obj))}" if where == "top level" else where
        raise CheckpointError(f"{source}: expected {expected}; found {found}, whose values "
                              f"are not all tensors (e.g. {_first(not_tensors)})")
    return strip_prefixes(state, prefixes)


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> StateDict:
    """Remove each prefix in turn if every key starts with it (DataParallel, nn.Sequential)."""
    state = dict(state)
    for prefix in prefixes:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def read_bit_npz(path: PathLike, model: ResNetV2) -> StateDict:
    """BiT's TensorFlow-named ``.npz`` release as a state dict of ``model``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except MemoryError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as BiT's .npz weights "
                              f"(allow_pickle=False): {exc}") from exc
    names = model.tf_names()
    missing = [theirs for theirs in names.values() if theirs not in arrays]
    if missing:
        raise CheckpointError(f"{path}: expected {STD_FORMAT}; the .npz lacks {len(missing)} "
                              f"of the {len(names)} TensorFlow arrays, e.g. {_first(missing)}")
    return model.state_dict_from_npz(arrays)


def read_std_state_dict(path: PathLike, model: Optional[ResNetV2] = None) -> StateDict:
    """The STD (BiT) weights of a torch file or, with ``model`` given, of BiT's ``.npz``."""
    if Path(path).suffix == ".npz":
        if model is None:
            raise ValueError(f"{path}: reading BiT's .npz needs the model for its name table")
        return read_bit_npz(path, model)
    return extract_state_dict(read_checkpoint(path, STD_FORMAT), path,
                              entries=("model", "state_dict"), prefixes=("module.",),
                              expected=STD_FORMAT)


def read_rob_state_dict(path: PathLike) -> StateDict:
    """The ROB (DeepMind WRN) weights: EDM's ``model_state_dict`` or a plain state dict."""
    # "model.": RobustBench's load_model strips it too (its single-file zoo entries, e.g. the
    # MixedNUTS ROB Peng2023Robust.pt, may carry it).
    return extract_state_dict(read_checkpoint(path, ROB_FORMAT), path,
                              entries=("model_state_dict", "state_dict", "model"),
                              prefixes=("module.", "0.", "model."), expected=ROB_FORMAT)


def read_mixer_state_dicts(path: PathLike) -> tuple[StateDict, StateDict]:
    """``(mixer state dict, gamma BN state dict)`` of a mixer checkpoint.

    Training state stored beside them (optimizer, schedulers, epoch, ...) is ignored.
    """
    obj = read_checkpoint(path, MIXER_FORMAT)
    if not isinstance(obj, Mapping) or "model" not in obj or "bn" not in obj:
        found = _first(list(obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: expected {MIXER_FORMAT}; found {found}")
    mixer = extract_state_dict(obj["model"], f"{path} entry 'model'", entries=(),
                               prefixes=("module.",), expected="the mixing network state_dict")
    bn = extract_state_dict(obj["bn"], f"{path} entry 'bn'", entries=(),
                            prefixes=("module.",), expected="the gamma BatchNorm1d state")
    return mixer, bn


# -- checking and loading -------------------------------------------------------------------
def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: PathLike,
                     expected: str) -> None:
    """Raise CheckpointError unless ``state`` has exactly ``module``'s keys and shapes."""
    ours = module.state_dict()
    missing = [key for key in ours if key not in state]
    unexpected = [key for key in state if key not in ours]
    wrong = [key for key in ours if key in state
             and tuple(state[key].shape) != tuple(ours[key].shape)]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if wrong:
        shapes = ", ".join(f"{key}: file {tuple(state[key].shape)} vs model "
                           f"{tuple(ours[key].shape)}" for key in wrong[:_SHOWN])
        more = f" and {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else ""
        problems.append(f"{len(wrong)} wrong shapes: {shapes}{more}")
        problems.extend(_class_count_hint(module, state, wrong))
    raise CheckpointError(f"{source}: does not match {type(module).__name__} "
                          f"(expected {expected}): " + "; ".join(problems))


def _class_count_hint(module: nn.Module, state: Mapping[str, torch.Tensor],
                      wrong: Sequence[str]) -> list[str]:
    classes = getattr(module, "num_classes", None)
    ours = module.state_dict()
    for key in wrong:
        if (classes is not None and ours[key].ndim >= 1 and ours[key].shape[0] == classes
                and state[key].ndim == ours[key].ndim
                and tuple(state[key].shape[1:]) == tuple(ours[key].shape[1:])):
            return [f"the file has {state[key].shape[0]} classes, the model {classes}"]
    return []


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: PathLike,
                 expected: str) -> None:
    """Check ``state`` against ``module`` (see :func:`check_state_dict`), then load it strictly."""
    check_state_dict(module, state, source=source, expected=expected)
    module.load_state_dict(state, strict=True)


def _load_parts(parts: Sequence[tuple[nn.Module, Mapping[str, torch.Tensor], PathLike, str]]
                ) -> None:
    # Check every part before copying any, so that a bad file leaves the model unchanged.
    for module, state, source, expected in parts:
        check_state_dict(module, state, source=source, expected=expected)
    for module, state, _, _ in parts:
        module.load_state_dict(state, strict=True)


def _require_mixer(composite: CompositeModel) -> nn.Module:
    if composite.mixer is None:
        raise ValueError("the composite model has no mixing network to load weights into")
    return composite.mixer


def mixer_inputs_of(state: Mapping[str, torch.Tensor],
                    composite: CompositeModel) -> Optional[str]:
    """Which ``forward_settings.mixer_inputs`` a mixer state dict was made for, quoted (docs/
    METHOD.md, "Mixer inputs"), as far as its keys and its first block's width tell with
    ``composite``'s base models: a logit gate, or a mixing network whose input channels are
    STD's + ROB's (``'both'``) or ROB's alone (``'rob_features'``); None where they do not tell
    (then the plain key and shape check speaks)."""
    if MARGIN_PARAMETER in state:
        return "'rob_logits'"
    first = state.get(_FIRST_MIXER_BN)
    if first is None or first.dim() != 1:
        return None
    width = int(first.shape[0])
    mixer = composite.mixer
    if isinstance(mixer, MixingNet) and width == sum(mixer.in_planes):
        return repr(composite.mixer_inputs)  # reads what this composite's mixer reads
    try:  # an attribute of the registry's models; a RobustBench model runs a dry forward once
        std, rob = (composite.std_model.feature_channels[0],
                    composite.rob_model.feature_channels[0])
    except ValueError:  # a base model without known feature maps
        return "'both' or 'rob_features'" if isinstance(mixer, LogitGate) else None
    return {std + rob: "'both'", rob: "'rob_features'"}.get(width)


def check_mixer_inputs(composite: CompositeModel, state: Mapping[str, torch.Tensor],
                       source: PathLike) -> None:
    """Raise CheckpointError, one line naming ``forward_settings.mixer_inputs``, where the mixer
    file was made for another kind of mixer than ``composite``'s."""
    theirs, ours = mixer_inputs_of(state, composite), repr(composite.mixer_inputs)
    if theirs is not None and theirs != ours:
        raise CheckpointError(
            f"{source}: a mixer for forward_settings.mixer_inputs = {theirs}, but this "
            f"composite's is {ours}: set forward_settings.mixer_inputs to {theirs} for this "
            f"file, or use a mixer checkpoint trained with {ours}")


def load_mixer_checkpoint(composite: CompositeModel, path: PathLike) -> None:
    """Load a mixer checkpoint (mixing network + gamma BN) into ``composite``."""
    mixer_state, bn_state = read_mixer_state_dicts(path)
    _require_mixer(composite)
    check_mixer_inputs(composite, mixer_state, path)
    _load_parts([(_require_mixer(composite), mixer_state, f"{path} entry 'model'", MIXER_FORMAT),
                 (composite.gamma_bn, bn_state, f"{path} entry 'bn'", MIXER_FORMAT)])


def load_authors_checkpoints(composite: CompositeModel, std_path: Optional[PathLike],
                             rob_path: Optional[PathLike], mixer_path: Optional[PathLike], *,
                             allow_swapped_bases: Optional[bool] = None) -> None:
    """Load the authors' three files (STD, ROB, mixer; docs/METHOD.md, "Published models") into
    ``composite``.

    A path None skips that part (``mixer_path`` None: the base models only; a base model None:
    one that came with its weights, a RobustBench zoo model). All files are checked before any
    is loaded, the base models' recorded training too (:func:`check_base_roles`;
    ``allow_swapped_bases`` None: as :func:`swapped_bases_allowed` set it).
    """
    std, rob = composite.std_model, composite.rob_model
    parts = []
    std_obj: Any = None
    rob_obj: Any = None
    if std_path is not None:
        std_expected = std_format(std)
        if Path(std_path).suffix == ".npz":
            std_state = read_std_state_dict(std_path, std if isinstance(std, ResNetV2) else None)
        else:
            std_obj = read_checkpoint(std_path, std_expected)
            std_state = extract_state_dict(std_obj, std_path, entries=("model", "state_dict"),
                                           prefixes=("module.",), expected=std_expected)
        parts.append((std, std_state, std_path, std_expected))
    if rob_path is not None:
        rob_expected = rob_format(rob)
        rob_obj = read_checkpoint(rob_path, rob_expected)
        # "model.": RobustBench's load_model strips it too (see read_rob_state_dict).
        rob_state = extract_state_dict(rob_obj, rob_path,
                                       entries=("model_state_dict", "state_dict", "model"),
                                       prefixes=("module.", "0.", "model."),
                                       expected=rob_expected)
        parts.append((rob, rob_state, rob_path, rob_expected))
    if std_path is not None and rob_path is not None:
        check_base_roles(std_obj, rob_obj, std_path, rob_path, allow_swapped=allow_swapped_bases)
    if mixer_path is not None:
        mixer_state, bn_state = read_mixer_state_dicts(mixer_path)
        _require_mixer(composite)
        check_mixer_inputs(composite, mixer_state, mixer_path)
        parts += [(_require_mixer(composite), mixer_state, f"{mixer_path} entry 'model'",
                   MIXER_FORMAT),
                  (composite.gamma_bn, bn_state, f"{mixer_path} entry 'bn'", MIXER_FORMAT)]
    _load_parts(parts)
    logger.info("loaded STD %s, ROB %s, mixer %s", std_path, rob_path, mixer_path)


# The command-line override (--allow-swapped-bases) reaches the loader through this context, so
# that the evaluation's and the training's call chains need no new parameter.
_SWAPPED_BASES_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "allow_swapped_bases", default=False)


@contextlib.contextmanager
def swapped_bases_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the block, :func:`check_base_roles` warns instead of refusing swapped bases."""
    token = _SWAPPED_BASES_ALLOWED.set(allowed)
    try:
        yield
    finally:
        _SWAPPED_BASES_ALLOWED.reset(token)


def recorded_method(obj: Any) -> Optional[str]:
    """The training method a checkpoint records (scripts/train_base.py's ``"method"`` entry:
    'standard', 'pgd', 'fgsm'), or None where it records none (the published files)."""
    method = obj.get("method") if isinstance(obj, Mapping) else None
    return method if isinstance(method, str) else None


def check_base_roles(std_obj: Any, rob_obj: Any, std_path: PathLike, rob_path: PathLike, *,
                     allow_swapped: Optional[bool] = None) -> None:
    """Refuse a composite whose STD checkpoint records adversarial training and whose ROB
    records standard training: the two are swapped in the config (the composite then reports
    STD's robustness as ROB's, e.g. 65.6% clean / 0.0% robust instead of 75.0% / 9.4%).

    With ``allow_swapped`` (None: :func:`swapped_bases_allowed`) it only warns. One side alone
    contradicting its role is a warning. Checkpoints that record nothing are not judged.
    """
    allowed = _SWAPPED_BASES_ALLOWED.get() if allow_swapped is None else allow_swapped
    std_method, rob_method = recorded_method(std_obj), recorded_method(rob_obj)
    std_robust = std_method in ADVERSARIAL_METHODS
    rob_standard = rob_method in STANDARD_METHODS
    if std_robust and rob_standard:
        evidence = (f"the STD checkpoint {std_path} records adversarial training (method "
                    f"{std_method!r}) and the ROB checkpoint {rob_path} standard training "
                    f"(method {rob_method!r})")
        if not allowed:
            raise CheckpointError(
                f"STD and ROB look swapped: {evidence}; STD is the accurate, standard model and "
                "ROB the robust one: swap model_load_path.std and model_load_path.rob, or pass "
                "--allow-swapped-bases to mix them this way")
        logger.warning("STD and ROB look swapped (%s); going on as --allow-swapped-bases asks",
                       evidence)
    elif std_robust:
        logger.warning("the STD checkpoint %s records adversarial training (method %r); STD is "
                       "meant to be the accurate, standard model", std_path, std_method)
    elif rob_standard:
        logger.warning("the ROB checkpoint %s records standard training (method %r): the "
                       "composite's robustness comes from ROB, so it will have little",
                       rob_path, rob_method)


def load_robustbench_checkpoints(composite: CompositeModel, paths: Sequence[PathLike]) -> None:
    """Load RobustBench's three files (BiT, WRN, ``{"model", "bn"}``) into ``composite``."""
    if len(paths) != 3:
        raise ValueError(f"RobustBench stores a composite as 3 files (STD, ROB, mixer), "
                         f"got {len(paths)}: {list(paths)}")
    std_path, rob_path, mixer_path = paths
    # RobustBench's loader accepts an optional 'state_dict' wrapper and strips 'module.'.
    std_state = extract_state_dict(read_checkpoint(std_path, ROBUSTBENCH_STD_FORMAT), std_path,
                                   entries=("state_dict",), prefixes=("module.",),
                                   expected=ROBUSTBENCH_STD_FORMAT)
    rob_state = extract_state_dict(read_checkpoint(rob_path, ROBUSTBENCH_ROB_FORMAT), rob_path,
                                   entries=("state_dict",), prefixes=("module.",),
                                   expected=ROBUSTBENCH_ROB_FORMAT)
    mixer_state, bn_state = read_mixer_state_dicts(mixer_path)
    _require_mixer(composite)
    check_mixer_inputs(composite, mixer_state, mixer_path)
    _load_parts([
        (composite.std_model, std_state, std_path, ROBUSTBENCH_STD_FORMAT),
        (composite.rob_model, rob_state, rob_path, ROBUSTBENCH_ROB_FORMAT),
        (_require_mixer(composite), mixer_state, f"{mixer_path} entry 'model'", MIXER_FORMAT),
        (composite.gamma_bn, bn_state, f"{mixer_path} entry 'bn'", MIXER_FORMAT)])
    logger.info("loaded RobustBench files %s", [str(p) for p in paths])


# -- writing --------------------------------------------------------------------------------
def mixer_checkpoint(composite: CompositeModel, **training_state: Any) -> dict[str, Any]:
    """The authors' mixer checkpoint: ``{"model", "bn"}`` plus any training state given."""
    reserved = {"model", "bn"} & set(training_state)
    if reserved:
        raise ValueError(f"training state must not use the reserved keys {sorted(reserved)}")
    return {"model": _require_mixer(composite).state_dict(),
            "bn": composite.gamma_bn.state_dict(), **training_state}


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (``persist.write_atomic``): a
    crash or full disk keeps the previous checkpoint intact."""
    write_atomic(path, lambda file: torch.save(obj, file))
    logger.debug("saved checkpoint %s", path)


def _first(keys: Sequence[Any]) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:_SHOWN])
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"[{shown}]{more}"
