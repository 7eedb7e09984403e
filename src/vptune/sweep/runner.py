"""Running (or resuming) a sweep: every run's result lands in ``<out>/runs/<id>.json`` as it finishes, and a rerun
of the same sweep skips the runs already written for the same spec."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..files import write_atomic, write_json
from .executors import Executor, run_locally
from .plan import SweepPlan
from .selection import choose, summarise, summary_markdown

LOCK_FILE = ".lock"
SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.md"


def run_sweep(
    plan: SweepPlan,
    out: str | os.PathLike,
    execute: Executor = run_locally,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) a sweep into ``out``; return what ``sweep.json`` holds.

    Args:
        plan: from :func:`plan_sweep`.
        out: the sweep folder; ``runs/<id>.json`` per finished run, the final runs' task folders in
            ``tasks/<id>/``, ``sweep.json`` and ``summary.md`` at the end.
        execute: where the runs execute (:func:`make_executor`: here one by one, K grid settings at a time, Ray).
        progress: called with each finished run's result (e.g. to update a progress bar).
    """
    out = Path(out)
    with locked(out):
        grid = _run_all(plan.grid_runs(), out, execute, progress)
        choice = choose(grid) if grid else plan.settings[0]
        finals = _run_all(plan.final_runs(choice), out, execute, progress)
        result = summarise(plan, grid, choice, finals)
        write_json(out / SWEEP_FILE, result)
        write_atomic(out / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(summary_markdown(result)))
    return result


class SweepLocked(RuntimeError):
    """Another sweep is writing into the same folder."""


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for a sweep's duration: a second sweep into the same folder is refused (the lock goes with
    the process that holds it, so a killed sweep leaves none behind)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            message = f"{out} is in use by a sweep ({holder}): wait for it to finish, or choose another --out"
            raise SweepLocked(message) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_all(entries: list[dict], out: Path, execute: Executor, progress) -> list[dict]:
    done = {entry["id"]: _read_result(out, entry) for entry in entries}
    todo = [entry for entry in entries if done[entry["id"]] is None]

    def finished(entry: dict, result: dict) -> None:
        write_json(out / "runs" / f"{entry['id']}.json", result)
        done[entry["id"]] = result
        if progress is not None:
            progress(result)

    for entry in entries:
        if done[entry["id"]] is not None and progress is not None:
            progress({**done[entry["id"]], "resumed": True})
    if todo:
        execute([{**entry, "save": _task_folder(out, entry)} for entry in todo], finished)
    return [done[entry["id"]] for entry in entries]


def _task_folder(out: Path, entry: dict) -> str | None:
    """Final runs keep their run folder (reloadable with vptune.load_task); grid runs keep only their scores."""
    return str(out / "tasks" / entry["id"]) if entry["stage"] == "final" else None


def _read_result(out: Path, entry: dict) -> dict | None:
    """A finished run's result, if it was written for this very entry (a changed spec runs again)."""
    path = out / "runs" / f"{entry['id']}.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write from an interrupted run: run it again
    return result if result.get("entry") == entry else None
