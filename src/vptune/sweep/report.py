"""What a finished sweep leaves for its user: the tuned model at ``<out>/best/`` (a plain task folder), and a report
of how it was chosen and how it does on test, per class (``report.md``, ``report.json`` and PNG figures).

``best/`` is the final run of the chosen setting with seed 0, never the seed with the best test accuracy: a choice
made by test accuracy would let the test split into the choice and bias the reported accuracy upward.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import load_split, open_task
from ..engine import NonFiniteOutput, Stage, TrainConfig, autocast, cache_dataset, resolve_device
from ..files import write_atomic, write_json
from ..model import TaskModel
from ..taskfile import RECORD, load_task, read_record
from ..trunk_memory import active_memory
from .selection import COLLAPSE_MARGIN

BEST_FOLDER = "best"
REPORT_FILE = "report.md"
REPORT_JSON = "report.json"
FIGURES = {"grid": "grid.png", "per_class": "per_class.png", "confusion": "confusion.png"}
TOP_CONFUSIONS = 10
PER_CLASS_PLOT_MAX = 100  # more classes than this: the per-class figure shows the worst PER_CLASS_WORST only
PER_CLASS_WORST = 30
CONFUSION_LABELS_MAX = 30  # more classes than this: the confusion figure has no tick labels
NO_MATPLOTLIB = "matplotlib is not installed (pip install 'vptune[bench]')"


def write_report(result: dict, out: str | os.PathLike, runs: list[dict] | None = None) -> dict:
    """Copy the seed-0 final run to ``<out>/best/``, score it on test once, write ``report.md``, ``report.json``
    and the figures; return what ``report.json`` holds.

    Args:
        result: what ``sweep.json`` holds (:func:`~vptune.sweep.summarise`).
        out: the sweep folder.
        runs: the results of the sweep's runs, grid and final (default: read from ``<out>/runs/``).
    """
    out = Path(out)
    runs = runs if runs is not None else read_runs(result, out)
    finals = [r for r in runs if r["entry"]["stage"] == "final"]
    chosen = best_final(finals, out)
    copy_folder(out / "tasks" / chosen["entry"]["id"], out / BEST_FOLDER)
    model = load_task(out / BEST_FOLDER, device=resolve_device("auto"))
    task = open_task(result["data"])
    labels, predictions = predict_split(model, load_split(task, "test", model.preprocessing))
    confusion = confusion_matrix(labels, predictions, task.num_classes)
    report = {
        "best": _best_entry(chosen, out),
        "test_images": len(labels),
        "test_accuracy": sum(confusion[i][i] for i in range(len(confusion))) / max(1, len(labels)),
        "classes": task.classes,
        "per_class": per_class_accuracy(confusion, task.classes),
        "confusion": confusion,
        "top_confusions": top_confusions(confusion, task.classes),
    }
    report["figures"], report["figures_skipped"] = _figures(result, runs, report, out)
    write_json(out / REPORT_JSON, report)
    text = report_markdown(result, runs, report)
    write_atomic(out / REPORT_FILE, lambda tmp: Path(tmp).write_text(text))
    return report


def read_runs(result: dict, out: Path) -> list[dict]:
    """The results of the sweep's runs, from ``<out>/runs/<id>.json``."""
    runs = []
    for run_id in result["runs"]:
        path = out / "runs" / f"{run_id}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: rerun the sweep into {out} to run {run_id} again")
        runs.append(json.loads(path.read_text()))
    return runs


def best_final(finals: list[dict], out: Path) -> dict:
    """The final run that becomes ``best/``: seed 0, or the lowest seed that finished when seed 0 diverged."""
    done = [r for r in finals if r["metrics"].get("test_accuracy") is not None]
    if not done:
        raise RuntimeError(f"every final run in {out} diverged: there is no model to report; lower the lr grid")
    chosen = min(done, key=_seed)
    folder = out / "tasks" / chosen["entry"]["id"]
    if not (folder / RECORD).is_file():
        raise FileNotFoundError(
            f"{folder} (the final run of seed {_seed(chosen)}) is missing: delete "
            f"{out / 'runs' / (chosen['entry']['id'] + '.json')} and rerun the sweep to train it again"
        )
    return chosen


