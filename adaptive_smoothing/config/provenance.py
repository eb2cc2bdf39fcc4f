"""Provenance: what each configuration key affects, declared once on its schema field, and the
one comparison of a recorded identity with the current one (docs/DESIGN.md, "Provenance").

Every leaf field of the schema says, through ``key(..., affects=...)``, whether it shapes the
trained weights (``WEIGHTS``), the reported results (``RESULTS``), both, or neither (``NOTHING``:
paths, devices and speed settings, whose files are compared by content instead). From that:

- training's resume identity is the ``WEIGHTS`` keys plus content fingerprints;
- an evaluation's manifest is the ``RESULTS`` keys plus content fingerprints;
- :func:`differences` compares a recorded identity with the current one by the same rules for
  both: a key recorded but no longer counted is ignored, and a key counted now but not recorded
  (a field added since) is a change only where its value is not the field's default. So adding
  a field never invalidates earlier checkpoints or evaluation folders, and renaming one compares
  the new name with its default.

Identities use the schema's key paths. Records written before this module (training identities
in the authors' file layout, evaluation manifests nested as ``{settings, model}``) are read
through :func:`migrate`, the one place that knows their layout.
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Literal, Mapping, Optional

from pydantic import BaseModel
from pydantic.fields import FieldInfo

WEIGHTS: frozenset[str] = frozenset({"weights"})
RESULTS: frozenset[str] = frozenset({"results"})
WEIGHTS_AND_RESULTS: frozenset[str] = WEIGHTS | RESULTS
NOTHING: frozenset[str] = frozenset()
Aspect = Literal["weights", "results"]

# Content fingerprints (sha256) stand in for files and data, under these keys.
FINGERPRINTS = {"std": "the STD checkpoint's content", "rob": "the ROB checkpoint's content",
                "comp": "the mixer checkpoint's content",
                "train_data": "the training data's content",
                "pa_data": "the pre-attacked data's content",
                "data": "the evaluated images or labels"}
FINGERPRINT_PREFIX = "fingerprints."
# A section with this flag off contributes only the flag: its other keys are not read.
_SWITCH = "enabled"


class ProvenanceError(TypeError):
    """A schema field without a declared ``affects`` (a programming error, caught by a test)."""


def field_affects(field: FieldInfo) -> Optional[frozenset[str]]:
    extra = field.json_schema_extra
    value = extra.get("affects") if isinstance(extra, dict) else None
    return None if value is None else frozenset(value)


def mixer_keys(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` declared ``mixer`` (schema.key): those only the composite's
    mixing reads, not a fixed-alpha mixture of the same base models."""
    return frozenset(name for name, field in model.model_fields.items()
                     if isinstance(field.json_schema_extra, dict)
                     and field.json_schema_extra.get("mixer"))


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def declared(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo,
                                                                           frozenset[str]]]:
    """(key path, field, affects) of every leaf field; ProvenanceError where undeclared."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if _is_section(field):
            yield from declared(field.annotation, f"{path}.")  # type: ignore[arg-type]
            continue
        affects = field_affects(field)
        if affects is None:
            raise ProvenanceError(f"schema field {path} does not declare what it affects: give "
                                  "its key(...) affects=WEIGHTS, RESULTS, WEIGHTS_AND_RESULTS or "
                                  "NOTHING (adaptive_smoothing/config/provenance.py)")
        yield path, field, affects


def _json(value: Any) -> Any:
    """Plain JSON data (tuples -> lists, paths -> str), as a record reads back."""
    return json.loads(json.dumps(value, default=str))


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {dotted key path: leaf value} (an empty mapping is a leaf)."""
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def restrict(record: Mapping[str, Any], aspect: Aspect,
             model: type[BaseModel]) -> dict[str, Any]:
    """The entries of a flat record (key paths of ``model``, and mapping values below them)
    that count for ``aspect``. Keys that are not schema paths (fingerprints, facts a caller
    adds such as a sweep's variant) always count; a section whose ``enabled`` flag is off counts
    with the flag only."""
    paths = {path: affects for path, _, affects in declared(model)}
    out: dict[str, Any] = {}
    for key, value in record.items():
        parts = key.split(".")
        field = next((p for p in (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                      if p in paths), None)
        if field is not None and aspect not in paths[field]:
            continue
        section, _, name = (field or "").rpartition(".")
        if section and name != _SWITCH and record.get(f"{section}.{_SWITCH}") is False:
            continue
        out[key] = _json(value)
    return out


def identity(config: BaseModel, aspect: Aspect,
             fingerprints: Optional[Mapping[str, Optional[str]]] = None) -> dict[str, Any]:
    """{key path: value} of the fields of ``config`` that affect ``aspect`` (mapping values
    flattened to their leaves), plus ``fingerprints.<name>`` entries (names of
    :data:`FINGERPRINTS`)."""
    out = restrict(flat(_json(config.model_dump())), aspect, type(config))
    for name, digest in (fingerprints or {}).items():
        if name not in FINGERPRINTS:
            raise ValueError(f"unknown fingerprint {name!r}; expected one of {list(FINGERPRINTS)}")
        out[FINGERPRINT_PREFIX + name] = digest
    return out


def defaults(model: type[BaseModel]) -> dict[str, Any]:
    """{key path: default} of every leaf field with a default (required fields have none)."""
    out: dict[str, Any] = {}
    for path, field, _ in declared(model):
        if not field.is_required():
            out.update(flat(_json(field.default), f"{path}."))
    return out


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any],
                model: Optional[type[BaseModel]] = None) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, current)} of what changed. A key recorded but not in ``current`` no
    longer counts; a key in ``current`` only is a change unless it equals its field's default in
    ``model`` (a field added since the record was written)."""
    known = defaults(model) if model is not None else {}
    changed: dict[str, tuple[Any, Any]] = {}
    for key in sorted(current):
        new = _json(current[key])
        if key in recorded:
            old = _json(recorded[key])
            if old != new:
                changed[key] = (old, new)
        elif not (key in known and known[key] == new):
            changed[key] = (None, new)
    return changed


def describe(key: str, old: Any, new: Any) -> str:
    """One change, for a refusal message; fingerprints by what they stand for."""
    name = key[len(FINGERPRINT_PREFIX):] if key.startswith(FINGERPRINT_PREFIX) else None
    if name in FINGERPRINTS:
        short = [v[:12] if isinstance(v, str) else v for v in (old, new)]
        return f"{FINGERPRINTS[name]} changed (sha256 {short[0]} -> {short[1]})"
    return f"{key}: {old!r} -> {new!r}"


# -- records written before declared provenance ---------------------------------------------
# Training identities (checkpoint format 3) used the authors' file layout and named the
# fingerprints after the keys whose files they hash; evaluation manifests were nested as
# {settings: evaluation_settings, model: the evaluated model's record}.
_OLD_TRAINING_FINGERPRINTS = {"model_load_path.std": "std", "model_load_path.rob": "rob",
                              "model_load_path.comp": "comp",
                              "dataset_settings.train_data": "train_data",
                              "dataset_settings.pa_data": "pa_data"}


def migrate(record: Mapping[str, Any], file_to_schema: Mapping[str, str]) -> dict[str, Any]:
    """A recorded identity of any version as a flat {key path: value}.

    ``file_to_schema``: the authors' file-layout paths that live elsewhere in the schema
    (:data:`adaptive_smoothing.config.legacy.MOVED`). Current records pass through unchanged.
    """
    if set(record) == {"settings", "model"}:
        return {**flat(record["settings"], "evaluation_settings."), **flat(record["model"])}
    out = {}
    for path, value in record.items():
        if path in _OLD_TRAINING_FINGERPRINTS:
            path = FINGERPRINT_PREFIX + _OLD_TRAINING_FINGERPRINTS[path]
        for old, new in file_to_schema.items():
            if path == old or path.startswith(old + "."):
                path = new + path[len(old):]
                break
        out[path] = value
    return out
