"""Write docs/CONFIG.md: the prose of docs/CONFIG.template.md around key tables generated from the
config schema (adaptive_smoothing/config/schema.py), in the layout that config files use.

    python3 scripts/gen_config_docs.py           # rewrite docs/CONFIG.md
    python3 scripts/gen_config_docs.py --check   # exit 1 if docs/CONFIG.md is stale
"""
from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing.config import ALIASES, MOVED, Config
from adaptive_smoothing.config.legacy import LAYOUT
from adaptive_smoothing.config.provenance import field_affects
from adaptive_smoothing.persist import write_text_atomic

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "docs" / "CONFIG.template.md"
OUTPUT = REPO / "docs" / "CONFIG.md"
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is typing.Union:
        return " or ".join(_type(a) for a in args if a is not type(None)) + " or None"
    if origin is Literal:
        return ", ".join(f"`{a!r}`" for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "list of names"
        return "(" + ", ".join(_type(a) for a in args) + ")"
    return "mapping" if origin is dict else getattr(annotation, "__name__", str(annotation))


def _constraints(annotation: Any, metadata: list) -> list:
    """The constraint objects of a field, also those inside Optional[Annotated[...]]."""
    items = list(metadata)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        for meta in args[1:]:
            items += [meta, *getattr(meta, "metadata", [])]
        items += _constraints(args[0], [])
    elif origin is typing.Union:
        for arg in args:
            items += _constraints(arg, [])
    return items


def _type_and_bounds(field: FieldInfo) -> str:
    parts = [f"{sign} {getattr(item, name)}"
             for item in _constraints(field.annotation, field.metadata)
             for name, sign in _BOUNDS.items() if getattr(item, name, None) is not None]
    text, optional = _type(field.annotation), ""
    if text.endswith(" or None"):
        text, optional = text[:-len(" or None")], " or None"
    return text + (" " + ", ".join(parts) if parts else "") + optional


def _default(field: FieldInfo) -> str:
    derived = (field.json_schema_extra or {}).get("derived")  # type: ignore[union-attr]
    if derived:
        return f"`'default'`: {derived}"
    if field.is_required():
        return "required"
    value = field.default
    if isinstance(value, (BaseModel, dict)):
        return "all defaults" if isinstance(value, BaseModel) else f"`{dict(value)!r}`"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value!r}`" if isinstance(value, (str, tuple)) else repr(value)


def _affects(field: FieldInfo) -> str:
    """What the key changes (config/provenance.py); sections: their keys say."""
    affects = field_affects(field)
    if affects is None:
        return ""
    return " + ".join(sorted(affects)) or "nothing"


def render() -> str:
    """docs/CONFIG.md as it should be."""
    old_names = {schema: path.rsplit(".", 1)[1] for path, schema in ALIASES.items()}
    to_file = {schema: path for path, schema in MOVED.items()}
    parts, order = [], list(Config.model_fields)
    sections = sorted(LAYOUT.items(), key=lambda item: order.index(item[0].split(".")[0])
                      if item[0] else -1)
    for section, fields in sections:
        if not fields:  # 'run': its keys are written in evaluation_settings
            continue
        parent, _, name = section.rpartition(".")
        cls = LAYOUT[parent][name].annotation if section else Config
        rows = []
        for key, field in fields.items():
            schema_path = next((s for s, p in to_file.items() if p == f"{section}.{key}"),
                               f"{section}.{key}".lstrip("."))
            alias = f" (alias `{old_names[schema_path]}`)" if schema_path in old_names else ""
            rows.append(f"| `{key}` | {_type_and_bounds(field)} | {_default(field)} | "
                        f"{_affects(field)} | {field.description or ''}{alias} |")
        title = f"`{section}`" if section else "top level"
        doc = (f"\n{cls.__doc__.strip()}\n" if cls.__module__.endswith("config.schema")
               and cls.__doc__ else "")
        parts.append(f"{'###' if section.count('.') == 0 else '####'} {title} "
                     f"(`{cls.__name__}`)\n{doc}\n| key | type | default | affects | meaning |\n"
                     "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    header = ("<!-- Generated by scripts/gen_config_docs.py from docs/CONFIG.template.md and "
              "adaptive_smoothing/config/schema.py; edit those, not this file. -->\n")
    return header + TEMPLATE.read_text().replace("{keys}", "\n".join(parts))


@click.command()
@click.option("--check", is_flag=True, help="Exit 1 if docs/CONFIG.md is stale; write nothing.")
@one_line_errors
def main(check: bool) -> None:
    """Write docs/CONFIG.md from docs/CONFIG.template.md and the config schema."""
    text = render()
    if check:
        if OUTPUT.read_text() != text:
            click.echo(f"{OUTPUT} is stale: run python3 scripts/gen_config_docs.py", err=True)
            sys.exit(1)
        return
    write_text_atomic(OUTPUT, text)