def _seed(run: dict) -> int:
    return run["entry"]["run"]["train"]["seed"]


def _best_entry(chosen: dict, out: Path) -> dict:
    record = read_record(out / BEST_FOLDER)
    return {
        "path": BEST_FOLDER,
        "copied_from": f"tasks/{chosen['entry']['id']}",
        "seed": _seed(chosen),
        "recorded_test_accuracy": (record.get("metrics") or {}).get("test_accuracy"),
    }


def copy_folder(source: Path, target: Path) -> None:
    """Copy folder ``source`` to ``target`` whole: into a temporary folder beside ``target``, then renamed there
    (an old ``target`` is removed only once the new one is in place)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        shutil.copytree(source, staging / "new")
        if target.exists():
            os.replace(target, staging / "old")
        os.replace(staging / "new", target)
    finally:
        if not target.exists() and (staging / "old").exists():  # the new one never arrived: the old one stays
            os.replace(staging / "old", target)
        shutil.rmtree(staging, ignore_errors=True)


@torch.no_grad()
def predict_split(model: TaskModel, dataset: Dataset, batch_size: int = 256) -> tuple[list[int], list[int]]:
    """Every sample's true and predicted class (argmax of the logits), in the dataset's order, on the model's
    device and at the precision training evaluates with. Inside :func:`~vptune.trunk_memory.keep_trunk_outputs`
    (a sweep), the frozen trunk's outputs the final run computed for these images are read back, not recomputed."""
    device = next(model.parameters()).device
    point = model.cache_point() if active_memory() is not None else 0
    if point:
        config = TrainConfig(eval_batch_size=batch_size, precision="auto", progress=False)
        dataset = cache_dataset(model, dataset, point, config, device)
    stage = Stage(model, point)
    model.eval()
    labels, predictions = [], []
    for inputs, targets in stage.batches(DataLoader(dataset, batch_size=batch_size, shuffle=False), device):
        with autocast(device, "auto"):
            logits = stage.logits(inputs).float()
        if not torch.isfinite(logits).all():
            raise NonFiniteOutput("the model's outputs on test are NaN or infinite: its task folder is damaged")
        labels += targets.tolist()
        predictions += logits.argmax(dim=1).tolist()
    return labels, predictions


def confusion_matrix(labels: list[int], predictions: list[int], num_classes: int) -> list[list[int]]:
    """Counts: row = true class, column = predicted class."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for true, predicted in zip(labels, predictions, strict=True):
        matrix[true][predicted] += 1
    return matrix


def per_class_accuracy(confusion: list[list[int]], classes: list[str]) -> list[dict]:
    """Each class's test images, correct answers and accuracy (None for a class without test images)."""
    rows = []
    for index, (name, row) in enumerate(zip(classes, confusion, strict=True)):
        images = sum(row)
        accuracy = row[index] / images if images else None
        rows.append({"class": name, "index": index, "images": images, "correct": row[index], "accuracy": accuracy})
    return rows


def top_confusions(confusion: list[list[int]], classes: list[str], limit: int = TOP_CONFUSIONS) -> list[dict]:
    """The (true, predicted) pairs of different classes with the most errors, most first (ties: class order)."""
    pairs = [
        (-count, true, predicted)
        for true, row in enumerate(confusion)
        for predicted, count in enumerate(row)
        if predicted != true and count > 0
    ]
    return [
        {"true": classes[t], "predicted": classes[p], "errors": -c, "share_of_true": -c / sum(confusion[t])}
        for c, t, p in sorted(pairs)[:limit]
    ]


# --- report.md ---------------------------------------------------------------------------------------------------


