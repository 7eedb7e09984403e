"""Successive halving of a sweep's grid (a budget with ``halving``): the grid runs one at a time through an Optuna
study, and a run whose val accuracy trails those of the runs before it stops early (``pip install 'vptune[tune]'``).

The order: the grid's settings shuffled with ``random.Random(0)``, the same on every run and every resume (not
smallest lr first, which would give the first runs, never stopped, a bias).

The pruner: ``SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=reduction_factor,
min_early_stopping_rate=0)``, asked after each epoch's val accuracy is reported (epoch = step, from 1), except after
the last epoch (a run that trained to the end is finished). At epoch ``min_epochs * reduction_factor**k`` a run goes
on only if its val accuracy is in the top ``1 / reduction_factor`` of the runs that reached that epoch so far, itself
included (the best of them while fewer than ``reduction_factor`` did); so the first run always trains to the end.

Resuming: a run whose result is already written (for the same settings in the same order, with the same halving) is
not trained again but replayed into the study in its place in the order: its val accuracies reported epoch by epoch
and the pruner asked as it was, then told the run's end (complete, pruned or failed). The pruner keeps its rungs in
the trials' system attributes, which only asking it records (a trial added with ``create_trial`` and its
intermediate values alone would not count), so the runs still to come see the study of an uninterrupted sweep.
"""

from __future__ import annotations

import random
import time

from .._version import __version__
from ..engine import TrainingDiverged
from ..runs import RunSpec, run
from .execute import Finished, result
from .keeper import Timekeeper
from .plan import Halving

ORDER_SEED = 0
PARAM = "setting"  # the study's one parameter: the setting's index in the grid
HALVING_KEY = "halving"  # a grid result's record of the halving it ran under (a changed one runs it again)


class _Stopped(Exception):
    """Raised from the epoch callback when the pruner stops a run; carries the epoch's metrics."""

    def __init__(self, metrics: dict):
        super().__init__(f"stopped by successive halving at epoch {metrics['epoch']}")
        self.metrics = metrics


def halving_order(entries: list[dict]) -> list[int]:
    """The indices of the grid ``entries`` in the order they run: shuffled with ``random.Random(ORDER_SEED)``."""
    order = list(range(len(entries)))
    random.Random(ORDER_SEED).shuffle(order)
    return order


def run_halving(
    entries: list[dict],
    halving: Halving,
    done: dict[str, dict | None],
    finished: Finished,
    resumed: Finished | None = None,
    keeper: Timekeeper | None = None,
) -> list[dict]:
    """Run the grid ``entries`` one at a time through a successive-halving study; their results in ``entries``' order.

    Args:
        entries: the plan's grid runs (:meth:`SweepPlan.grid_runs`).
        halving: when to stop runs.
        done: results already written, by run id (None where none); those written under this very halving are
            replayed into the study instead of trained again.
        finished: called with each run's entry and result as it ends (finished, stopped or diverged).
        resumed: called with each replayed run's entry and result.
        keeper: the sweep's clock: a setting it gives no time does not start (a result that loses, ``skipped``),
            and one it stops ends as stopped early (``stopped_by: "time"``).
    """
    optuna = _import_optuna()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))  # no log line per trial
    try:
        return _run_study(optuna, entries, halving, done, finished, resumed, keeper)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _run_study(
    optuna, entries: list[dict], halving: Halving, done: dict, finished: Finished, resumed, keeper
) -> list[dict]:
    """:func:`run_halving` with Optuna imported: each run in turn, trained, replayed or (out of time) skipped."""
    context = {"min_epochs": halving.min_epochs, "reduction_factor": halving.reduction_factor}
    context["order"] = [entries[index]["id"] for index in halving_order(entries)]
    study = _study(optuna, halving)
    distributions = {PARAM: optuna.distributions.CategoricalDistribution(tuple(range(len(entries))))}
    results: dict[str, dict] = {}
    for index in halving_order(entries):
        entry = entries[index]
        study.enqueue_trial({PARAM: index})
        trial = study.ask(distributions)
        previous = done.get(entry["id"])
        if previous is not None and previous.get(HALVING_KEY) == context and "val_by_epoch" in previous["metrics"]:
            _replay(optuna, study, trial, previous, _epochs(entry))
            results[entry["id"]] = previous
            if resumed is not None:
                resumed(entry, previous)
            continue
        if keeper is not None and not keeper.grid_may_start(entry):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            results[entry["id"]] = skipped(entry)
        else:
            results[entry["id"]] = {**_train(optuna, study, trial, entry, keeper), HALVING_KEY: context}
        finished(entry, results[entry["id"]])
    return [results[entry["id"]] for entry in entries]


