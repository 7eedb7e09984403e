"""Running a sweep's runs: one at a time, or several grid settings in one pass; each gives its result as JSON."""

from __future__ import annotations

from collections.abc import Callable

from ..engine import TrainingDiverged
from ..methods import get_method
from ..runs import RunResult, RunSpec, run, run_batched

Finished = Callable[[dict, dict], None]  # called with a run's entry and its result as each run finishes


def execute(entry: dict) -> dict:
    """Train one run of a sweep; a run whose loss diverges is a result too (it loses the grid), never saved."""
    spec = RunSpec.from_dict(entry["run"], where=f"sweep run {entry['id']}")
    try:
        return result(entry, run(spec, entry.get("save"), every_epoch=False))
    except TrainingDiverged as error:  # a grid point with too high an lr: scored as a failure, the sweep goes on
        diverged = {"diverged": str(error), "val_accuracy": None, "test_accuracy": None}
        return {"entry": _public(entry), "metrics": diverged}


def execute_together(entries: list[dict]) -> list[dict]:
    """Train grid runs of one prompt structure in one pass; if one diverges, run them one by one instead."""
    if len(entries) > 1:
        try:
            specs = [RunSpec.from_dict(entry["run"]) for entry in entries]
            return [result(entry, done) for entry, done in zip(entries, run_batched(specs), strict=True)]
        except TrainingDiverged:  # one setting diverged: alone, the others still score
            pass
    return [execute(entry) for entry in entries]


def batch_key(entry: dict) -> str | None:
    """Grid runs with the same key may train together (same method and prompts; SGD); None: alone."""
    spec = entry["run"]
    if entry["stage"] != "grid" or not get_method(spec["method"])[0].batchable or spec["train"]["optimizer"] != "sgd":
        return None
    return repr((spec["method"], spec["prompt"]))


def result(entry: dict, done: RunResult) -> dict:
    """What ``runs/<id>.json`` holds: the entry, the metrics and the run's figures."""
    return {"entry": _public(entry), **done.summary()}


def _public(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key != "save"}
