"""The one base class of the errors a user causes, and can fix.

A missing, truncated or mismatched checkpoint, a bad config value, unreadable data, a device or
precision this machine lacks, a full disk: each of the package's errors for these derives from
:class:`UserError`, and its message names the file, key or value and what to do. Every command
catches ``UserError`` once (``cli/errors.py``) and prints that message as one line; any other
exception is a bug and keeps its traceback.

Subclasses keep the built-in base that callers already catch them by (``class
ConfigError(UserError, ValueError)``), so ``except ValueError`` around library code still works.
This module imports nothing, so that the torch-free parts (the config package) can use it.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the user's input or environment; the message says what to fix."""
