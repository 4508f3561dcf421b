"""The config machinery every section shares, importing none of them: plain data (YAML,
`key.sub=value` overrides) -> typed dataclasses with every key and type checked, and
back (`to_dict`, `dump_yaml`), and the help text of each leaf key (`--help-config`).
A section is any dataclass whose fields carry help (`rollout.config.opt`) and may have
`validate(section)`; `cluster.config` composes the sections into the job config.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from trainers.errors import ConfigError, UserError


def read_config_file(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping of config keys."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys")
    return data


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (2 -> int, [a, b] -> list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"override '{item}' must look like key.sub=value")
    set_key(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")


def set_key(data: dict, key: str, value) -> None:
    """Set the dotted `key` (a.b.c) in nested config data, creating sections on the way."""
    node, parts = data, key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is not a section")
    node[parts[-1]] = value


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or cls.__name__, f"expected a mapping, got {_kind(data)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_join(prefix, unknown[0]), f"unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {name: coerce(hints[name], value, _join(prefix, name)) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def config_help(cls, prefix: str = "") -> str:
    """One line per leaf key: the key, its help and its default (the --help-config text)."""
    rows = field_help(cls)
    width = max(len(prefix + key) for key, _, _ in rows) + 2
    return "\n".join(f"{prefix + key:{width}}{help_text} [default: {default!r}]" for key, help_text, default in rows)


def field_help(cls) -> list[tuple[str, str, Any]]:
    """(key, help, default) for every leaf key, for `rayft train --help-config`."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += [(f"{f.name}.{k}", h, d) for k, h, d in field_help(hint)]
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f.name, f.metadata.get("help", ""), default))
    return rows


def coerce(hint, value, key: str):
    """`value` checked against the type `hint` of config key `key` (numbers parsed from
    YAML strings, a bare path for a section with a path, ...); raises ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        (item,) = args
        if dataclasses.is_dataclass(item) and not isinstance(value, list):
            value = [value]  # a single source may be written without the list
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_kind(value)}")
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {_kind(value)}")
        key_type, value_type = args
        return {coerce(key_type, k, f"{key}.{k}"): coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, str) and "path" in {f.name for f in dataclasses.fields(hint)}:
            value = {"path": value}  # a bare path stands for {path: ...}
        return from_dict(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _yaml_number(value)  # YAML 1.1 reads `2e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise ConfigError(key, f"unsupported config type {hint}")


def _yaml_number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(value) -> str:
    return type(value).__name__ if value is not None else "nothing"
