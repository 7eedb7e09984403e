"""The bench table and figures of finished runs, gathered from one or more result folders, training nothing.

    python -m vptune.tools.bench_table results/bench-cpu-designs --budget cpu --seeds 3 \\
        --tasks cifar10,eurosat --methods vpt-deep,linear,full --source full=results/bench-gpu-cpu3 \\
        --out results/bench-cpu-designs/table

Each cell (task, method) is read from ``<root>/<task>/<method>/runs/*.json`` (the ``runs/`` a sweep or
``vptune bench`` writes), ``root`` being the first folder or, for a method named in ``--source``, that folder. The
runs are those ``vptune bench`` with the same budget, seeds and backbone would plan, to the letter (a run recorded
for another spec, a data path included, counts as missing), and the table, CSV and figures are written by the
bench's own code (``vptune.bench.run_bench``, with an executor that refuses to train), so they are what the bench
itself would print; ``detail.md`` adds, per cell, each grid point's val accuracy (the chosen one in bold), each
final run's train accuracy and the final runs' mean time for their last epoch. A missing run is an error that names it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ..bench import plan_bench, run_bench
from ..data import open_task

OUTPUTS = ("bench.md", "bench.csv", "bench.json", "accuracy.png", "tradeoff.png")
DETAIL_HEADER = (
    "| task | method | grid (base lr: val %) | final train % (by seed) | s / last epoch |\n|---|---|---|---|---|"
)


class MissingRun(RuntimeError):
    """A run the table needs is not among the recorded ones."""


def refuse(entries: list[dict], finished) -> None:
    """The executor: every run asked of it is missing from the recorded results."""
    names = ", ".join(f"{e['run']['data']} {e['run']['method']} {e['id']}" for e in entries)
    raise MissingRun(f"not recorded (or recorded for another spec): {names}; run them with vptune bench first")


def gather(root: Path, sources: dict[str, Path], tasks: list[str], methods: list[str], into: Path) -> None:
    """Copy each cell's recorded ``runs/*.json`` into ``into/<task>/<method>/runs/``."""
    for task in (Path(task).name for task in tasks):
        for method in methods:
            source = sources.get(method, root) / task / method / "runs"
            if not source.is_dir():
                raise MissingRun(f"no runs for {task} {method}: {source} does not exist")
            target = into / task / method / "runs"
            target.mkdir(parents=True)
            for path in source.glob("*.json"):
                shutil.copy2(path, target / path.name)


def detail_row(task: str, method: str, sweep: dict, scratch: Path) -> str:
    """One line of the detail table from a cell's ``sweep.json``: each grid point's val accuracy (the chosen one in
    bold), each final run's train accuracy, and the final runs' mean time for their last epoch."""
    points = []
    for row in sorted(sweep["grid"], key=lambda row: row["setting"]["base_lr"]):
        val = row["val_accuracy"]
        point = f"{row['setting']['base_lr']:g}: " + ("diverged" if val is None else f"{100 * val:.1f}")
        points.append(f"**{point}**" if row["setting"] == sweep["choice"] else point)
    train = ", ".join("diverged" if t is None else f"{100 * t:.1f}" for t in sweep["final_train_accuracy"])
    finals = [
        json.loads((scratch / "runs" / f"{run}.json").read_text()) for run in sweep["runs"] if run.startswith("final")
    ]
    last = [r["metrics"]["seconds"] for r in finals if "seconds" in r["metrics"]]  # the last epoch's time
    per_epoch = f"{sum(last) / len(last):.3g}" if last else "n/a"
    return f"| {task} | {method} | {'; '.join(points) or 'no grid'} | {train} | {per_epoch} |"


def detail(summary: dict, scratch: Path) -> str:
    """The detail table (markdown): for every cell, the grid, the final runs' train accuracy and their speed."""
    rows = [DETAIL_HEADER]
    for task in summary["tasks"]:
        for method in summary["methods"]:
            cell = scratch / task / method
            rows.append(detail_row(task, method, json.loads((cell / "sweep.json").read_text()), cell))
    return "\n".join(rows) + "\n"


def table(root: Path, sources: dict[str, Path], tasks: list[str], methods: list[str], out: Path, **plan) -> dict:
    """Write the bench's outputs for ``tasks`` x ``methods`` into ``out``; return its summary."""
    with tempfile.TemporaryDirectory() as scratch:
        gather(root, sources, tasks, methods, Path(scratch))
        roots = [str(open_task(task).root) for task in tasks]  # as vptune bench plans them
        summary = run_bench(plan_bench(roots, methods, **plan), scratch, execute=refuse)
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copy2(Path(scratch) / name, out / name)
        (out / "detail.md").write_text(detail(summary, Path(scratch)))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the results folder most cells come from")
    parser.add_argument("--tasks", required=True, help="comma-separated tasks")
    parser.add_argument("--methods", required=True, help="comma-separated methods")
    parser.add_argument("--source", action="append", default=[], help="METHOD=FOLDER: that method's cells from there")
    parser.add_argument("--budget", default="cpu")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--backbone", default="dinov2-small")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sources = {}
    for item in args.source:
        method, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"--source takes METHOD=FOLDER, got {item!r}")
        sources[method] = Path(folder)
    try:
        table(args.root, sources, args.tasks.split(","), args.methods.split(","), args.out, budget=args.budget,
              backbone=args.backbone, seeds=args.seeds)  # fmt: skip
    except MissingRun as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print((args.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
