"""The one-line errors every command prints for mistakes in its input and for a full disk.

A user's mistake (a missing or truncated checkpoint, a bad config value, unreadable data, a
full disk...) is reported as one line that says what to fix; its traceback only at
``--log-level DEBUG`` (run.py) or in the DEBUG log. Every CLI's ``main`` is wrapped with
:func:`one_line_errors`, so the same bad input gives the same kind of message whichever command
reads it. A bug (any other exception) keeps its traceback.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])

logger = logging.getLogger("adaptive_smoothing.cli")

# The exceptions that mean "the input is wrong" (their messages name the file, key or value).
# Looked up in sys.modules instead of imported: a class whose module was never imported cannot
# have been raised, and importing them all would load torch for every --help.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("adaptive_smoothing.calibration", "CalibrationError"),
    ("adaptive_smoothing.checkpoints", "CheckpointError"),
    ("adaptive_smoothing.config.schema", "ConfigError"),
    ("adaptive_smoothing.data", "DataError"),
    ("adaptive_smoothing.download", "DownloadError"),
    ("adaptive_smoothing.evaluation", "EvaluationError"),
    ("adaptive_smoothing.persist", "DiskFullError"),
    ("adaptive_smoothing.pre_attack", "PreAttackedError"),
    ("adaptive_smoothing.rundir", "RunDirError"),
    ("adaptive_smoothing.runtime", "DeviceError"),
    ("adaptive_smoothing.runtime", "RuntimeSettingsError"),
    ("adaptive_smoothing.training", "TrainingDivergedError"),
    ("adaptive_smoothing.training", "TrainingResumeError"),
)


def _user_error_types() -> tuple[type, ...]:
    found = []
    for module_name, name in USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def user_error_message(err: BaseException) -> Optional[str]:
    """The one-line message for ``err`` if it is a user's mistake or a full disk, else None."""
    if isinstance(err, _user_error_types()):
        # One line even where a message lists several files on lines of their own.
        return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    from adaptive_smoothing.persist import disk_full_message, is_disk_full

    if is_disk_full(err):
        # A write outside persist.write_atomic (a library's own file, e.g. TensorBoard's).
        filename = getattr(err, "filename", None)
        target = Path(filename) if filename else Path(os.getcwd()) / "?"
        return disk_full_message(target.parent, target.name)
    return None


def fail(err: BaseException) -> "click.ClickException":
    """The ClickException that reports ``err`` in one line (traceback logged at DEBUG)."""
    logger.debug("traceback of the error below", exc_info=err)
    message = user_error_message(err)
    return click.ClickException(message if message is not None else str(err))


def one_line_errors(function: F) -> F:
    """Wrap a command's ``main``: user errors and a full disk become one-line click errors.

    Put it directly above ``def main`` (below the click options), so that click wraps it.
    """
    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return function(*args, **kwargs)
        except click.exceptions.ClickException:
            raise
        except Exception as err:  # noqa: BLE001 -- re-raised unless it is a user's mistake
            if user_error_message(err) is None:
                raise
            raise fail(err) from None

    return wrapper  # type: ignore[return-value]
