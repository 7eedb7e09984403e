"""Tasks x methods: one sweep per cell, then the paper-style table (markdown, CSV, JSON) and two figures."""

from __future__ import annotations

import csv
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from .files import write_json
from .sweep import Executor, SweepPlan, plan_sweep, run_locally, run_sweep

# The offline suite's tasks by VTAB group (../shared/README.md); other tasks count as "other".
GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("caltech101", "cifar10", "signdigits", "flowers12"),
    "specialized": ("eurosat", "retinamnist"),
    "structured": ("dsprites_loc", "dsprites_ori", "coil20_pose"),
}
SUITE = tuple(task for tasks in GROUPS.values() for task in tasks)
DEFAULT_METHODS = (
    "linear",
    "full",
    "partial-1",
    "mlp-3",
    "bias",
    "adapter",
    "sidetune",
    "lora",
    "vpt-shallow",
    "vpt-deep",
)


def group_of(task: str) -> str:
    return next((group for group, tasks in GROUPS.items() if task in tasks), "other")


def plan_bench(
    tasks: list[str], methods: list[str], budget: str = "smoke", backbone: str = "dinov2-small", **overrides
) -> dict[tuple[str, str], SweepPlan]:
    """One sweep plan per (task, method); ``overrides`` go to :func:`plan_sweep` (lrs, wds, seeds ...)."""
    return {(t, m): plan_sweep(t, m, budget, backbone, **overrides) for t in tasks for m in methods}


def run_bench(
    plans: dict[tuple[str, str], SweepPlan],
    out: str | os.PathLike,
    execute: Executor = run_locally,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Run every cell's sweep (finished runs are skipped), then write ``bench.{md,csv,json}`` and the figures."""
    out = Path(out)
    start = time.perf_counter()
    results = {
        (Path(task).name, method): run_sweep(plan, out / Path(task).name / method, execute, progress, report=False)
        for (task, method), plan in plans.items()
    }
    tasks = list(dict.fromkeys(task for task, _ in results))
    methods = list(dict.fromkeys(method for _, method in plans))
    table = bench_table(results, tasks, methods)
    budget = next(iter(plans.values())).budget
    summary = {"budget": budget.name, "note": budget.note, "tasks": tasks, "methods": methods, "rows": table}
    summary["collapses"] = collapses(results)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "bench.json", summary)
    (out / "bench.md").write_text(bench_markdown(summary))
    _write_csv(out / "bench.csv", table)
    plot(summary, out)
    return summary


def bench_table(results: dict[tuple[str, str], dict], tasks: list[str], methods: list[str]) -> list[dict]:
    """One row per method: test accuracy per task (mean over seeds), group means, overall mean, size figures."""
    rows = []
    for method in methods:
        cells = {task: results[(task, method)] for task in tasks}
        row: dict = {"method": method}
        row.update({task: 100 * cell["test_mean"] for task, cell in cells.items()})
        row.update({f"{task} sd": 100 * cell["test_std"] for task, cell in cells.items()})
        for group in [*GROUPS, "other"]:
            members = [row[t] for t in tasks if group_of(t) == group]
            if members:
                row[f"mean {group}"] = statistics.fmean(members)
        row["mean"] = statistics.fmean(row[t] for t in tasks)
        row["mean sd"] = _seed_sd(cells)
        backbone = next(iter(cells.values()))["backbone_parameters"]
        trainable = [cell["trainable_parameters"] for cell in cells.values()]
        tuned = next(iter(cells.values()))["tuned_parameters"]
        row["trainable %"] = 100 * statistics.fmean(trainable) / backbone
        row["total params"] = (backbone - tuned + sum(trainable)) / backbone  # the paper's multiple, these tasks
        rows.append(row)
    return rows


def _seed_sd(cells: dict[str, dict]) -> float:
    """The standard deviation over seeds of the mean over tasks (seed k of every task averaged together)."""
    per_seed = list(zip(*(cell["test_accuracy"] for cell in cells.values()), strict=False))
    means = [100 * statistics.fmean(seed) for seed in per_seed]
    return statistics.stdev(means) if len(means) > 1 else 0.0


def collapses(results: dict[tuple[str, str], dict]) -> list[str]:
    """Every final run that trained more than 5 points below its grid run: ``task method seed k``."""
    return [
        f"{task} {method} seed {seed}"
        for (task, method), result in results.items()
        for seed in result.get("collapsed_seeds", [])
    ]


def bench_markdown(summary: dict) -> str:
    rows = summary["rows"]
    keys = [key for key in rows[0] if not key.endswith(" sd")]
    lines = [
        f"Budget `{summary['budget']}`: {summary['note']}.",
        f"Test accuracy (%), mean ± standard deviation over seeds (for the mean: of the seeds' means over tasks); "
        f"total params = (shared backbone + every task's parameters) / backbone for these {len(summary['tasks'])} "
        "tasks.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    for row in rows:
        cells = [row["method"]] + [_format(key, row[key], row.get(f"{key} sd")) for key in keys[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    broken = summary.get("collapses", [])
    lines += ["", f"Final runs that trained more than 5 points below their grid run: {', '.join(broken) or 'none'}."]
    return "\n".join(lines) + "\n"


def _format(key: str, value: float, sd: float | None = None) -> str:
    if key == "total params":
        return f"{value:.2f}x"
    if key == "trainable %":
        return f"{value:.3f}"
    return f"{value:.1f}" if not sd else f"{value:.1f} ± {sd:.1f}"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


MARKERS = "os^Dv<>P*X"  # the trade-off plot's, one per method in turn


def plot(summary: dict, out: Path) -> list[Path]:
    """``accuracy.png`` (per task, per method) and ``tradeoff.png`` (mean accuracy vs trainable fraction, log x)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("bench figures need matplotlib: pip install 'vptune[bench]'") from error
    rows, tasks = summary["rows"], summary["tasks"]
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(rows)) / 3), 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        axes.bar([t + i * width for t in range(len(tasks))], [row[t] for t in tasks], width, label=row["method"])
    axes.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=30, ha="right")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"budget {summary['budget']}")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 4))
    for i, row in enumerate(rows):  # a legend, not labels by the points: close points' labels overlap
        label = f"{row['method']} ({row['mean']:.1f})"
        axes.scatter(row["trainable %"], row["mean"], marker=MARKERS[i % len(MARKERS)], label=label)
    axes.legend(fontsize="small", loc="best")
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (% of backbone, log scale)")
    axes.set_ylabel("mean test accuracy (%)")
    figure.tight_layout()
    figure.savefig(out / "tradeoff.png", dpi=120)
    plt.close(figure)
    return [out / "accuracy.png", out / "tradeoff.png"]
