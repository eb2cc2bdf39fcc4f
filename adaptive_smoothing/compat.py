"""The one place that works around third-party packaging quirks (SPEC section 10)."""
from __future__ import annotations

import sys
from types import ModuleType


def import_autoattack() -> ModuleType:
    """The maintained AutoAttack (PyPI ``pyautoattack``), also registered as ``autoattack``.

    robustbench 1.1.1 does ``from autoattack import AutoAttack`` but depends on ``pyautoattack``.
    """
    import pyautoattack

    sys.modules.setdefault("autoattack", pyautoattack)
    return pyautoattack


def import_robustbench() -> ModuleType:
    """Import robustbench after registering the ``autoattack`` alias it needs."""
    import_autoattack()
    import robustbench

    return robustbench
