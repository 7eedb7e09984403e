"""Where a sweep's runs execute: here one by one (``local``), here K grid settings at a time (``batched``), or on a
Ray cluster (``ray``)."""

from __future__ import annotations

from collections.abc import Callable

from .execute import Finished, batch_key, execute, execute_together
from .ray import ray_executor

BACKENDS = ("local", "ray")
Executor = Callable[[list[dict], Finished], None]


def make_executor(backend: str = "local", ray_address: str | None = None, batched: int = 1) -> Executor:
    """The executor of a backend; ``batched`` > 1 trains up to that many grid settings together (local only)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if batched < 1:
        raise ValueError(f"batched must be >= 1, got {batched}")
    if batched > 1:
        if backend != "local":
            raise ValueError("--batched runs on the local backend; drop --backend ray or --batched")
        return lambda entries, finished: run_batched(entries, finished, batched)
    return run_locally if backend == "local" else ray_executor(ray_address)


def run_locally(entries: list[dict], finished: Finished) -> None:
    """One run after another in this process."""
    for entry in entries:
        finished(entry, execute(entry))


def run_batched(entries: list[dict], finished: Finished, size: int) -> None:
    """Grid runs that may train together go ``size`` at a time; the others (final runs: other seeds) one by one."""
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        groups.setdefault(batch_key(entry) or entry["id"], []).append(entry)
    for group in groups.values():
        for chunk in (group[i : i + size] for i in range(0, len(group), size)):
            for entry, result in zip(chunk, execute_together(chunk), strict=True):
                finished(entry, result)