def _import_optuna():
    """Optuna, an optional dependency: imported only by sweeps whose budget halves."""
    try:
        import optuna
    except ImportError as error:
        raise ImportError(
            "a budget with successive halving (e.g. cpu-tune) needs Optuna: pip install 'vptune[tune]' "
            "(or choose a budget without halving, e.g. cpu)"
        ) from error
    return optuna


def _study(optuna, halving: Halving):
    """An in-memory study maximising val accuracy, pruned by successive halving."""
    pruner = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=halving.min_epochs, reduction_factor=halving.reduction_factor, min_early_stopping_rate=0
    )
    sampler = optuna.samplers.RandomSampler(seed=ORDER_SEED)  # never samples: every trial's setting is enqueued
    return optuna.create_study(direction="maximize", pruner=pruner, sampler=sampler)


def skipped(entry: dict) -> dict:
    """The result of a grid setting the clock left no time for: it loses (a resumed sweep runs it if it has time)."""
    return {"entry": entry, "metrics": {"skipped": "no time left", "val_accuracy": None, "test_accuracy": None}}


def _train(optuna, study, trial, entry: dict, keeper: Timekeeper | None) -> dict:
    """Train one grid run, reporting each epoch's val accuracy to ``trial``; stop it when the pruner (or the
    keeper, for the final run's time) says so."""
    vals: list[float] = []
    epochs = _epochs(entry)

    def on_epoch(metrics: dict) -> None:
        vals.append(metrics["val_accuracy"])
        trial.report(metrics["val_accuracy"], metrics["epoch"])
        out_of_time = keeper is not None and keeper.grid_epoch(entry, metrics, epochs)
        if metrics["epoch"] < epochs and trial.should_prune():
            raise _Stopped(metrics)
        if out_of_time:
            raise _Stopped({**metrics, "stopped_by": "time"})

    start = time.perf_counter()
    spec = RunSpec.from_dict(entry["run"], where=f"sweep run {entry['id']}")
    try:
        done = run(spec, None, every_epoch=False, on_epoch=on_epoch)
    except _Stopped as stop:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        metrics = {**stop.metrics, "pruned_at_epoch": stop.metrics["epoch"], "val_by_epoch": vals}
        return {"entry": entry, "metrics": metrics, "seconds": _since(start), "library": __version__}
    except TrainingDiverged as error:  # too high an lr: the run loses, the sweep goes on
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        metrics = {"diverged": str(error), "val_accuracy": None, "test_accuracy": None, "val_by_epoch": vals}
        return {"entry": entry, "metrics": metrics}
    study.tell(trial, done.metrics["val_accuracy"])
    completed = result(entry, done)
    return {**completed, "metrics": {**completed["metrics"], "val_by_epoch": vals}}


def _replay(optuna, study, trial, previous: dict, epochs: int) -> None:
    """Tell the study a run that already ended, as it went: each epoch's val accuracy, the pruner asked after each
    (its rung records are what later runs compete with), then how it ended."""
    metrics = previous["metrics"]
    for epoch, val in enumerate(metrics["val_by_epoch"], start=1):
        trial.report(val, epoch)
        if epoch < epochs:
            trial.should_prune()  # records the rung as the live run did; the written result says how it ended
    if metrics.get("val_accuracy") is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    elif "pruned_at_epoch" in metrics:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, metrics["val_accuracy"])


def _epochs(entry: dict) -> int:
    return entry["run"]["train"]["epochs"]


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)
