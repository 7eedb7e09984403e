"""Serving T tasks from one backbone, measured side by side in one run.

    python benchmarks/serving.py --tasks 16 --image-size 112 --batch-size 32

1. Bytes on disk and resident memory: one backbone + T task files versus T separately fine-tuned models.
2. Throughput of a mixed-task batch (random tasks) versus a single-task batch of the same size.
3. The HTTP server under a fixed concurrent load: requests/s and client-side p50/p99 latency.
Task tensors are random (throughput and memory do not depend on training). The T tasks are VPT-Deep with 10 prompt
tokens; a second mixed batch draws from tasks of three structures (VPT-Deep, VPT-Shallow, linear).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vptune
from vptune.report import file_bytes


def make_tasks(backbone: vptune.Backbone, count: int, size: int, root: Path, varied: bool) -> list[Path]:
    """``count`` VPT-Deep tasks (10 tokens); ``varied``: half VPT-Deep, a quarter VPT-Shallow, a quarter linear."""
    folders = []
    for index in range(count):
        method = "vpt-deep"
        if varied:
            method = "vpt-deep" if index < count // 2 else ("vpt-shallow" if index < 3 * count // 4 else "linear")
        prompt = vptune.PromptConfig(num_tokens=10) if method != "linear" else None
        model = vptune.build(method, backbone, 10, prompt, size, seed=index)
        folders.append(vptune.save_task(model, root / f"{'varied' if varied else 'deep'}{index:02d}"))
    return folders


def rss_of(code: str) -> float:
    """Resident memory (MiB) of a fresh Python process after running ``code``."""
    probe = code + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def time_batches(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def server_load(served: vptune.MultiTask, clients: int, requests: int, max_batch: int) -> dict:
    import httpx
    import uvicorn

    from vptune.serve import ServeConfig, create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(served, ServeConfig(max_batch=max_batch)), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url, names, image = f"http://127.0.0.1:{port}/predict", served.names, png(0)

    def client(index: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=120) as session:
            for r in range(requests):
                start = time.perf_counter()
                task = names[(index * requests + r) % len(names)]
                session.post(
                    url, files={"image": ("x.png", image, "image/png")}, data={"task": task}
                ).raise_for_status()
                latencies.append(1000 * (time.perf_counter() - start))
        return latencies

    client(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(x for batch in pool.map(client, range(clients)) for x in batch)
    seconds = time.perf_counter() - start
    stats = httpx.get(f"http://127.0.0.1:{port}/metrics").json()
    server.should_exit = True
    thread.join(timeout=10)
    return {
        "clients": clients,
        "requests": clients * requests,
        "requests_per_s": round(clients * requests / seconds, 2),
        "p50_ms": round(latencies[len(latencies) // 2], 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "server_mean_batch": stats["mean_batch_size"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2-small")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", "--batch", dest="batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="requests per client")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    backbone = vptune.load_backbone(args.backbone)
    result: dict = {
        "tasks": args.tasks,
        "image_size": args.image_size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_tasks(backbone, args.tasks, args.image_size, Path(tmp), varied=False)
        varied = vptune.MultiTask(backbone, make_tasks(backbone, args.tasks, args.image_size, Path(tmp), varied=True))
        full = vptune.save_task(vptune.build("full", backbone, 10, image_size=args.image_size), Path(tmp) / "full")
        weights = Path(vptune.backbones.resolve_spec(args.backbone)) / "model.safetensors"
        result["disk_one_backbone_plus_tasks_bytes"] = weights.stat().st_size + sum(file_bytes(f) for f in folders)
        result["disk_separate_full_models_bytes"] = args.tasks * file_bytes(full)
        load = f"import vptune; bb = vptune.load_backbone({args.backbone!r})"
        result["rss_one_backbone_plus_tasks_mib"] = rss_of(
            f"{load}; m = vptune.MultiTask(bb, {[str(f) for f in folders]!r})"
        )
        result["rss_separate_full_models_mib"] = rss_of(
            f"{load}; ms = [vptune.load_task({str(full)!r}, backbone=bb) for _ in range({args.tasks})]"
        )
        served = vptune.MultiTask(backbone, folders)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        mixed = torch.randint(0, args.tasks, (args.batch,), generator=torch.Generator().manual_seed(0))
        single = torch.zeros(args.batch, dtype=torch.long)
        with torch.inference_mode():
            t_mixed = time_batches(lambda: served(x, mixed), args.repeats)
            t_single = time_batches(lambda: served(x, single), args.repeats)
            t_plain = time_batches(lambda: served.models[0](x), args.repeats)
            t_varied = time_batches(lambda: varied(x, mixed), args.repeats)
        result["mixed_batch_images_per_s"] = round(args.batch / t_mixed, 2)
        result["single_task_batch_images_per_s"] = round(args.batch / t_single, 2)
        result["plain_task_model_images_per_s"] = round(args.batch / t_plain, 2)
        result["mixed_over_single"] = round(t_single / t_mixed, 3)
        result["mixed_three_structures_images_per_s"] = round(args.batch / t_varied, 2)
        result["server"] = server_load(served, args.clients, args.requests, args.batch)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
