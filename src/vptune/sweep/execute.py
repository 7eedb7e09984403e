"""Running a sweep's runs: one at a time, or several grid settings in one pass; each gives its result as JSON."""

from __future__ import annotations

from collections.abc import Callable

from ..batched import why_not_batched
from ..config import from_dict
from ..engine import TrainingDiverged
from ..prompts import PromptConfig
from ..runs import RunResult, RunSpec, run, run_batched

Finished = Callable[[dict, dict], None]  # called with a run's entry and its result as each run finishes


def execute(entry: dict, on_epoch: Callable[[dict], int | None] | None = None) -> dict:
    """Train one run of a sweep; a run whose loss diverges is a result too (it loses the grid), never saved.
    ``on_epoch``: :func:`vptune.runs.run`'s (a time budget's keeper shortens a final run through it)."""
    spec = RunSpec.from_dict(entry["run"], where=f"sweep run {entry['id']}")
    try:
        return result(entry, run(spec, entry.get("save"), every_epoch=False, on_epoch=on_epoch))
    except TrainingDiverged as error:  # a grid point with too high an lr: scored as a failure, the sweep goes on
        return diverged(entry, str(error))


def execute_together(entries: list[dict]) -> list[dict]:
    """Train grid runs of one prompt structure in one pass; one that diverges is scored as a failure, as alone."""
    if len(entries) == 1:
        return [execute(entries[0])]
    specs = [RunSpec.from_dict(entry["run"], where=f"sweep run {entry['id']}") for entry in entries]
    done = run_batched(specs)
    return [
        diverged(entry, one.metrics["diverged"]) if "diverged" in one.metrics else result(entry, one)
        for entry, one in zip(entries, done, strict=True)
    ]


def batch_key(entry: dict) -> str | None:
    """Grid runs with the same key may train together (same method and prompts; SGD); None: alone."""
    spec = entry["run"]
    prompt = from_dict(PromptConfig, spec["prompt"]) if spec["prompt"] is not None else None
    if entry["stage"] != "grid" or spec["train"]["optimizer"] != "sgd" or why_not_batched(spec["method"], prompt):
        return None
    return repr((spec["method"], spec["prompt"]))


def result(entry: dict, done: RunResult) -> dict:
    """What ``runs/<id>.json`` holds: the entry, the metrics and the run's figures."""
    return {"entry": _public(entry), **done.summary()}


def diverged(entry: dict, why: str) -> dict:
    """The result of a run that diverged: scored as a failure (it loses the grid), nothing saved."""
    return {"entry": _public(entry), "metrics": {"diverged": why, "val_accuracy": None, "test_accuracy": None}}


def _public(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key != "save"}
