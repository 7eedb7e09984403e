"""`vptune sweep --time-budget` against its budget, one sweep after another on a quiet machine, each its own process.

    python benchmarks/time_budget.py --out results/time-budget \\
        eurosat:vpt-deep:20m /tmp/caltech-folders:vpt-deep:20m eurosat:linear:10m /tmp/caltech-folders:linear:cpu-tune

Each case is DATA:METHOD:BUDGET, where BUDGET is a time (``20m``: ``--time-budget``) or a preset's name (``cpu-tune``:
``--budget``). For each: the command's wall time (measured here, around the whole process), the test accuracy of the
tuned model, the plan it printed, its re-plans; written as it goes to ``<out>/results.jsonl`` (one line per case), with
each sweep's ``sweep.json``, ``summary.md`` and ``report.md`` copied to ``<out>/<case>/``. The larger folder of
docs/benchmarks.md is caltech101's 3,000 images of ../shared laid out as class folders (``--caltech-folders DIR``
makes it: symbolic links, one folder per class).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vptune.sweep.timing import parse_duration

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def caltech_folders(target: Path) -> None:
    """caltech101's train, val and test images as ``<target>/<class>/<file>`` links (no split: vptune carves one)."""
    source = SHARED / "caltech101"
    for listing in ("train800.txt", "val200.txt", "test.txt"):
        for line in (source / listing).read_text().splitlines():
            if not line.strip():
                continue
            path = Path(line.rsplit(" ", 1)[0])
            link = target / path.parent.name / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(source / path)


def run_case(case: str, out: Path) -> dict:
    data, method, budget = case.rsplit(":", 2)
    name = f"{Path(data).name}-{method}-{budget}"
    try:
        parse_duration(budget)
        flag = ["--time-budget", budget]
    except ValueError:  # a preset's name
        flag = ["--budget", budget]
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            str(Path(sys.executable).parent / "vptune"),
            "sweep",
            "--data",
            data,
            "--method",
            method,
            *flag,
            "--out",
            scratch,
            "--no-progress",
        ]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        kept = out / name
        kept.mkdir(parents=True, exist_ok=True)
        (kept / "stderr.txt").write_text(done.stderr[-20000:])
        (kept / "stdout.txt").write_text(done.stdout)
        for file in ("sweep.json", "summary.md", "report.md"):
            if (Path(scratch) / file).is_file():
                shutil.copy(Path(scratch) / file, kept / file)
    sweep = json.loads((kept / "sweep.json").read_text()) if (kept / "sweep.json").is_file() else {}
    timing = sweep.get("timing") or {}
    return {
        "case": name, "command": " ".join(["vptune", *command[1:-3], "--out", "DIR"]), "returncode": done.returncode,
        "wall_seconds": round(wall, 1), "budget": budget, "test_accuracy": sweep.get("test_mean"),
        "choice": sweep.get("choice"), "grid": sweep.get("grid"), "plan": (timing.get("plan") or {}),
        "estimate_seconds": timing.get("estimate_seconds"), "replans": timing.get("replans"),
        "seconds_before_report": timing.get("seconds_before_report"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help="DATA:METHOD:BUDGET")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--caltech-folders", type=Path, help="make caltech101 as class folders here first")
    args = parser.parse_args()
    if args.caltech_folders:
        caltech_folders(args.caltech_folders)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    for case in args.cases:
        row = {**run_case(case, args.out), "commit": commit, "cpu": cpu}
        with open(args.out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("case", "returncode", "wall_seconds", "test_accuracy")}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
