"""Config dataclasses: a help string per field, checked on construction, to and from JSON (unknown keys warned
about, never a crash)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a help string (shown by the CLI), optional ``choices``, and, for a default resolved
    elsewhere (``None`` or ``"auto"`` standing for the method's or the family's value), ``shown``: how ``--help``
    states the default."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass against its type and ``choices``; the error names the choices.

    Raises:
        ValueError: a value of the wrong type (a list where a number belongs), or not among the field's choices.
    """
    hints = typing.get_type_hints(type(config))
    name = type(config).__name__
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), hints[field.name]
        if not _is_instance(value, kind):
            raise ValueError(f"{name}: {field.name} must be {_describe(kind)}, got {value!r}")
        choices = field.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{name}: unknown {field.name} {value!r}; choose one of {', '.join(map(str, choices))}")


def _is_instance(value: Any, kind: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return any(_is_instance(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(_is_instance(item, args[0]) for item in value)
    return isinstance(value, origin or kind) if isinstance(origin or kind, type) else True


def _describe(kind: Any) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return " or ".join(_describe(arg) for arg in args)
    if kind is type(None):
        return "none"
    return getattr(kind, "__name__", str(kind)) if not args else str(kind)


def to_dict(config: Any) -> dict:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], data: dict | None, where: str = "config") -> T:
    """Build ``cls`` from a dict; keys ``cls`` does not know are dropped with a warning naming them."""
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} options, got {type(data).__name__}")
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown {cls.__name__} keys {unknown}", stacklevel=2)
    return cls(**{key: value for key, value in data.items() if key in known})


def read_config_file(path: str | Path) -> dict:
    """Read a JSON or YAML (``.yaml``/``.yml``, needs pyyaml) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise ImportError("reading YAML configs needs pyyaml: pip install pyyaml") from error
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return data
