"""The one-line errors every command prints for mistakes in its input and for a full disk.

A user's mistake (a missing or truncated checkpoint, a bad config value, unreadable data, a
full disk...: every :class:`~adaptive_smoothing.errors.UserError`) is reported as one line that
says what to fix; its traceback only at ``--log-level DEBUG`` (run.py) or in the DEBUG log.
Every CLI's ``main`` is wrapped with :func:`one_line_errors`, the one place that catches them,
so the same bad input gives the same kind of message whichever command reads it. A bug (any
other exception) keeps its traceback.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Optional, TypeVar

import click

from adaptive_smoothing.errors import UserError

F = TypeVar("F", bound=Callable[..., object])

logger = logging.getLogger("adaptive_smoothing.cli")


def user_error_message(err: BaseException) -> Optional[str]:
    """The one-line message for ``err`` if it is a user's mistake or a full disk, else None."""
    if isinstance(err, UserError):
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
