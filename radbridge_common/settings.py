"""Layered, typed settings: code defaults < TOML file < RADBRIDGE_* environment.

Each service describes its settings as frozen dataclasses; ``build`` fills them
from a nested dict and rejects unknown keys, naming them. Environment keys are
``RADBRIDGE_<SECTION>__<KEY>`` (double underscore between levels), e.g.
``RADBRIDGE_SCP__PORT=11112``. Variables without a double underscore
(``RADBRIDGE_CONFIG``, ``RADBRIDGE_HTTP_TOKENS``, test switches) are not config keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "RADBRIDGE_"
CONFIG_ENV = "RADBRIDGE_CONFIG"
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def read_layers(path: str | Path | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge the TOML file (path, or $RADBRIDGE_CONFIG) with RADBRIDGE_* variables."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"Config file {p} does not exist.") from exc
        except OSError as exc:  # a directory, no permission
            raise ConfigError(f"Config file {p} cannot be read: {exc.strerror}.") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"Config file {p} is not valid TOML: not UTF-8 text ({exc.reason}).") from exc
        except (tomllib.TOMLDecodeError, RecursionError) as exc:  # RecursionError: arrays nested too deep
            raise ConfigError(f"Config file {p} is not valid TOML: {str(exc) or 'nested too deep'}") from exc
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue  # every config key is <SECTION>__<KEY>: the rest are other switches or secrets
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Environment variable {key} addresses a non-table key.")
        node[parts[-1]] = value  # a string; build() converts it to the field's type
    return data


def _json(value: str, where: str) -> Any:
    """A list or table given as JSON in an environment variable."""
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"Config '{where}' has value {value[:40]!r}. Not valid JSON.") from exc


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _convert(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"Config '{where}' must be a table.")
        return build(tp, value, where)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = _json(value, where) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"Config '{where}' must be a list.")
        items = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _, inner = typing.get_args(tp) or (str, Any)
        if isinstance(value, str):
            value = _json(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"Config '{where}' must be a table.")
        return {k: _convert(v, inner, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"Config '{where}' has value {value!r}. Not a valid bool.")
    if tp in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            return tp(value)
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf), float(10**400)
            raise ConfigError(f"Config '{where}' has value {value!r}. Not a valid {tp.__name__}.") from exc
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"Config '{where}' must be a path (a string).")
        return Path(value)
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"Config '{where}' must be a string.")
        return str(value)
    return value


def build(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"Unknown config key(s): {', '.join(prefix + u for u in unknown)}.")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Config '{where or cls.__name__}': {exc}") from exc


def redacted(obj: Any) -> Any:
    """A JSON-able view of a settings object with secret-looking values hidden."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _redact(f.name, redacted(getattr(obj, f.name))) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _redact(k, redacted(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redacted(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _redact(name: str, value: Any) -> Any:
    secretish = any(s in name.lower() for s in ("token", "password", "secret"))
    return "***" if secretish and value else value