def report_markdown(result: dict, runs: list[dict], report: dict) -> str:
    """``report.md``: the grid, the choice, the test accuracy over seeds, ``best/`` per class and its confusions."""
    budget = result["budget"]
    lines = [
        f"# Sweep report: {result['method']} on {Path(result['data']).name}",
        "",
        f"Task `{result['data']}` ({len(report['classes'])} classes), method `{result['method']}`, "
        f"backbone `{result['backbone']}`.",
        f"Budget `{budget['name']}`: {budget['note'] or 'no note'}.",
        "",
        *_grid_lines(result, runs, report),
        *_choice_lines(result),
        *_best_lines(report),
        *_per_class_lines(report),
        *_confusion_lines(report),
        *_time_lines(result),
    ]
    return "\n".join(lines)


def _time_lines(result: dict) -> list[str]:
    """The plan and its estimate as printed before training, the re-plans, and the time measured."""
    lines = [
        "## Time",
        "",
        f"The sweep's runs took {result['seconds']:.1f} s (the sum of their own times, grid and final runs; "
        "a resumed run counts the time it took when it ran).",
        "",
    ]
    timing = result.get("timing")
    if not timing:
        return lines
    budget = timing["budget_seconds"]
    lines += ["The plan, as printed before training:", "", "```", timing["text"], "```", ""]
    measured = timing["seconds_before_report"]
    against = f" of the {budget:.0f} s budget ({100 * measured / budget:.0f} %)" if budget else ""
    lines += [
        f"Estimated: {timing['estimate_seconds']:.0f} s in all. Measured: {measured:.0f} s from the command's start "
        f"to this report{against}; the report's own scoring of `best/` comes after.",
        "",
    ]
    if timing["replans"]:
        lines += ["Re-planned on the way, from the measured speed:", "", *(f"- {e}" for e in timing["replans"]), ""]
    return lines


def _grid_lines(result: dict, runs: list[dict], report: dict) -> list[str]:
    grid = [r for r in runs if r["entry"]["stage"] == "grid"]
    if not grid:
        return ["## Grid", "", "One setting only: there was no grid to score.", ""]
    lines = [
        "## Grid (trained on train, scored on val)",
        "",
        "| base lr | weight decay | prompt length | val accuracy | |",
        "|---|---|---|---|---|",
    ]
    for run in grid:
        setting = run["entry"]["setting"]
        mark = "**chosen**" if setting == result["choice"] else ""
        lines.append(
            f"| {setting['base_lr']:g} | {setting['weight_decay']:g} | {setting['num_tokens'] or '-'} "
            f"| {grid_score(run['metrics'])} | {mark} |"
        )
    return [*lines, "", *_figure_line(report, "grid", "val accuracy per setting"), ""]


def grid_score(metrics: dict) -> str:
    """A grid run's val accuracy (%) as the report shows it: a number, ``diverged``, not run (no time left), or where
    it was stopped (by successive halving, or by the clock)."""
    val = metrics.get("val_accuracy")
    if "skipped" in metrics:
        return f"not run: {metrics['skipped']}"
    if "pruned_at_epoch" in metrics:
        by = " by the clock" if metrics.get("stopped_by") == "time" else ""
        return f"stopped at epoch {metrics['pruned_at_epoch']}{by}" + ("" if val is None else f" (val {100 * val:.2f})")
    return "diverged" if val is None else f"{100 * val:.2f}"


def _choice_lines(result: dict) -> list[str]:
    c = result["choice"]
    tests = ", ".join(f"{100 * t:.2f}" for t in result["test_accuracy"])
    lines = [
        "## Choice and test accuracy",
        "",
        f"Chosen: base lr {c['base_lr']:g}, weight decay {c['weight_decay']:g}"
        + (f", {c['num_tokens']} prompt tokens" if c["num_tokens"] else "")
        + f" ({result['chosen_by']}; ties go to the smaller lr). Chosen on val alone: test was not looked at.",
        "",
        f"Retrained on train + val with {result['seeds']} seed(s), scored on test: "
        f"**{100 * result['test_mean']:.2f} ± {100 * result['test_std']:.2f}** (mean ± sd; seeds: {tests}).",
        "",
    ]
    if result.get("diverged_seeds"):
        lines += [f"{result['diverged_seeds']} seed(s) diverged and are not counted.", ""]
    if result.get("chosen_at_edge"):
        lines += [f"Note: {result['chosen_at_edge']}", ""]
    if result.get("collapsed_seeds"):
        lines += [
            f"Warning: the final run of seed(s) {result['collapsed_seeds']} trained more than "
            f"{100 * COLLAPSE_MARGIN:.0f} points below the grid run of the same setting: a collapse, not a result.",
            "",
        ]
    return lines


