"""Checking a task folder before anything is built from it: every field of ``vptune.json`` present and of its type,
and the weights file's header consistent with itself, with its size and with the record.

A task folder can come from anywhere (a colleague, a download, a server's client): nothing it declares is allocated
before the bytes that back it have been seen to exist.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 * 2**20


class TaskFileError(ValueError):
    """A task folder that cannot be loaded as asked; the message says why and what to do."""


# field: (the types it may have, what it is); a dict's own fields follow in NESTED
FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "method": ((str,), "the method's name"),
    "backbone": ((dict,), "the backbone it was trained on"),
    "prompt": ((dict,), "the prompt configuration"),
    "num_classes": ((int,), "the number of classes"),
    "classes": ((list,), "the class names"),
    "preprocessing": ((dict,), "how images become input"),
    "options": ((dict,), "the method's options"),
}
NESTED: dict[str, dict[str, tuple[type, ...]]] = {
    "backbone": {"spec": (str,), "fingerprint": (str,), "parameters": (int,)},
    "preprocessing": {"image_size": (int,), "mean": (list,), "std": (list,)},
}
OPTIONAL = {"options"}


def check_record(record: object, file: Path) -> dict:
    """``record`` if every field is there with its type; else a one-line :class:`TaskFileError` naming the field."""
    if not isinstance(record, dict):
        raise TaskFileError(f"{file}: expected a JSON object, got {type(record).__name__}; the task folder is damaged")
    for name, (types, what) in FIELDS.items():
        if name not in record:
            if name in OPTIONAL:
                continue
            raise TaskFileError(f"{file}: field {name!r} ({what}) is missing; the task folder is damaged")
        _check_type(record[name], types, name, file)
        for field, kinds in NESTED.get(name, {}).items():
            if field not in record[name]:
                raise TaskFileError(f"{file}: field '{name}.{field}' is missing; the task folder is damaged")
            _check_type(record[name][field], kinds, f"{name}.{field}", file)
    classes, count = record["classes"], record["num_classes"]
    if count < 1 or len(classes) != count or not all(isinstance(c, str) for c in classes):
        raise TaskFileError(f"{file}: 'classes' must be {count} class names (one per class), got {len(classes)}")
    return record


def _check_type(value: object, types: tuple[type, ...], name: str, file: Path) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        wanted = " or ".join(kind.__name__ for kind in types)
        raise TaskFileError(f"{file}: field {name!r} must be a {wanted}, got {value!r:.80}; the task folder is damaged")


def read_header(file: Path) -> dict[str, list[int]]:
    """The shapes a safetensors file declares, after checking that its header is well formed and that every
    tensor's bytes lie inside the file (without reading them)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise TaskFileError(
                f"{file} cannot be read as safetensors (a header of {length} bytes in a file of {size})"
            )
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TaskFileError(f"{file} cannot be read as safetensors (its header: {error})") from error
    if not isinstance(header, dict):
        raise TaskFileError(f"{file} cannot be read as safetensors (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return {name: _checked_entry(name, entry, size - 8 - length, file) for name, entry in header.items()}


def _checked_entry(name: str, entry: object, data_bytes: int, file: Path) -> list[int]:
    try:
        shape, (begin, end), dtype = list(entry["shape"]), entry["data_offsets"], entry["dtype"]
        valid = all(isinstance(n, int) and n >= 0 for n in shape) and 0 <= begin <= end <= data_bytes
        valid = valid and end - begin == math.prod(shape) * DTYPE_BYTES[dtype]
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise TaskFileError(
            f"{file}: tensor {name} is declared inconsistently with the file; the task folder is damaged"
        )
    return shape


def check_weights(record: dict, file: Path) -> dict[str, list[int]]:
    """The weights file's declared shapes, checked against the record: the same tensors, the same shapes, and a head
    with ``num_classes`` rows. Run before any model is built, so that a record cannot make vptune allocate what the
    weights file does not hold."""
    shapes = read_header(file)
    recorded = record.get("tensors")
    listed = dict(recorded) if isinstance(recorded, dict) else shapes
    if listed != shapes:
        missing, unexpected = sorted(set(listed) - set(shapes)), sorted(set(shapes) - set(listed))
        other = sorted(name for name in set(listed) & set(shapes) if listed[name] != shapes[name])
        raise TaskFileError(
            f"{file} does not hold the tensors vptune.json lists: missing {missing}, unexpected {unexpected}, "
            f"other shapes {other}; the task folder is damaged"
        )
    heads = [shape for name, shape in shapes.items() if name.endswith(("head.weight", "head.out.weight"))]
    if heads and any(len(shape) != 3 or shape[1] != record["num_classes"] for shape in heads):
        raise TaskFileError(f"{file}: the head has {heads[0][1:2]} classes, vptune.json says {record['num_classes']}")
    return shapes
