"""The paper's protocol for one task and one method: a grid scored on val, the best retrained with several seeds.

Every run is a :class:`~vptune.runs.RunSpec` executed locally, K grid settings at a time, or on Ray; its result is
written to ``<out>/runs/<id>.json`` as soon as it finishes, and a rerun of the same sweep skips runs already written.

Modules: :mod:`.plan` (budgets, grids, the runs), :mod:`.execute` and :mod:`.executors` (running them),
:mod:`.ray` (the Ray backend), :mod:`.selection` (the choice and the summary), :mod:`.runner` (the sweep itself).
"""

from .execute import execute
from .executors import BACKENDS, Executor, make_executor, run_locally
from .plan import BUDGETS, Budget, SweepPlan, get_budget, plan_sweep
from .runner import SUMMARY_FILE, SWEEP_FILE, SweepLocked, run_sweep
from .selection import choose, summarise, summary_markdown

__all__ = [
    "BACKENDS",
    "BUDGETS",
    "SUMMARY_FILE",
    "SWEEP_FILE",
    "Budget",
    "Executor",
    "SweepLocked",
    "SweepPlan",
    "choose",
    "execute",
    "get_budget",
    "make_executor",
    "plan_sweep",
    "run_locally",
    "run_sweep",
    "summarise",
    "summary_markdown",
]
