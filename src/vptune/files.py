"""Writing files so that a reader never sees half of one: a temporary file of its own beside the target, then a
rename (two writers of one file each write their own temporary file; the last rename wins)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(target: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary path)``, then rename the temporary file to ``target`` (with the usual permissions)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp and some writers create private files
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: object) -> None:
    """``data`` as indented JSON, written atomically; NaN and infinities are refused (they are not JSON)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
