"""The bench table and figures of finished runs, gathered from one or more result folders, training nothing.

    python benchmarks/bench_table.py benchmarks/results/bench-cpu-designs --budget cpu --seeds 3 \\
        --tasks cifar10,eurosat --methods vpt-deep,linear,full --source full=benchmarks/results/bench-gpu-cpu3 \\
        --out docs/designs

Each cell (task, method) is read from ``<root>/<task>/<method>/runs/*.json`` (the ``runs/`` a sweep or
``vptune bench`` writes), ``root`` being the first folder or, for a method named in ``--source``, that folder. The
runs are those ``vptune bench`` with the same budget, seeds and backbone would plan, to the letter (a run recorded
for another spec, a data path included, counts as missing), and the table, CSV and figures are written by the
bench's own code (``vptune.bench.run_bench``, with an executor that refuses to train), so they are what the bench
itself would print. A missing run is an error that names it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from vptune.bench import plan_bench, run_bench
from vptune.data import open_task

OUTPUTS = ("bench.md", "bench.csv", "bench.json", "accuracy.png", "tradeoff.png")


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


def table(root: Path, sources: dict[str, Path], tasks: list[str], methods: list[str], out: Path, **plan) -> dict:
    """Write the bench's outputs for ``tasks`` x ``methods`` into ``out``; return its summary."""
    with tempfile.TemporaryDirectory() as scratch:
        gather(root, sources, tasks, methods, Path(scratch))
        roots = [str(open_task(task).root) for task in tasks]  # as vptune bench plans them
        summary = run_bench(plan_bench(roots, methods, **plan), scratch, execute=refuse)
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copy2(Path(scratch) / name, out / name)
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
