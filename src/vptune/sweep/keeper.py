"""The clock of a running sweep: the progress bar with the time left (every sweep), and for a time budget the
re-planning that keeps the whole command within it (:class:`Timekeeper`).

Before a grid setting starts, and after each of its epochs, the keeper asks whether the final run and the report,
at the speed measured so far, still fit after it: a setting that would eat their time does not start, or stops at
that epoch (recorded as stopped by the clock). The final run's length is set when it starts from the time left (at
least one epoch, at most twice the plan's), and after each of its epochs it is shortened if it has fallen behind.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable

from tqdm.auto import tqdm

from .timing import Costs, Sizes, TimePlan, duration, epoch_seconds, report_seconds, run_setup

MAX_FINAL_STRETCH = 2  # a final run may get up to this many times the plan's epochs when the grid ends early
WINDOW = 4  # the speed against the plan is measured over this many last epochs


class Timekeeper:
    """Holds a sweep to ``plan`` (none: a preset budget, nothing enforced) and shows its progress.

    Args:
        plan: the time plan (:func:`~vptune.sweep.timing.time_plan`), or None.
        sizes: the task's split sizes.
        costs: the estimate the bar starts from (the plan's, or :func:`~vptune.sweep.timing.estimate`'s).
        start: when the command started (``clock``'s time), so that measuring counts against the budget.
        clock: seconds (``time.perf_counter``; a test's fake clock).
        progress: show the bar.
        text: the plan and estimate as printed before training (recorded for the report).
    """

    def __init__(
        self,
        plan: TimePlan | None,
        sizes: Sizes,
        costs: Costs,
        start: float,
        clock: Callable[[], float] = time.perf_counter,
        progress: bool = True,
        text: str = "",
    ) -> None:
        self.plan, self.sizes, self.costs, self.start, self.clock = plan, sizes, costs, start, clock
        self.text = text
        self.deadline = start + plan.seconds if plan else None
        self.slow = 1.0  # measured / planned seconds over the last WINDOW epochs
        self.recent: deque[tuple[float, float]] = deque(maxlen=WINDOW)
        self.events: list[str] = []
        self.mark, self.expected, self.first, self.planned = start, 0.0, False, (0.0, 0.0)
        self.before = "none"  # the runs set up so far: none, a grid run, a final run (whose trunk outputs are kept)
        self.overhead = 0.0  # what a run's set-up took beyond its plan (seconds): what the estimate does not see
        self.trunk = 1.0  # measured / planned seconds of the images a set-up ran through the cached trunk
        self.final_length: int | None = None
        self.estimate = (plan.probe_seconds if plan else 0.0) + costs.total
        bar = "{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}"
        self.bar = tqdm(total=max(1, round(self.estimate)), desc="sweep", bar_format=bar, disable=not progress)
        self._show()

    # --- the grid ---------------------------------------------------------------------------------------------

    def grid_may_start(self, entry: dict) -> bool:
        """Whether a grid setting has time to reach its first rung with the final run and report still fitting."""
        plan = self.plan
        if plan is None or self.deadline is None:
            self._begin(False)
            return True
        rung = plan.budget.halving.min_epochs if plan.budget.halving else plan.schedule.epochs
        need = self._setup(False) + self.slow * rung * self._epoch(False)
        if self.clock() + need > self._grid_end():
            self._note(f"setting {_name(entry)} not run: it would not reach epoch {rung} in the time left")
            return False
        self._begin(False)
        return True

    def grid_epoch(self, entry: dict, metrics: dict, epochs: int) -> bool:
        """After a grid epoch: whether to stop the setting here, for the final run's time."""
        self._measured(False)
        if self.deadline is None or metrics["epoch"] >= epochs:
            return False
        if self.clock() + self.slow * self._epoch(False) > self._grid_end():
            self._note(f"setting {_name(entry)} stopped at epoch {metrics['epoch']} of {epochs}: the final run's time")
            return True
        return False

    def _grid_end(self) -> float:
        """When the grid must end: the final run (its planned length) and the report after it, at today's speed."""
        assert self.deadline is not None and self.plan is not None
        steps = self.plan.schedule.steps(True) * self.plan.speed.step
        final = self._setup(True, "grid") + self.slow * (steps + self._test()) + self._report()
        return self.deadline - final

    # --- the final run ----------------------------------------------------------------------------------------

    def final_epochs(self, entry: dict) -> int:
        """The final run's epochs, set from the time left as it starts (the plan's when nothing is enforced)."""
        planned = entry["run"]["train"]["epochs"]
        self._begin(True)
        if self.deadline is None:
            return planned
        fixed = self._setup(True) + self.slow * self._test() + self._report()
        left = self.deadline - self.clock() - fixed
        epochs = max(1, min(MAX_FINAL_STRETCH * planned, math.floor(left / (self.slow * self._epoch(True)))))
        if epochs != planned:
            self._note(f"final run: {epochs} epochs instead of {planned}, from the {duration(max(0, left))} left")
        self.final_length = epochs
        return epochs

    def final_epoch(self, metrics: dict, epochs: int) -> int | None:
        """After a final epoch of a run set to ``epochs``: a shorter length if it has fallen behind (None: keep it)."""
        self._measured(True)
        if self.deadline is None:
            return None
        length = min(epochs, self.final_length or epochs)
        after = self.slow * self._test() + self._report()
        left = self.deadline - self.clock() - after
        possible = max(
            metrics["epoch"], metrics["epoch"] + math.floor(max(0.0, left) / (self.slow * self._epoch(True)))
        )
        if possible < length:
            self._note(f"final run shortened at epoch {metrics['epoch']}: {possible} epochs instead of {length}, "
                       f"the last epochs {self.slow:.2f}x as long as planned")  # fmt: skip
            self.final_length = possible
            return possible
        return None

    # --- what it records and shows ----------------------------------------------------------------------------

    def run_done(self) -> None:
        """A run ended (or was found written): the bar moves on."""
        self._show()

    def record(self) -> dict:
        """``sweep.json``'s ``timing``: the plan, the estimate, the re-plans, the time measured until the report."""
        return {
            "budget_seconds": self.plan.seconds if self.plan else None,
            "plan": self.plan.record() if self.plan else None,
            "estimate_seconds": round(self.estimate, 1),
            "text": self.text,
            "replans": list(self.events),
            "seconds_before_report": round(self.clock() - self.start, 1),
        }

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Timekeeper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _begin(self, final: bool) -> None:
        """A run starts: its set-up and first epoch are what the next measurement covers."""
        self.mark, self.first = self.clock(), True
        self.planned, self.expected = self._planned_setup(final, self.before), self._epoch(final)
        self.before = "final" if final else ("grid" if self.before == "none" else self.before)

    def _measured(self, final: bool) -> None:
        """An epoch ended: the speed against the plan from it; after a run's first epoch, its set-up against the
        plan's instead: the seconds per image of a set-up through the cached trunk, else the seconds beyond the plan
        (every later run is expected to take them too)."""
        now = self.clock()
        if self.first and self.expected > 0:
            fixed, trunk = self.planned
            spent = now - self.mark - self.slow * (self.expected + fixed)
            if trunk > 0:
                self.trunk = max(0.25, spent / trunk)
            else:
                self.overhead = max(0.0, spent)
        elif self.expected > 0:
            self.recent.append((now - self.mark, self.expected))
            self.slow = max(0.05, sum(m for m, _ in self.recent) / sum(e for _, e in self.recent))
        self.mark, self.first, self.expected = now, False, self._epoch(final)
        self._show()

    def _show(self) -> None:
        elapsed = self.clock() - self.start
        left = max(0.0, self.start + self.estimate * self.slow - self.clock())
        if self.deadline is not None:
            left = min(left, max(0.0, self.deadline - self.clock()))
        self.bar.total = max(1, round(elapsed + left))
        self.bar.n = min(self.bar.total, round(elapsed))
        self.bar.set_postfix_str(f"about {duration(left)} left", refresh=False)
        self.bar.refresh()

    def _note(self, event: str) -> None:
        self.events.append(event)
        tqdm.write(f"re-planned: {event}", file=sys.stderr)

    def _planned_setup(self, final: bool, before: str) -> tuple[float, float]:
        """A run's set-up as planned: (model and images, cached trunk) seconds."""
        return run_setup(self.plan.speed, self.sizes, final, before) if self.plan else (0.0, 0.0)

    def _setup(self, final: bool, before: str | None = None) -> float:
        """A run's set-up in seconds at the speed measured so far, given the runs set up ``before`` it (default:
        those so far)."""
        fixed, trunk = self._planned_setup(final, before or self.before)
        return self.slow * fixed + self.overhead + self.trunk * trunk

    def _epoch(self, final: bool) -> float:
        if self.plan is None:
            return 0.0
        scored = 0 if final else self.sizes.val
        return epoch_seconds(self.plan.speed, self.plan.schedule.per_epoch(final), scored)

    def _test(self) -> float:
        """The final run's scoring of test, in planned seconds."""
        return self.sizes.test * self.plan.speed.score if self.plan else 0.0

    def _report(self) -> float:
        """The report in seconds at the speed measured so far."""
        if self.plan is None:
            return 0.0
        fixed, trunk = report_seconds(self.plan.speed, self.sizes)
        return self.slow * fixed + self.trunk * trunk


def _name(entry: dict) -> str:
    return f"base lr {entry['setting']['base_lr']:g}"
