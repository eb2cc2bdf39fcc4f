"""Pre-attacked training data (the authors' ResNet-18 recipe, docs/METHOD.md): blocks of training
images attacked once, ahead of time, each block against one fixed setting of the base models.

Block design (the authors' generator is out of date and their data unreleased, so this is ours):
block k holds the same training images attacked by PGD-CE against the fixed mixture of the two
base models with gamma_k, i.e. alpha_k = sigmoid(gamma_k) (-inf: STD alone, +inf: ROB alone; no
mixer and no alpha scaling), at the training eps. Default gammas: (-inf, -2, 0, 2, 4, 6, 8, +inf),
eight blocks: with the authors' ``gamma_0`` 7.1 the first six are labelled 1 ("use ROB": attacks
that exploit STD) and the last two 0 (attacks on a nearly ROB-only mixture, which the STD model
resists as well as ROB does).

File format (``torch.load(..., weights_only=True)``): a dict with ``format`` =
:data:`FORMAT`, ``version``, ``x`` uint8 (blocks, n, C, H, W) (exact: eps is a whole number of
1/255 steps from a uint8 image, so rounding stays inside the ball), ``y`` int64 (n,), ``index``
int64 (n,) (the training-set indices), ``gamma`` float64 (blocks,), and the attack's ``eps``,
``norm``, ``iterations``, ``step_size``.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence, TypedDict

import torch
from tqdm import tqdm

from adaptive_smoothing.attacks import Norm, pgd
from adaptive_smoothing.config import ConfigError
from adaptive_smoothing.errors import UserError
from adaptive_smoothing.models.composite import (CompositeModel, base_weight_sums,
                                                  fixed_alpha_composite)
from adaptive_smoothing.persist import BatchStore, write_atomic
from adaptive_smoothing.runtime import autocast_context

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_GAMMAS", "FORMAT", "PreAttacked", "PreAttackedError", "block_labels",
           "generate_blocks", "load_blocks", "load_pre_attacked", "save_blocks"]

FORMAT = "adaptive_smoothing.pre_attacked"
VERSION = 1
DEFAULT_GAMMAS = (-math.inf, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0, math.inf)


class PreAttackedError(UserError, ValueError):
    """A pre-attacked data file that cannot be used (names the file and the problem)."""


def _alpha(gamma: float) -> float:
    return 0.0 if gamma == -math.inf else 1.0 if gamma == math.inf else 1 / (1 + math.exp(-gamma))


def block_labels(gamma: torch.Tensor, gamma_0: float) -> torch.Tensor:
    """The mixer label of each block: 1 (trust ROB) where its gamma < gamma_0, else 0."""
    return (gamma < gamma_0).to(torch.float32)


def generate_blocks(composite: CompositeModel, x: torch.Tensor, y: torch.Tensor,
                    index: torch.Tensor, *, gammas: Sequence[float] = DEFAULT_GAMMAS,
                    eps: float, norm: Norm = "Linf", iterations: int = 10,
                    step_size: Optional[float] = None, batch_size: int = 256,
                    device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32, seed: int = 0,
                    progress_dir: Optional[os.PathLike | str] = None) -> dict:
    """Attack ``x`` (float in [0, 1], uint8-valued) once per gamma; returns the file's dict.

    With ``progress_dir``, each finished block is saved there (one file per block), and a later
    call with the same images and settings reuses them: a stopped generation resumes at the
    block it was in. Finished blocks made with other settings or base models are refused, not
    mixed in.
    """
    if not gammas:
        raise ValueError("generate_blocks needs at least one gamma")
    step = eps / 4 if step_size is None else step_size
    store = None
    if progress_dir is not None:
        store = BatchStore(progress_dir, ".pt", write=torch.save,
                           read=lambda path: torch.load(path, weights_only=True))
    blocks = []
    models = _models_fingerprint(composite) if store is not None else None
    for k, gamma in enumerate(gammas):
        # What makes block k: a saved block is reused only if all of it agrees.
        made_by = {"gamma": float(gamma), "eps": float(eps), "norm": norm,
                   "iterations": int(iterations), "step_size": float(step), "seed": int(seed),
                   "index": index.to(torch.int64).cpu(), "y": y.to(torch.int64).cpu(),
                   "base_models": models}
        saved = store.load(k) if store is not None else None
        if saved is not None:
            _check_saved_block(saved, made_by, store.path(k))
            blocks.append(saved["x"])
            logger.info("block %d: gamma %s, reused %s", k, gamma, store.path(k))
            continue
        fixed = fixed_alpha_composite(composite, _alpha(float(gamma))).to(device)
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        out = []
        for start in tqdm(range(0, len(x), batch_size), desc=f"block {k} (gamma {gamma})",
                          leave=False):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            with autocast_context(device, dtype):
                result = pgd(fixed, xb, yb, eps, norm=norm, n_iter=iterations, step_size=step,
                             loss="ce", generator=generator)
            out.append((result.x_adv.float().cpu() * 255).round().clamp(0, 255).to(torch.uint8))
        blocks.append(torch.cat(out))
        if store is not None:
            store.save(k, dict(made_by, x=blocks[-1]))
        logger.info("block %d: gamma %s, %d images", k, gamma, len(x))
    return {"format": FORMAT, "version": VERSION, "x": torch.stack(blocks),
            "y": y.to(torch.int64).cpu(), "index": index.to(torch.int64).cpu(),
            "gamma": torch.tensor([float(g) for g in gammas], dtype=torch.float64),
            "eps": float(eps), "norm": norm, "iterations": int(iterations),
            "step_size": float(step)}


def _models_fingerprint(composite: CompositeModel) -> torch.Tensor:
    """The base models' logit scales and weight sums: blocks of other base models (a rerun
    with another config into the same output) must not be reused."""
    return torch.tensor([float(composite.std_scale), float(composite.rob_scale),
                         *base_weight_sums(composite)], dtype=torch.float64)


def _check_saved_block(saved: dict, made_by: dict, path: Path) -> None:
    for key, value in made_by.items():
        same = (torch.equal(saved.get(key), value) if isinstance(value, torch.Tensor)
                and isinstance(saved.get(key), torch.Tensor) else saved.get(key) == value)
        if not same:
            raise PreAttackedError(f"{path}: a finished block made with another {key} than this "
                                   "run's; delete the folder to start over, or rerun with the "
                                   "settings it was made with")


def save_blocks(blocks: dict, path: os.PathLike | str) -> Path:
    """Write atomically (a crash never leaves a half-written file under ``path``)."""
    return write_atomic(path, lambda file: torch.save(blocks, file))


def load_blocks(path: os.PathLike | str) -> dict:
    """Read and check a pre-attacked data file (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise PreAttackedError(f"{path}: pre-attacked data file not found")
    try:
        blocks = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles of arbitrary objects are refused by weights_only
        raise PreAttackedError(f"{path}: not a pre-attacked data file of scripts/pre_attack.py "
                               f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(blocks, dict) or blocks.get("format") != FORMAT:
        raise PreAttackedError(f"{path}: not a pre-attacked data file of scripts/pre_attack.py "
                               f"(expected format {FORMAT!r})")
    if blocks.get("version") != VERSION:
        raise PreAttackedError(f"{path}: version {blocks.get('version')!r}, expected {VERSION}")
    x, y, gamma = blocks["x"], blocks["y"], blocks["gamma"]
    if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[0] != len(gamma) or x.shape[1] != len(y):
        raise PreAttackedError(f"{path}: x has shape {tuple(x.shape)} ({x.dtype}); expected uint8 "
                               f"(blocks={len(gamma)}, n={len(y)}, C, H, W)")
    return blocks


class PreAttacked(TypedDict):
    """Pre-attacked training data as training uses it: the file's first ``blocks`` blocks
    flattened to (block, image) pairs."""

    x: torch.Tensor      # uint8 (blocks * n, C, H, W)
    y: torch.Tensor      # int64 (blocks * n,)
    label: torch.Tensor  # float32 (blocks * n,): the mixer label of the pair's block
    blocks: int


def load_pre_attacked(path: os.PathLike | str, gamma_0: Optional[float],
                      blocks: Optional[int] = None, *,
                      source: Optional[str] = None) -> PreAttacked:
    """The pre-attacked data of ``path`` (``dataset_settings.pa_path``) for training.

    ``blocks`` (None: all) takes the file's first ``blocks`` blocks; ``gamma_0`` is required: a
    pair's mixer label is 1 where its block's gamma < gamma_0, else 0. Problems are a
    ConfigError naming the ``dataset_settings`` key and ``source`` (the config file).
    """
    try:
        data = load_blocks(path)
    except PreAttackedError as err:
        raise ConfigError(f"cannot use the pre-attacked data: {err}",
                          key="dataset_settings.pa_path", value=str(path), file=source) from None
    if gamma_0 is None:
        raise ConfigError("expected a number: pre-attacked data (pa_path) needs gamma_0 to label "
                          "its blocks", key="dataset_settings.gamma_0", value=None, file=source)
    x, y, gamma = data["x"], data["y"], data["gamma"]
    n_blocks = len(gamma) if blocks is None else blocks
    if not 1 <= n_blocks <= len(gamma):
        raise ConfigError(f"expected 1 .. {len(gamma)} (the blocks in {path})",
                          key="dataset_settings.blocks", value=blocks, file=source)
    labels = block_labels(gamma[:n_blocks], gamma_0)
    n = x.shape[1]
    logger.info("pre-attacked data %s: %d blocks of %d images, gammas %s, mixer labels %s",
                path, n_blocks, n, gamma[:n_blocks].tolist(), labels.tolist())
    return PreAttacked(x=x[:n_blocks].reshape(n_blocks * n, *x.shape[2:]),
                       y=y.repeat(n_blocks), label=labels.repeat_interleave(n),
                       blocks=n_blocks)