def _best_lines(report: dict) -> list[str]:
    best = report["best"]
    why = "seed 0" if best["seed"] == 0 else f"seed {best['seed']}, the lowest seed that finished (seed 0 diverged)"
    recorded = best["recorded_test_accuracy"]
    return [
        "## The tuned model: `best/`",
        "",
        f"`best/` is a copy of `{best['copied_from']}/`: the final run with {why}. It is not the seed with the best "
        "test accuracy: choosing a seed by its test score would let the test split into the choice and bias the "
        "reported accuracy upward.",
        "",
        f"Its test accuracy: **{100 * report['test_accuracy']:.2f}** ({report['test_images']} images)"
        + ("" if recorded is None else f"; its run recorded {100 * recorded:.2f}")
        + ".",
        "",
        "Use it like any task folder: `vptune predict best IMAGE...`, `vptune eval best`, `vptune serve best` "
        "(paths relative to the sweep folder), or `vptune.load_task(...)` in Python.",
        "",
    ]


def _per_class_lines(report: dict) -> list[str]:
    lines = ["## Per-class test accuracy of `best/`", "", "| class | images | accuracy |", "|---|---|---|"]
    for row in report["per_class"]:
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}"
        lines.append(f"| {_cell(row['class'])} | {row['images']} | {accuracy} |")
    return [*lines, "", *_figure_line(report, "per_class", "per-class accuracy"), ""]


def _confusion_lines(report: dict) -> list[str]:
    lines = ["## Top confusions of `best/`", ""]
    if not report["top_confusions"]:
        lines += ["None: every test image was classified correctly.", ""]
    else:
        lines += ["| true | predicted | errors | share of the true class |", "|---|---|---|---|"]
        for pair in report["top_confusions"]:
            lines.append(
                f"| {_cell(pair['true'])} | {_cell(pair['predicted'])} | {pair['errors']} "
                f"| {100 * pair['share_of_true']:.1f}% |"
            )
        lines.append("")
    return [*lines, *_figure_line(report, "confusion", "confusion matrix, rows normalised"), ""]


def _figure_line(report: dict, name: str, what: str) -> list[str]:
    if name in report["figures"]:
        return [f"![{what}]({FIGURES[name]})"]
    return [f"No figure ({what}): {report['figures_skipped']}."]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# --- figures -----------------------------------------------------------------------------------------------------


