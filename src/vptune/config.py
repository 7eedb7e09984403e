"""Config dataclasses to and from JSON: a help string per field, unknown keys warned about, never a crash."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a help string (shown by the CLI) and optional CLI metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def to_dict(config: Any) -> dict:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], data: dict | None, where: str = "config") -> T:
    """Build ``cls`` from a dict; keys ``cls`` does not know are dropped with a warning naming them."""
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
