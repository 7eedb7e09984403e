"""Choosing the grid's best setting, and the sweep's summary (JSON and markdown)."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..config import to_dict
from .plan import SweepPlan


def choose(grid: list[dict]) -> dict:
    """The setting with the best val accuracy at the last epoch; ties go to the smaller lr (then wd, then prompt
    length). A run stopped early by successive halving (``pruned_at_epoch``) loses to any that finished, whatever
    its val accuracy (equal ones too), and a diverged run to any other."""
    ordered = sorted(grid, key=lambda r: _tie_key(r["entry"]["setting"]))
    best = max(ordered, key=_rank)  # max keeps the first of equals
    return best["entry"]["setting"]


def _rank(result: dict) -> tuple:
    """Finished runs by val accuracy, above stopped ones (the later stopped first, then by val), above diverged."""
    metrics = result["metrics"]
    if metrics.get("val_accuracy") is None:
        return (0, 0, 0.0)
    if "pruned_at_epoch" in metrics:
        return (1, metrics["pruned_at_epoch"], metrics["val_accuracy"])
    return (2, 0, metrics["val_accuracy"])


def _tie_key(setting: dict) -> tuple:
    return (setting["base_lr"], setting["weight_decay"], setting["num_tokens"] or 0)


def summarise(plan: SweepPlan, grid: list[dict], choice: dict, finals: list[dict]) -> dict:
    """What ``sweep.json`` holds: the grid's scores, the choice, and the final runs' test accuracy over seeds."""
    tests = [r["metrics"]["test_accuracy"] for r in finals if r["metrics"].get("test_accuracy") is not None]
    if not tests:
        raise RuntimeError(f"every final run of {plan.method} on {plan.data} diverged: lower the lr grid")
    first = next(r for r in finals if r["metrics"].get("test_accuracy") is not None)
    chosen = next((r for r in grid if r["entry"]["setting"] == choice), None)
    grid_train = chosen["metrics"].get("train_accuracy") if chosen else None
    final_train = [r["metrics"].get("train_accuracy") for r in finals]
    return {
        "data": plan.data,
        "method": plan.method,
        "backbone": plan.backbone,
        "budget": to_dict(plan.budget),
        "grid": [_grid_row(r) for r in grid],
        "choice": choice,
        "chosen_by": _chosen_by(grid),
        "chosen_at_edge": at_edge(grid, choice),
        "seeds": len(finals),
        "diverged_seeds": len(finals) - len(tests),
        "test_accuracy": tests,
        "test_mean": statistics.fmean(tests),
        "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "grid_train_accuracy": grid_train,
        "final_train_accuracy": final_train,
        "collapsed_seeds": _collapsed(grid_train, final_train),
        "trainable_parameters": first["trainable_parameters"],
        "backbone_parameters": first["backbone_parameters"],
        "tuned_parameters": first["tuned_parameters"],
        "seconds": round(sum(r.get("seconds", 0.0) for r in grid + finals), 1),
        "runs": [r["entry"]["id"] for r in grid + finals],
        "library": first["library"],
    }


def at_edge(grid: list[dict], choice: dict) -> str | None:
    """A sentence when the chosen lr is the grid's lowest or highest (the best may lie beyond it), else None."""
    lrs = sorted({r["entry"]["setting"]["base_lr"] for r in grid})
    if len(lrs) < 2 or choice["base_lr"] not in (lrs[0], lrs[-1]):
        return None
    side, beyond = ("highest", "higher") if choice["base_lr"] == lrs[-1] else ("lowest", "lower")
    return (
        f"the chosen base lr {choice['base_lr']:g} is the grid's {side} ({', '.join(f'{lr:g}' for lr in lrs)}): a "
        f"{beyond} one may be better; try --base-lr with values beyond it"
    )


def _grid_row(result: dict) -> dict:
    """A grid run in ``sweep.json``: its setting and val accuracy, and the epoch it was stopped at if it was."""
    row = {"setting": result["entry"]["setting"], "val_accuracy": result["metrics"].get("val_accuracy")}
    for key in ("pruned_at_epoch", "stopped_by", "skipped"):
        if key in result["metrics"]:
            row[key] = result["metrics"][key]
    return row


def _chosen_by(grid: list[dict]) -> str:
    if not grid:
        return "single setting: no grid to score"
    if any("pruned_at_epoch" in r["metrics"] for r in grid):
        return "val accuracy at the last epoch, among the settings successive halving did not stop early"
    return "val accuracy at the last epoch"


COLLAPSE_MARGIN = 0.05  # a final run that trains 5 points worse than its grid run (same setting) broke down


def _collapsed(grid_train: float | None, final_train: list[float | None]) -> list[int]:
    """The seeds whose final run trained more than ``COLLAPSE_MARGIN`` below the grid run of the same setting."""
    if grid_train is None:
        return []
    return [seed for seed, train in enumerate(final_train) if train is None or train < grid_train - COLLAPSE_MARGIN]


def summary_markdown(result: dict) -> str:
    """``summary.md``: the grid as a table, the choice and the test accuracy over seeds."""
    lines = [
        f"# {result['method']} on {Path(result['data']).name}",
        "",
        f"Budget `{result['budget']['name']}`: {result['budget']['note']}.",
        "",
        "| base lr | weight decay | prompt length | val accuracy |",
        "|---|---|---|---|",
    ]
    for row in result["grid"]:
        s = row["setting"]
        val = "diverged" if row["val_accuracy"] is None else f"{100 * row['val_accuracy']:.2f}"
        if "pruned_at_epoch" in row:
            by = " by the clock" if row.get("stopped_by") == "time" else ""
            then = "" if row["val_accuracy"] is None else f" ({val})"
            val = f"stopped at epoch {row['pruned_at_epoch']}{by}{then}"
        if "skipped" in row:
            val = f"not run: {row['skipped']}"
        lines.append(f"| {s['base_lr']:g} | {s['weight_decay']:g} | {s['num_tokens'] or '-'} | {val} |")
    c = result["choice"]
    lines += [
        "",
        f"Chosen ({result['chosen_by']}): base lr {c['base_lr']:g}, weight decay {c['weight_decay']:g}"
        + (f", {c['num_tokens']} prompt tokens" if c["num_tokens"] else "")
        + f". Test accuracy over {result['seeds']} seed(s): "
        f"**{100 * result['test_mean']:.2f}** ± {100 * result['test_std']:.2f}.",
        "",
    ]
    if result.get("collapsed_seeds"):
        lines += [
            f"Warning: the final run of seed(s) {result['collapsed_seeds']} trained more than "
            f"{100 * COLLAPSE_MARGIN:.0f} points below the grid run of the same setting: a collapse, not a result.",
            "",
        ]
    return "\n".join(lines)
