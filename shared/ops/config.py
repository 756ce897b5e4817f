"""Service configuration: a flat dataclass filled from defaults < YAML file < environment < flags.

Both services describe their settings as one dataclass of plain fields (str, int, float, bool,
``X | None``, ``list[str]``). :func:`add_config_flags` turns every field into a ``--field-name``
flag, :func:`load_config` merges the sources, and every value is type-checked on the way in so a
typo in a YAML key or an environment value fails at start-up with a message naming it.

Environment: ``<PREFIX><FIELD_NAME_UPPER>``, e.g. ``FEDMEDCLIP_AGGREGATOR_ROUNDS=20``; lists are
comma-separated; booleans accept 1/0, true/false, yes/no, on/off. A variable with the prefix that
names no field is refused like an unknown YAML key (``<PREFIX>CONFIG``, the config file, excepted).

Paths: a config class may list its path fields in ``PATH_FIELDS``; a relative path given in a YAML
file is taken relative to that file's folder, so a folder of configs and certificates works wherever
it is copied. Relative paths from the environment or flags are relative to the working directory.

Every command of ``fedmedclip`` reads its settings this way. A field's description (shown by
``--help``) is ``field(metadata={"help": ...})`` or else the comment on the field's line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shared.errors import FedMedCLIPError

C = TypeVar("C")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(FedMedCLIPError, ValueError):
    """A configuration key is unknown or a value has the wrong type."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def coerce(name: str, tp: Any, value: Any) -> Any:
    """``value`` (from YAML, the environment or a flag) as type ``tp``, or :class:`ConfigError`."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    origin = typing.get_origin(base)
    try:
        if origin in (list, tuple):
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            (inner,) = typing.get_args(base)[:1] or (str,)
            out = [coerce(name, inner, v) for v in items]
            return out if origin is list else tuple(out)
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None
    raise ConfigError(f"{name}: unsupported field type {tp}")


_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def field_help(cls: type) -> dict[str, str]:
    """Each field's description: ``metadata["help"]``, else the comment on its line in the source."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            match = _FIELD_LINE.match(line)
            if match:
                comments[match.group(1)] = match.group(2)
    return {f.name: f.metadata.get("help") or comments.get(f.name, "") for f in dataclasses.fields(cls)}


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """A ``--field-name`` flag per dataclass field; unset flags stay None (they override nothing)."""
    group = parser.add_argument_group("configuration (flags override environment, which overrides --config)")
    defaults = cls()
    helps = field_help(cls)
    for name, tp in _field_types(cls).items():
        if name in skip:
            continue
        base, _ = _unwrap_optional(tp)
        metavar = "A,B,..." if typing.get_origin(base) in (list, tuple) else getattr(base, "__name__", "X").upper()
        bare = {"nargs": "?", "const": "true"} if base is bool else {}  # `--insecure` alone means true
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"cfg_{name}",
            default=None,
            metavar=metavar,
            # argparse expands %-formats in help: a literal "%" in a description must reach it as "%%"
            help=f"{helps[name]} (default: {getattr(defaults, name)!r})".lstrip().replace("%", "%%"),
            **bare,
        )


def load_config(
    cls: type[C],
    *,
    yaml_path: str | Path | list[str | Path] | None = None,
    env_prefix: str = "",
    env: Mapping[str, str] | None = None,
    flags: argparse.Namespace | Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from its defaults, then the YAML file(s) in order, then the environment, then flags.

    Several files let one party combine, e.g., the data settings of ``hospital_node partition`` with
    the identity of ``aggregator provision``; ``yaml_path`` may also be one comma-separated string.
    """
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    if isinstance(yaml_path, (str, Path)):
        yaml_path = [p for p in str(yaml_path).split(",") if p.strip()]
    for path in yaml_path or []:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        unknown = sorted(set(loaded) - set(types_))
        if unknown:
            raise ConfigError(f"config file {path}: unknown key(s) {unknown}; known: {sorted(types_)}")
        path_fields = set(getattr(cls, "PATH_FIELDS", ()))
        for key, raw in loaded.items():
            value = coerce(f"{path}: {key}", types_[key], raw)
            if key in path_fields and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                value = str((path.parent / value).resolve())
            values[key] = value
    environ = os.environ if env is None else env
    if env_prefix:
        known = {env_prefix + name.upper() for name in types_} | {env_prefix + "CONFIG"}
        unknown_env = sorted(k for k in environ if k.startswith(env_prefix) and k not in known)
        if unknown_env:
            raise ConfigError(f"unknown environment variable(s) {unknown_env}; known: {sorted(known)}")
    for name, tp in types_.items():
        key = env_prefix + name.upper()
        if key in environ:
            values[name] = coerce(f"${key}", tp, environ[key])
    if flags is not None:
        given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
        for name, tp in types_.items():
            raw = given.get(f"cfg_{name}", given.get(name) if not isinstance(flags, argparse.Namespace) else None)
            if raw is not None:
                values[name] = coerce(f"--{name.replace('_', '-')}", tp, raw)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc
