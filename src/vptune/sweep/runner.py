"""Running (or resuming) a sweep: every run's result lands in ``<out>/runs/<id>.json`` as it finishes, and a rerun
of the same sweep skips the runs already written for the same spec."""

from __future__ import annotations

import fcntl
import functools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..files import write_atomic, write_json
from ..runs import canonical_entry
from ..trunk_memory import keep_trunk_outputs
from .execute import execute as execute_one
from .executors import Executor, run_locally
from .halving import run_halving
from .keeper import Timekeeper
from .plan import SweepPlan
from .report import write_report
from .selection import choose, summarise, summary_markdown

LOCK_FILE = ".lock"
SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.md"


def run_sweep(
    plan: SweepPlan,
    out: str | os.PathLike,
    execute: Executor = run_locally,
    progress: Callable[[dict], None] | None = None,
    report: bool = True,
    keeper: Timekeeper | None = None,
) -> dict:
    """Run (or resume) a sweep into ``out``; return what ``sweep.json`` holds.

    Args:
        plan: from :func:`plan_sweep`.
        out: the sweep folder; ``runs/<id>.json`` per finished run, the final runs' task folders in
            ``tasks/<id>/``, ``sweep.json`` and ``summary.md`` at the end; with ``report``, also the tuned model
            in ``best/`` (the seed-0 final run), ``report.md``, ``report.json`` and figures (:mod:`.report`).
        execute: where the runs execute (:func:`make_executor`: here one by one, K grid settings at a time, Ray);
            a budget with ``halving`` runs its grid here one by one (:mod:`.halving`), so it needs ``run_locally``.
        progress: called with each finished run's result (e.g. to update a progress bar).
        report: write ``best/`` and the report (scores ``best/`` on test once more); a bench leaves it out.

    The runs done here (and the report) share one :func:`~vptune.trunk_memory.keep_trunk_outputs`: an image goes
    through a cached frozen trunk once in the whole sweep (a head-only method's grid settings, final run and report).
        keeper: the sweep's clock (:class:`~vptune.sweep.keeper.Timekeeper`): the progress bar with the time left,
            and for a time budget the re-planning that keeps to it (local runs only); its record lands in
            ``sweep.json`` and the report.
    """
    out = Path(out)
    _check_executor(plan, execute, keeper)
    if keeper is not None:
        progress = _also(progress, keeper)
    with locked(out), keep_trunk_outputs():
        grid = _run_grid(plan, out, execute, progress, keeper)
        choice = choose(grid) if grid else plan.settings[0]
        finals = _run_finals(plan.final_runs(choice), out, execute, progress, keeper)
        result = summarise(plan, grid, choice, finals)
        if keeper is not None:
            result["timing"] = keeper.record()
        write_json(out / SWEEP_FILE, result)
        write_atomic(out / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(summary_markdown(result)))
        if report:
            write_report(result, out, grid + finals)
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
        _record(out, progress, entry, result)
        done[entry["id"]] = result

    for entry in entries:
        if done[entry["id"]] is not None:
            _resumed(progress, entry, done[entry["id"]])
    if todo:
        execute([{**entry, "save": _task_folder(out, entry)} for entry in todo], finished)
    return [done[entry["id"]] for entry in entries]


def _run_grid(plan: SweepPlan, out: Path, execute: Executor, progress, keeper: Timekeeper | None) -> list[dict]:
    """The grid runs' results: all of them by ``execute``, or one by one with successive halving."""
    entries = plan.grid_runs()
    if plan.budget.halving is None or not entries:
        return _run_all(entries, out, execute, progress)
    done = {entry["id"]: _read_result(out, entry) for entry in entries}
    return run_halving(
        entries,
        plan.budget.halving,
        done,
        finished=lambda entry, result: _record(out, progress, entry, result),
        resumed=lambda entry, result: _resumed(progress, entry, result),
        keeper=keeper,
    )


def _run_finals(entries: list[dict], out: Path, execute: Executor, progress, keeper: Timekeeper | None) -> list[dict]:
    """The final runs: by ``execute``; under a time budget one by one here, each given the time left and
    shortened if it falls behind."""
    if keeper is None or keeper.deadline is None:
        return _run_all(entries, out, execute, progress)
    results = []
    for entry in entries:
        previous = _finished_at_any_length(out, entry)
        if previous is None:
            epochs = keeper.final_epochs(entry)
            entry = _at_length(entry, epochs)
            previous = execute_one({**entry, "save": _task_folder(out, entry)}, functools.partial(
                keeper.final_epoch, epochs=epochs))  # fmt: skip
            _record(out, progress, entry, previous)
        else:
            _resumed(progress, entry, previous)
        results.append(previous)
    return results


def _at_length(entry: dict, epochs: int) -> dict:
    return {**entry, "run": {**entry["run"], "train": {**entry["run"]["train"], "epochs": epochs}}}


def _finished_at_any_length(out: Path, entry: dict) -> dict | None:
    """A time budget's final run found written for ``entry`` at whatever length it was given then (the keeper sets a
    final run's length from the time left)."""
    result = _load_result(out, entry)
    try:
        epochs = result["entry"]["run"]["train"]["epochs"] if result else None
    except (KeyError, TypeError):
        return None
    return _matching(result, _at_length(entry, epochs)) if isinstance(epochs, int) else None


def _also(progress, keeper: Timekeeper) -> Callable[[dict], None]:
    """``progress`` (if any), and the keeper's bar moved on."""

    def both(result: dict) -> None:
        if progress is not None:
            progress(result)
        keeper.run_done()

    return both


def _check_executor(plan: SweepPlan, execute: Executor, keeper: Timekeeper | None = None) -> None:
    """A budget with halving decides epoch by epoch, one run at a time: its grid cannot go to Ray or in batches."""
    if plan.budget.halving is not None and execute is not run_locally and plan.grid_runs():
        raise ValueError(
            f"budget {plan.budget.name!r} stops grid runs early by successive halving, which decides after each "
            "epoch with one run at a time, here: drop --backend ray and --batched (the local backend, one run at "
            "a time), or choose a budget without halving (e.g. cpu)"
        )
    if keeper is not None and keeper.deadline is not None and execute is not run_locally:
        raise ValueError(
            "a time budget re-plans epoch by epoch, one run at a time, here: drop --backend ray and --batched"
        )


def _record(out: Path, progress, entry: dict, result: dict) -> None:
    """Write a run's result to ``runs/<id>.json`` as it ends, and tell ``progress``."""
    write_json(out / "runs" / f"{entry['id']}.json", result)
    if progress is not None:
        progress(result)


def _resumed(progress, entry: dict, result: dict) -> None:
    """Tell ``progress`` of a run found already written."""
    if progress is not None:
        progress({**result, "resumed": True})


def _task_folder(out: Path, entry: dict) -> str | None:
    """Final runs keep their run folder (reloadable with vptune.load_task); grid runs keep only their scores."""
    return str(out / "tasks" / entry["id"]) if entry["stage"] == "final" else None


def _read_result(out: Path, entry: dict) -> dict | None:
    """A finished run's result, if it was written for this very entry (a changed spec runs again; a method recorded
    under a named recipe's name counts as the method and options it stands for)."""
    return _matching(_load_result(out, entry), entry)


def _load_result(out: Path, entry: dict) -> dict | None:
    """``runs/<id>.json`` as written (None: none, or a torn write from an interrupted run, which runs again)."""
    path = out / "runs" / f"{entry['id']}.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return result if isinstance(result, dict) else None


def _matching(result: dict | None, entry: dict) -> dict | None:
    """``result`` if it was written for this very ``entry``."""
    recorded = result.get("entry") if result else None
    return result if isinstance(recorded, dict) and canonical_entry(recorded) == entry else None
