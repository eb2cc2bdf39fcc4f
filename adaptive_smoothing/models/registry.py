"""Architectures chosen by name, in the manner of timm's ``register_model``/``create_model``."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from adaptive_smoothing.models.base import BaseClassifier

_Builder = TypeVar("_Builder", bound=Callable[..., BaseClassifier])

# Filled once at import time by the @register_model decorators of the architecture modules; it is
# never mutated afterwards, so it is a lookup table rather than run-time state.
_MODEL_BUILDERS: dict[str, Callable[..., BaseClassifier]] = {}


def register_model(name: str) -> Callable[[_Builder], _Builder]:
    def decorator(builder: _Builder) -> _Builder:
        if name in _MODEL_BUILDERS:
            raise ValueError(f"model name {name!r} registered twice")
        _MODEL_BUILDERS[name] = builder
        return builder
    return decorator


def list_models() -> list[str]:
    return sorted(_MODEL_BUILDERS)


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> BaseClassifier:
    """Build a registered architecture with random weights, e.g. ``create_model("bit_m_r152x2")``.

    ``robustbench:<Name>`` is a RobustBench zoo model with its weights, loaded by robustbench
    (``kwargs``: ``model_dir``, its local model folder; see ``models/robustbench_zoo.py``).
    """
    if name.startswith("robustbench:"):
        from adaptive_smoothing.models.robustbench_zoo import load_zoo_model
        return load_zoo_model(name, num_classes, **kwargs)
    try:
        builder = _MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}") from None
    return builder(num_classes=num_classes, **kwargs)