def _figures(result: dict, runs: list[dict], report: dict, out: Path) -> tuple[list[str], str | None]:
    """Write the figures; return the names written and why any are missing (None: all written)."""
    try:
        _pyplot()
    except ImportError:
        warnings.warn(f"the sweep report has no figures: {NO_MATPLOTLIB}", stacklevel=3)
        return [], NO_MATPLOTLIB
    grid = [r for r in runs if r["entry"]["stage"] == "grid"]
    figures = {
        "grid": (lambda: plot_grid(grid, result["choice"])) if grid else None,  # one setting: no grid to plot
        "per_class": lambda: plot_per_class(report["per_class"]),
        "confusion": lambda: plot_confusion(report["confusion"], report["classes"]),
    }
    for name, draw in figures.items():
        if draw is not None:
            save_figure(draw(), out / FIGURES[name])
    return [name for name, draw in figures.items() if draw is not None], None


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Write ``figure`` to ``path`` as a PNG (atomically), then free it."""
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    _pyplot().close(figure)


def plot_grid(grid: list[dict], choice: dict):
    """Val accuracy per setting: x = base lr (log scale), a line per (weight decay, prompt length); the chosen
    setting starred, stopped settings hollow, diverged ones an ``x`` at 0; settings not run (no time left) left out."""
    figure, axes = _pyplot().subplots(figsize=(6.5, 4))
    groups: dict[tuple, list[dict]] = {}
    labelled: set[str] = set()  # each kind of mark named once in the legend
    for run in (r for r in grid if "skipped" not in r["metrics"]):
        setting = run["entry"]["setting"]
        groups.setdefault((setting["weight_decay"], setting["num_tokens"]), []).append(run)
    for (wd, tokens), members in groups.items():
        members = sorted(members, key=lambda r: r["entry"]["setting"]["base_lr"])
        scored = [r for r in members if r["metrics"].get("val_accuracy") is not None]
        label = f"wd {wd:g}" + (f", {tokens} tokens" if tokens else "")
        xs = [r["entry"]["setting"]["base_lr"] for r in scored]
        line = axes.plot(xs, [100 * r["metrics"]["val_accuracy"] for r in scored], marker="o", label=label)[0]
        for run in members:
            _mark_grid_point(axes, run, line.get_color(), labelled)
    chosen = [r for r in grid if r["entry"]["setting"] == choice and r["metrics"].get("val_accuracy") is not None]
    for run in chosen:
        x, y = run["entry"]["setting"]["base_lr"], 100 * run["metrics"]["val_accuracy"]
        axes.scatter(x, y, marker="*", s=260, color="gold", edgecolors="black", zorder=5, label="chosen")
    axes.set_xscale("log")
    axes.set_xlabel("base lr (log scale)")
    axes.set_ylabel("val accuracy (%)")
    axes.legend(fontsize="small")
    return figure


def _mark_grid_point(axes, run: dict, color, labelled: set[str]) -> None:
    """A diverged setting as an ``x`` at 0, a stopped one hollow (its val accuracy at the epoch it stopped)."""
    lr, val, metrics = run["entry"]["setting"]["base_lr"], run["metrics"].get("val_accuracy"), run["metrics"]
    kind = "diverged" if val is None else "stopped early (val then)" if "pruned_at_epoch" in metrics else None
    if kind is None:
        return
    label = None if kind in labelled else kind
    labelled.add(kind)
    if val is None:
        axes.scatter(lr, 0, marker="x", color=color, label=label)
    else:
        axes.scatter(lr, 100 * val, marker="o", s=90, facecolors="white", edgecolors=color, zorder=4, label=label)


def plot_per_class(per_class: list[dict]):
    """Horizontal bars of per-class accuracy (classes with test images); over ``PER_CLASS_PLOT_MAX`` classes only
    the ``PER_CLASS_WORST`` worst, as the title says."""
    rows = [row for row in per_class if row["accuracy"] is not None]
    title = "per-class test accuracy of best/"
    if len(rows) > PER_CLASS_PLOT_MAX:
        rows = sorted(rows, key=lambda row: (row["accuracy"], row["index"]))[:PER_CLASS_WORST]
        title = f"the {PER_CLASS_WORST} worst of {len(per_class)} classes: test accuracy of best/"
    figure, axes = _pyplot().subplots(figsize=(7, max(2.5, 0.5 + 0.2 * len(rows))))
    positions = list(range(len(rows)))
    axes.barh(positions, [100 * row["accuracy"] for row in rows])
    axes.set_yticks(positions, [row["class"] for row in rows], fontsize=7 if len(rows) > 40 else 9)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("test accuracy (%)")
    axes.set_title(title, fontsize=10)
    return figure


def plot_confusion(confusion: list[list[int]], classes: list[str]):
    """The confusion matrix with each row divided by its count (rows = true class); class names as tick labels up
    to ``CONFUSION_LABELS_MAX`` classes."""
    matrix = torch.tensor(confusion, dtype=torch.float64)
    matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    side = min(12.0, max(4.0, 0.3 * len(classes) + 2))
    figure, axes = _pyplot().subplots(figsize=(side + 1, side))
    image = axes.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = list(range(len(classes)))
    if len(classes) <= CONFUSION_LABELS_MAX:
        axes.set_xticks(ticks, classes, rotation=90, fontsize=8)
        axes.set_yticks(ticks, classes, fontsize=8)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    return figure
