"""The one place that works around third-party packaging quirks (docs/METHOD.md, "Quirks").

robustbench 1.1.1 depends on the maintained AutoAttack (PyPI ``pyautoattack``) but imports it as
``autoattack`` and calls it with the original package's conventions, which pyautoattack changed:

- ``AutoAttack(..., log_path=...)``: pyautoattack takes no ``log_path`` (it logs through the
  ``auto-attack`` logger);
- ``run_standard_evaluation(x, y, bs=...)`` returning the adversarial images: pyautoattack takes
  ``batch_size=`` and returns ``(x_adv, y_adv)``;
- with ``aa_state_path``, ``benchmark()`` reads ``EvaluationState.robust_flags.mean()``, which
  fails on pyautoattack's boolean flags.

pyautoattack's own ``state_path`` resume is broken (0.2.0): ``to_disk`` writes the attack sets as
strings, so ``from_disk`` never matches them ("The state was created with a different set of
attacks"), and a restored run reaches an unbound ``y_adv``. The adapter therefore resumes at
batch granularity itself: with ``state_path`` it attacks ``bs`` images at a time through
pyautoattack (no state), keeps each finished batch's result next to the state file, and finally
writes the state file robustbench reads.

pyautoattack draws APGD's random starts with ``torch.rand`` over whatever batch it attacks, so
an image's start (and with it, at few iterations, whether the attack finds its adversarial
example) would depend on its batch. :func:`use_per_image_random_starts` makes APGD-CE/DLR and
APGD-T start from per-image draws instead (see ``attacks.PerImageRandom``), through the
``x_init`` argument pyautoattack's ``attack_single_run`` already has: the start is computed by
pyautoattack's own formula, only the noise source changes, so no attack is weakened.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

import torch

from adaptive_smoothing.persist import BatchStore, write_text_atomic

_AUTOATTACK_LOGGER = "auto-attack"


def import_autoattack() -> ModuleType:
    """The maintained AutoAttack package, ``pyautoattack``."""
    import pyautoattack

    return pyautoattack


def use_per_image_random_starts(adversary: Any, random: Any, x: torch.Tensor) -> None:
    """Make the APGD attacks of ``adversary`` (a pyautoattack AutoAttack about to attack ``x``)
    draw their random starts per image from ``random`` (an ``attacks.PerImageRandom`` for the
    rows of ``x``).

    pyautoattack hands its attacks row subsets of ``x`` (the points still robust), without their
    indices; rows are identified by their exact values. Identical images share their draws,
    which keeps them identical. FAB-T draws nothing with one restart and its targets, like
    APGD-T's, are the top-k classes; Square's random search stays per batch.
    """
    lookup: dict[bytes, int] = {}
    for position, row in enumerate(x.detach().cpu().float().contiguous()):
        lookup.setdefault(row.numpy().tobytes(), position)

    def wrap(attack: Any) -> None:
        original = attack.attack_single_run

        def attack_single_run(x_batch: torch.Tensor, y_batch: torch.Tensor,
                              x_init: Optional[torch.Tensor] = None) -> Any:
            if x_init is None and attack.norm in ("Linf", "L2"):
                rows = x_batch.detach().cpu().float().contiguous()
                positions = [lookup.get(row.numpy().tobytes()) for row in rows]
                if None in positions:
                    logging.getLogger(__name__).warning(
                        "per-image random starts: an attacked image is not among the batch's "
                        "images; this run draws its starts per batch")
                else:
                    draws = random.subset(torch.tensor(positions, dtype=torch.int64))
                    t = draws.draw(tuple(x_batch.shape), normal=attack.norm == "L2")
                    if attack.norm == "Linf":
                        t = 2 * t - 1
                    t = t.to(x_batch.device)
                    x_init = x_batch + attack.eps * torch.ones_like(x_batch) * attack.normalize(t)
            return original(x_batch, y_batch, x_init=x_init)

        attack.attack_single_run = attack_single_run  # this instance only

    wrap(adversary.apgd)
    wrap(adversary.apgd_targeted)


def _robustbench_autoattack_module() -> ModuleType:
    """An ``autoattack`` module with robustbench's expected API, backed by pyautoattack."""
    pyautoattack = import_autoattack()
    from pyautoattack import state as aa_state

    class AtomicState(aa_state.EvaluationState):
        """pyautoattack's state, written through ``persist.write_atomic``: its own ``to_disk``
        rewrites the file in place, which a kill or a full disk leaves truncated."""

        def to_disk(self, force: bool = False) -> None:
            if self.path is None:
                return
            since = (datetime.datetime.now() - self._last_saved).total_seconds()
            if since < self._SAVE_TIMEOUT and not force:
                return
            self._last_saved = datetime.datetime.now()
            data = dataclasses.asdict(self)
            if self._robust_flags is not None:
                data["_robust_flags"] = self._robust_flags.cpu().tolist()
            data["_run_attacks"] = list(self._run_attacks)
            write_text_atomic(self.path, json.dumps(data, default=str))

    class AutoAttack(pyautoattack.AutoAttack):
        """pyautoattack's AutoAttack with the original ``autoattack`` call conventions."""

        def __init__(self, model: torch.nn.Module, norm: str = "Linf", eps: float = 0.3,
                     seed: Optional[int] = None, verbose: bool = True,
                     attacks_to_run: Sequence[str] = (), version: str = "standard",
                     device: Any = "cpu", log_path: Optional[str] = None) -> None:
            attacks = list(attacks_to_run) if version == "custom" else None
            super().__init__(model, attacks=attacks, device=device, eps=eps, norm=norm,
                             seed=seed, version=version)
            self.verbose = verbose
            if log_path is not None:
                _log_to_file(Path(log_path))

        def run_standard_evaluation(self, x_orig: torch.Tensor, y_orig: torch.Tensor,
                                    bs: int = 250, return_labels: bool = False,
                                    state_path: Optional[Path] = None) -> Any:
            if state_path is None:
                x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs)
            else:
                x_adv, y_adv = self._resumable(x_orig, y_orig, bs, Path(state_path))
            return (x_adv, y_adv) if return_labels else x_adv

        def _resumable(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int,
                       state_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
            batches = BatchStore(
                state_path.with_name(state_path.name + ".batches"), ".pt",
                write=torch.save,
                read=lambda path: torch.load(path, map_location="cpu", weights_only=True))
            x_parts, y_parts = [], []
            starts = range(0, len(y_orig), bs)
            finished = sum(batches.path(i).exists() for i in range(len(starts)))
            if finished:  # say so: part of the result comes from an earlier process
                logging.getLogger(__name__).info(
                    "%s: resuming, reusing %d of %d finished AutoAttack batches",
                    batches.directory, finished, len(starts))
            for index, start in enumerate(starts):
                part = batches.load(index)
                if part is None:
                    x_adv, y_adv = super().run_standard_evaluation(
                        x_orig[start:start + bs], y_orig[start:start + bs], batch_size=bs)
                    part = {"x_adv": x_adv.cpu(), "y_adv": y_adv.cpu()}
                    batches.save(index, part)
                x_parts.append(part["x_adv"])
                y_parts.append(part["y_adv"])
            x_adv, y_adv = torch.cat(x_parts), torch.cat(y_parts)
            state = AtomicState(set(self.attacks_to_run), path=state_path)
            state.clean_accuracy = float("nan")  # robustbench reports its own clean pass
            state.robust_flags = y_adv.eq(y_orig.cpu())  # writes the file
            return x_adv, y_adv

    class EvaluationState(AtomicState):
        """pyautoattack's state, whose flags robustbench can average (it reads, never writes)."""

        @property
        def robust_flags(self) -> Optional[torch.Tensor]:
            flags = self._robust_flags
            return None if flags is None else flags.float()

        @robust_flags.setter
        def robust_flags(self, flags: torch.Tensor) -> None:
            self._robust_flags = flags
            self.to_disk(force=True)

    state = ModuleType("autoattack.state")
    state.EvaluationState = EvaluationState  # type: ignore[attr-defined]

    module = ModuleType("autoattack")
    module.__doc__ = "robustbench's view of pyautoattack (see adaptive_smoothing.compat)"
    module.AutoAttack = AutoAttack  # type: ignore[attr-defined]
    module.state = state  # type: ignore[attr-defined]
    module.__path__ = []  # a package, so that ``autoattack.state`` can be imported
    return module


def _log_to_file(path: Path) -> None:
    logger = logging.getLogger(_AUTOATTACK_LOGGER)
    target = str(path.resolve())
    if any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.addHandler(logging.FileHandler(target))
    logger.setLevel(min(logger.level or logging.DEBUG, logging.DEBUG))


def import_robustbench() -> ModuleType:
    """Import robustbench after registering the ``autoattack`` module it imports."""
    if "autoattack" not in sys.modules:
        module = _robustbench_autoattack_module()
        sys.modules["autoattack"] = module
        sys.modules["autoattack.state"] = module.state
    import robustbench
    import robustbench.eval  # noqa: F401  (benchmark() lives here)

    return robustbench
