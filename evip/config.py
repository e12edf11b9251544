"""Typed configuration: YAML files into dataclasses, with errors that name the key, the file and the line.

Every concern of the engine is one dataclass (stage, model, data, optim, ...); a run's config is a tree of them.
:func:`load_config` reads a YAML file, applies dotted command-line overrides (``optim.lr=1e-4``), and builds the
tree with :func:`from_dict`, which accepts exactly the declared fields:

- an unknown key is an error naming it, its file and line, and the closest known key;
- a value of the wrong type is an error naming the key and the expected type (an int is accepted where a
  float is declared; nothing else is coerced: ``"1e-4"`` as a string is not a float);
- a field without a default must be given.

:func:`to_dict` turns a tree back into plain YAML-able data; :func:`save_config` writes the resolved config of
a run (after overrides and defaults) next to its outputs, and loading that file gives the same tree back.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_config", "save_config", "to_dict"]

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML safe loader with two YAML 1.2 habits: ``1e-4`` (no dot) is a float, as people write learning rates,
    and only ``true``/``false`` are booleans (YAML 1.1 also reads ``on``/``off``/``yes``/``no`` as booleans, which
    would turn ``progress: off`` into ``False``)."""


# A copy of the resolver table without YAML 1.1's bool resolver, then a strict one.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key (dotted path), and the file and line if known."""


def _where(path: str, lines: Mapping[str, str]) -> str:
    """``"file.yaml:12: key 'optim.lr'"`` when the key's position is known, else ``"key 'optim.lr'"``."""
    position = lines.get(path)
    return f"{position}: key '{path}'" if position else f"key '{path}'"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, lines: Mapping[str, str]) -> Any:
    """``value`` checked against (and built into) the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(extra: str = "") -> ConfigError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return ConfigError(
            f"{_where(path, lines)}: expected {_type_name(tp)}, got {type(value).__name__} {shown}{extra}"
        )

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, path, lines)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise fail()
    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        raise fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail(" (a mapping of its fields)")
        return from_dict(tp, value, _prefix=path, _lines=lines)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, list):
            raise fail()
        item = args[0] if args else Any
        return [_convert(v, item, f"{path}[{i}]", lines) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", lines) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f" ({len(args)} items needed)")
        return tuple(_convert(v, a, f"{path}[{i}]", lines) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise fail()
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(k, key_tp, f"{path}.{k}", lines): _convert(v, val_tp, f"{path}.{k}", lines)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise fail()
    raise ConfigError(f"{_where(path, lines)}: the config schema uses an unsupported type {tp!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, _prefix: str = "", _lines: Mapping[str, str] = {}) -> T:
    """Build the dataclass ``cls`` from ``data``; see the module docstring for the rules."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{_prefix}.{key}" if _prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_where(path, _lines)}: unknown key for {cls.__name__}{hint}")
        kwargs[key] = _convert(value, hints[key], path, _lines)
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = _lines.get(_prefix) if _prefix else None
        paths = ", ".join(f"'{_prefix}.{m}'" if _prefix else f"'{m}'" for m in missing)
        raise ConfigError(f"{where + ': ' if where else ''}missing required key(s) {paths} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a dataclass's own __post_init__ validation
        raise ConfigError(f"{_where(_prefix, _lines) if _prefix else cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars, strings for paths) of a dataclass tree."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], lines: dict[str, str] | None = None) -> dict:
    """Apply ``key.sub=value`` overrides to ``data`` in place (values parsed as YAML: ``1e-4``, ``true``,
    ``[1, 2]``); the keys are checked against the schema when the tree is built. Returns ``data``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[:depth + 1])}' is not a mapping")
            node = child
        node[parts[-1]] = value
        if lines is not None:
            lines[key] = f"override {item!r}"
    return data


def _key_lines(node: yaml.Node, source: str, prefix: str = "") -> dict[str, str]:
    """``{dotted key: "file:line"}`` for every mapping key and list item of a composed YAML document."""
    out: dict[str, str] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[path] = f"{source}:{key_node.start_mark.line + 1}"
            out.update(_key_lines(value_node, source, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{prefix}[{i}]"] = f"{source}:{item.start_mark.line + 1}"
            out.update(_key_lines(item, source, f"{prefix}[{i}]"))
    return out


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read the YAML file ``path``, apply ``overrides`` and build ``cls`` (errors name file and line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = _yaml_load(text)
        lines = _key_lines(yaml.compose(text, Loader=_Loader), str(path)) if data is not None else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    apply_overrides(data, overrides, lines)
    return from_dict(cls, data, _lines=lines)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config tree as YAML (written to a temporary file, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path
