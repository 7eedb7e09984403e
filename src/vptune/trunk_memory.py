"""The frozen trunk's outputs kept from one run to the next (:func:`keep_trunk_outputs`).

A sweep's runs share a backbone, an input size and most of their images: a head-only method's grid settings all
cache the same trunk outputs of train and val, and its final run those of train + val again. Inside
``keep_trunk_outputs()``, :func:`vptune.engine.cache_dataset` computes an image's output once and every later run
reads it back. An output is keyed by everything it depends on: the backbone's weights (their fingerprint), where the
trunk stops (the cache point), the preprocessing, the precision and device, and the image file (its path, size and
modification time), so a run with another backbone, input or file computes its own. Only images with a fixed view
(no random crops or flips) are ever cached.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return 16 * 1024**3


# kept outputs at most (4 GiB, or a quarter of this machine's memory if less); beyond it a run computes what does not
# fit, as without the memory
MAX_BYTES = min(4 * 1024**3, _physical_memory() // 4)

Key = tuple


class TrunkMemory:
    """Trunk outputs by key, at most ``max_bytes`` of them (the first ones kept; none is ever replaced)."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.outputs: dict[Key, torch.Tensor] = {}
        self.computed = 0  # outputs computed while this memory was active (kept or not)

    def __len__(self) -> int:
        return len(self.outputs)

    def get(self, key: Key) -> torch.Tensor | None:
        return self.outputs.get(key)

    def keep(self, keys: Sequence[Key], outputs: torch.Tensor) -> None:
        """Keep each row of ``outputs`` under its key while they fit."""
        self.computed += len(keys)
        for key, output in zip(keys, outputs, strict=True):
            size = output.numel() * output.element_size()
            if key in self.outputs or self.bytes + size > self.max_bytes:
                continue
            self.outputs[key] = output.clone()  # a row of its own: the batch it came from is not held
            self.bytes += size

    @property
    def bytes_per_output(self) -> float:
        """The mean size of one kept output (0 when none is kept)."""
        return self.bytes / len(self.outputs) if self.outputs else 0.0


_ACTIVE: contextvars.ContextVar[TrunkMemory | None] = contextvars.ContextVar("vptune_trunk_memory", default=None)


@contextmanager
def keep_trunk_outputs(memory: TrunkMemory | None = None) -> Iterator[TrunkMemory]:
    """Within the block, trunk outputs computed for one run are read back by the next (a new memory unless given)."""
    memory = memory if memory is not None else TrunkMemory()
    token = _ACTIVE.set(memory)
    try:
        yield memory
    finally:
        _ACTIVE.reset(token)


def active_memory() -> TrunkMemory | None:
    """The memory of the enclosing :func:`keep_trunk_outputs` block, if any."""
    return _ACTIVE.get()


def image_keys(dataset, namespace: tuple) -> list[Key] | None:
    """One key per image of an :class:`~vptune.data.ImageDataset` (None: another kind of dataset, or one whose views
    change from one access to the next)."""
    items = getattr(dataset, "items", None)
    if items is None or getattr(dataset, "augments", True) or getattr(dataset, "preprocessing", None) is None:
        return None
    view = repr(dataset.preprocessing)
    return [(*namespace, view, *_file_identity(path)) for path, _ in items]


def _file_identity(path: os.PathLike | str) -> tuple[str, int, int]:
    try:
        stat = os.stat(path)
    except OSError:  # decoded, then moved or removed: a key of its own that no later run matches by chance
        return str(path), -1, id(path)
    return str(path), stat.st_size, stat.st_mtime_ns
