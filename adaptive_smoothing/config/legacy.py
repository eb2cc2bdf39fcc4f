"""The authors' YAML layout at the boundary: file -> :class:`Config`, overrides, and back.

The authors' files (docs/METHOD.md, "Authors' configs") load unchanged. A few of their keys live
elsewhere in the schema (``MOVED``, ``FILLED``), two have old spellings (``ALIASES``), and values
that depend on other sections ('default') are filled in here, once, after validation. On the way,
a configuration is a flat {key path: value} mapping, so that moving a key is renaming a path.
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from .schema import BIT_STD_RESIZE, DEFAULT_EPS, MAX_PLAUSIBLE_EPS, Config, ConfigError

logger = logging.getLogger(__name__)

# File key path -> schema key path.
MOVED = {"training_settings.gamma_consts": "forward_settings.gamma_consts",
         "pgd_settings.type": "pgd_settings.norm",
         "evaluation_settings.device": "run.device",
         "evaluation_settings.threads": "run.threads",
         "evaluation_settings.output_dir": "run.output_dir"}
ALIASES = {"forward_settings.std_scale": "forward_settings.std_model_scale",
           "forward_settings.rob_scale": "forward_settings.rob_model_scale"}
_TO_FILE = {schema: path for path, schema in MOVED.items()}
# Schema keys that files write once, in another section: filled in from there at load.
FILLED = {"randomized_attack_settings.eps": "pgd_settings.eps",
          "randomized_attack_settings.norm": "pgd_settings.type",
          "randomized_attack_settings.n_target": "pgd_settings.n_target_classes"}
RANDOMIZE = "randomized_attack_settings.randomize"  # the authors' key; only true is implemented
UNUSED = ("forward_settings.parallel", "forward_settings.ema_decay",  # accepted, logged, ignored
          "training_settings.save_eval_imgs", "training_settings.use_fast_loader")


def _convert(path: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


def _layout(model: type[BaseModel] = Config, prefix: str = "",
           out: Optional[dict] = None) -> dict[str, dict[str, FieldInfo]]:
    """The file layout: {section key path: {key: schema field}}, in schema order."""
    out = {"": {}} if out is None else out
    for name, field in model.model_fields.items():
        if f"{prefix}{name}" in FILLED:
            continue
        section, _, key = _convert(f"{prefix}{name}", _TO_FILE).rpartition(".")
        out.setdefault(section, {})[key] = field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.setdefault(_convert(f"{prefix}{name}", _TO_FILE), {})
            _layout(field.annotation, f"{prefix}{name}.", out)
    return out


LAYOUT = _layout()


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Sections (in the file's or the schema's layout) -> {key path: value}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and _convert(path, _TO_FILE) in LAYOUT:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[str, Any], source: Optional[str]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, last = path.split(".")
        node = tree
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("cannot set a key inside a non-mapping value", file=source,
                                  key=".".join(parents[:depth + 1]), value=node)
        if value != {} or last not in node:  # an empty section sets no key
            node[last] = value
    return tree


def _schema_path(path: str, value: Any, source: Optional[str]) -> Optional[str]:
    """Where a key path of the file layout lives in the schema (None: checked, not stored)."""
    if path in FILLED:
        raise ConfigError(f"not a key of this section: write {FILLED[path]}", key=path,
                          value=value, file=source)
    if path == RANDOMIZE:
        if value not in (True, 1, "True", "true", "yes", "on"):
            raise ConfigError("expected true: this project implements the randomized training "
                              "attacks only (docs/METHOD.md, 'Training'); narrow them with "
                              "eps_factor_scale, comp_loss_wmax or iters_const", key=path,
                              value=value, file=source)
        return None
    return _convert(_convert(path, ALIASES), MOVED)


# pydantic's wording -> "expected ..."; the longer phrases first.
_WORDING = {"Input should be greater than or equal to": "expected a value >=",
            "Input should be greater than": "expected a value >",
            "Input should be less than or equal to": "expected a value <=",
            "Input should be less than": "expected a value <",
            "Input should be": "expected", "Tuple should have": "expected"}


def _error(err: ValidationError, flat: Mapping[str, Any], source: Optional[str]) -> ConfigError:
    """pydantic's first error as one line: the file's key path, the value as written."""
    error = err.errors()[0]
    parts: list[str] = []
    for part in error["loc"]:  # down to the key (not into a tuple's items)
        if not isinstance(part, str) or not isinstance(flat.get(".".join(parts), {}), Mapping):
            break
        parts.append(part)
    path = ".".join(parts)
    value = flat.get(path, {k[len(path) + 1:]: v for k, v in flat.items()
                            if k.startswith(path + ".")} or ...)
    file_path = _convert(path, _TO_FILE)
    if error["type"] == "missing":
        problem = "missing required key" if parts == list(error["loc"]) else "expected more items"
    elif error["type"] == "extra_forbidden":
        keys = list(LAYOUT.get(file_path.rpartition(".")[0], {}))
        close = difflib.get_close_matches(parts[-1], keys, n=1)
        problem = f"unknown key; expected one of {keys}" + (
            f"; did you mean {close[0]!r}?" if close else "")
    else:
        problem = error["msg"].removeprefix("Value error, ")
        for words, short in _WORDING.items():
            problem = problem.replace(words, short)
        problem = problem if "expected" in problem else f"expected a valid value ({problem})"
    return ConfigError(problem, key=file_path or "<top level>", value=value, file=source)


def _fill(section: BaseModel, **values: Any) -> Any:
    """The section with its unset fields set to ``values``; they stay unset, so that
    :func:`apply_overrides` derives them again."""
    unset = {k: v for k, v in values.items() if k not in section.model_fields_set}
    return type(section).model_construct(section.model_fields_set, **{**dict(section), **unset})


def _check_eps(eps: float, norm: str, key: str, source: Optional[str]) -> None:
    limit = MAX_PLAUSIBLE_EPS[norm]
    if eps > limit:
        hint = (f"; did you mean {eps:g}/255 (= {eps / 255:.5f})? Write it as '{eps:g}/255'"
                if norm == "Linf" and eps / 255 <= limit else "")
        raise ConfigError(f"an {norm} radius above {limit:.4g} is implausible for images in "
                          f"[0, 1]{hint}", key=key, value=eps, file=source)


def _validate(flat: Mapping[str, Any], source: Optional[str]) -> Config:
    """Validate {schema key path: value} and fill in the values derived from other sections."""
    try:
        config = Config.model_validate(_unflatten(flat, source))
    except ValidationError as err:
        raise _error(err, flat, source) from None
    fwd, pgd, ev = config.forward_settings, config.pgd_settings, config.evaluation_settings
    is_bit = fwd.std_model_type.startswith("bit_")
    if fwd.std_resize is not None and not is_bit:
        raise ConfigError(f"expected None: resizing is supported for BiT STD models only, not "
                          f"{fwd.std_model_type!r}", key="forward_settings.std_resize",
                          value=fwd.std_resize, file=source)
    classes = config.dataset_settings.num_classes
    if pgd.n_target_classes > classes - 1:
        raise ConfigError(f"expected at most {classes - 1} (classes of "
                          f"{config.dataset_settings.name} minus one)", file=source,
                          key="pgd_settings.n_target_classes", value=pgd.n_target_classes)
    pgd = _fill(pgd, eps=DEFAULT_EPS[pgd.norm])
    _check_eps(pgd.eps, pgd.norm, "pgd_settings.eps", source)
    ev = _fill(ev, norm=pgd.norm)
    ev = _fill(ev, eps=pgd.eps if ev.norm == pgd.norm else DEFAULT_EPS[ev.norm],
               data_dir=config.dataset_settings.path, seed=config.seed,
               pgd_iters=pgd.iters_test, pgd_step_size=pgd.alpha_test,
               pgd_loss=pgd.pgd_eval_loss)
    _check_eps(ev.eps, ev.norm, "evaluation_settings.eps", source)
    config = config.model_copy(update={
        "forward_settings": _fill(fwd, std_resize=BIT_STD_RESIZE if is_bit else None,
                                  robustbench_model_dir=os.path.join(config.log_dir,
                                                                     "robustbench")),
        "randomized_attack_settings": _fill(config.randomized_attack_settings, eps=pgd.eps,
                                            norm=pgd.norm, n_target=pgd.n_target_classes),
        "run": _fill(config.run, output_dir=os.path.join(config.log_dir, config.log_path)),
        "pgd_settings": pgd, "evaluation_settings": ev})
    config._source = source
    return config


def parse_config(raw: Any, source: Optional[str] = None) -> Config:
    """Validate an already-parsed YAML mapping (``source`` names it in error messages)."""
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping of sections", key="<top level>", value=raw,
                          file=source)
    flat: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for path, value in _flatten(raw).items():
        if path in UNUSED:
            logger.info("%s (a key of the authors' files) is accepted but not used", path)
        target = _schema_path(path, value, source)
        if target in flat:
            raise ConfigError(f"given twice, as {given_as[target]!r} and {path!r}; keep one",
                              key=path, value=value, file=source)
        if target is not None:
            flat[target], given_as[target] = value, path
    return _validate(flat, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key_node) for key_node, _ in node.value]
        for index, key in enumerate(keys):
            if key in keys[:index]:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        node.value[index][0].start_mark)
        return super().construct_mapping(node, deep)


def load_config(path: Union[str, os.PathLike]) -> Config:
    """Read and validate a YAML configuration file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError) as err:
        problem = "file not found" if isinstance(err, FileNotFoundError) else f"cannot read: {err}"
        if not Path(path).is_absolute():  # run from another folder, the bare name misleads
            problem += f" (looked for {Path(path).absolute()}, relative to the working directory)"
        raise ConfigError(problem, file=source) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"YAML syntax error{where}: {problem}", file=source) from None
    if raw is None:
        raise ConfigError("the file is empty; expected a mapping of sections", file=source)
    return parse_config(raw, source=source)


def apply_overrides(config: Config, **overrides: Any) -> Config:
    """A new Config with some keys replaced, e.g. command-line flags.

    Keys are the file's key paths with '.' or '__' between levels (``training_settings__lr=
    1e-4``, ``**{"training_settings.lr": "1e-4"}``); a section name with a mapping sets several
    of its keys. Values are checked as in a file, and values derived at load are derived again
    from the new keys. ``None`` values are skipped (unset command-line options).
    """
    given = {key.replace("__", "."): value for key, value in overrides.items()
             if value is not None}
    if not given:
        return config
    flat = _flatten(config.model_dump(exclude_unset=True))  # derived values are unset
    for path, value in _flatten(given).items():
        target = _schema_path(path, value, config.source)
        if target is not None:
            flat[target] = value
    return _validate(flat, f"{config.source or '<config>'} (with overrides of "
                           f"{', '.join(given)})")


def config_to_dict(config: Config) -> dict:
    """The resolved configuration as plain YAML/JSON data, in the file layout."""
    flat = _flatten(config.model_dump())
    return _unflatten({_convert(path, _TO_FILE): list(value) if isinstance(value, tuple)
                       else value for path, value in flat.items() if path not in FILLED},
                      config.source)
