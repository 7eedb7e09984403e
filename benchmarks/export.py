"""ONNX Runtime (fp32, int8 backbone) against PyTorch eager, measured side by side in one run, and what int8 costs.

    python benchmarks/export.py --tasks /tmp/exp/eurosat /tmp/exp/coil20_pose /tmp/exp/signdigits \\
        --json results/export.json

1. Images/s of one VPT-Deep task at 112 and 224 (DINOv2 ViT-S/14, 10 tokens): PyTorch eager fp32, ONNX Runtime fp32
   and ONNX Runtime int8, batch 1, 8 and 32, the same thread count, rounds alternated, medians (ONNX Runtime's threads
   sleep between runs instead of spinning, so that they do not slow the PyTorch runs beside them).
2. A structure graph (8 tasks, each sample's tensors as inputs) against ``MultiTask``, batches of 8 distinct tasks.
3. Test accuracy of trained task folders (``--tasks``): PyTorch, ONNX Runtime fp32, ONNX Runtime int8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vptune
from vptune.data import open_task, read_split
from vptune.export import OnnxTask, OnnxTasks, export_onnx


def rate(fn, batch: int, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return batch / statistics.median(times)


def speed(backbone, size: int, batches: list[int], rounds: int, threads: int, work: Path) -> list[dict]:
    model = vptune.build("vpt-deep", backbone, 10, vptune.PromptConfig(num_tokens=10), size).eval()
    fp32, int8 = (
        export_onnx(model, work / f"fp32-{size}.onnx"),
        export_onnx(model, work / f"int8-{size}.onnx", int8=True),
    )
    graphs = {"onnx_fp32": fp32, "onnx_int8": int8}
    runners = {name: OnnxTask(path, threads, spinning=False) for name, path in graphs.items()}
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            calls = {"eager_fp32": lambda x=x: model(x)}
            calls.update({k: (lambda r=r, x=x: r(x.numpy())) for k, r in runners.items()})
            rates: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(3):  # alternated
                for name, fn in calls.items():
                    rates[name].append(rate(fn, batch, rounds))
        row = {"image_size": size, "batch": batch, **{k: round(statistics.median(v), 2) for k, v in rates.items()}}
        row["onnx_fp32_over_eager"] = round(row["onnx_fp32"] / row["eager_fp32"], 3)
        row["onnx_int8_over_eager"] = round(row["onnx_int8"] / row["eager_fp32"], 3)
        rows.append(row)
        print("speed", json.dumps(row), flush=True)
    return rows


def structure(backbone, size: int, rounds: int, threads: int, work: Path) -> dict:
    tasks = {}
    for index in range(8):
        model = vptune.build("vpt-deep", backbone, 10, vptune.PromptConfig(num_tokens=10), size, seed=index).eval()
        tasks[f"t{index}"] = model
    graph = export_onnx(tasks["t0"], work / "structure.onnx", structure=True)
    onnx_tasks = OnnxTasks(graph, tasks, threads, spinning=False)
    served = vptune.MultiTask(backbone)
    for name, model in tasks.items():
        served.add(model, name=name)
    names = list(tasks)
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        calls = {"multitask_eager": lambda: served(x, names), "structure_onnx": lambda: onnx_tasks(x.numpy(), names)}
        rates: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(3):
            for name, fn in calls.items():
                rates[name].append(rate(fn, 8, rounds))
    row = {"image_size": size, "batch": 8, **{k: round(statistics.median(v), 2) for k, v in rates.items()}}
    row["onnx_over_multitask"] = round(row["structure_onnx"] / row["multitask_eager"], 3)
    print("structure", json.dumps(row), flush=True)
    return row


def accuracy(folder: Path, backbone, threads: int, work: Path) -> dict:
    model = vptune.load_task(folder, backbone=backbone)
    record = json.loads((folder / "vptune.json").read_text())
    data = open_task(record["data"]["name"])
    samples = read_split(data, "test")
    fp32 = OnnxTask(export_onnx(model, work / "a32.onnx"), threads)
    int8 = OnnxTask(export_onnx(model, work / "a8.onnx", int8=True), threads)
    correct = {"eager_fp32": 0, "onnx_fp32": 0, "onnx_int8": 0}
    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        x = torch.stack([model.preprocessing(image) for image, _ in chunk])
        labels = np.array([label for _, label in chunk])
        with torch.no_grad():
            correct["eager_fp32"] += int((model(x).argmax(-1).numpy() == labels).sum())
        correct["onnx_fp32"] += int((fp32(x.numpy()).argmax(-1) == labels).sum())
        correct["onnx_int8"] += int((int8(x.numpy()).argmax(-1) == labels).sum())
    row = {"task": record["data"]["name"], "test_images": len(samples)}
    row.update({k: round(100 * v / len(samples), 2) for k, v in correct.items()})
    row["int8_minus_fp32_points"] = round(row["onnx_int8"] - row["eager_fp32"], 2)
    print("accuracy", json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2-small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", nargs="*", default=[], help="trained task folders to score fp32 against int8")
    parser.add_argument("--json", help="write the results here (rewritten after each step)")
    parser.add_argument("--steps", nargs="+", default=["accuracy", "speed", "structure"])
    args = parser.parse_args()
    threads = torch.get_num_threads()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    results: dict = {"command": " ".join(sys.argv), "commit": commit, "machine": f"{model_name}, {threads} threads"}
    results.update(speed=[], structure=[], accuracy=[])

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    backbone = vptune.load_backbone(args.backbone)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for folder in args.tasks if "accuracy" in args.steps else []:
            results["accuracy"].append(accuracy(Path(folder), backbone, threads, work))
            save()
        for size in args.sizes if "speed" in args.steps else []:
            results["speed"] += speed(backbone, size, args.batches, args.rounds, threads, work)
            save()
        if "structure" in args.steps:
            results["structure"].append(structure(backbone, args.sizes[0], args.rounds, threads, work))
            save()


if __name__ == "__main__":
    main()
