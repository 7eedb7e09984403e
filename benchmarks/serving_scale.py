"""Serving 16, 1,000 and 10,000 task folders from one backbone: memory, throughput, start and load times, latency.

    python benchmarks/serving_scale.py --tasks 16 1000 10000 --image-size 112 --json results/serving-scale.json

Task folders: one VPT-Deep task (10 tokens, every block, 10 classes) on DINOv2 ViT-S/14, copied with its prompts and
head perturbed by a seeded draw per copy (distinct tensors; cost does not depend on training), saved under
``--work``. Each measurement runs in a fresh process, so resident memory is that process's alone:

1. ``vptune.MultiTask`` over the root: start (listing), every task loaded in turn (time per task, resident memory
   per task against its file size), then images/s of batches mixing 8 distinct tasks against batches of one task,
   alternated, side by side.
2. ``vptune serve --lazy --task-root`` over loopback: start until /health answers, p50/p99 latency of a request to a
   resident task and to a cold one (its first request).
3. The largest count through the server with ``--max-resident``: every task requested in turn, the server's resident
   memory sampled as it goes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vptune


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def task_name(index: int) -> str:
    return f"g{index // 1000:02d}/t{index:05d}"


def make_root(backbone: str, size: int, count: int, work: Path) -> Path:
    """``count`` distinct VPT-Deep task folders under ``work/root{count}`` (made once, reused)."""
    root = work / f"root{count}"
    done = root / "complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    model = vptune.build("vpt-deep", vptune.load_backbone(backbone), 10, vptune.PromptConfig(num_tokens=10), size)
    base = {name: tensor.clone() for name, tensor in model.task_state_dict().items()}
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, tensor in model.task_state_dict().items():
                if tensor.is_floating_point() and "running" not in name:
                    tensor.copy_(base[name] + 0.01 * torch.randn(tensor.shape, generator=generator))
        vptune.save_task(model, root / task_name(index))
    done.write_text(str(count))
    return root


def task_file_bytes(root: Path) -> int:
    folder = root / task_name(0)
    return sum(file.stat().st_size for file in folder.iterdir())


def png(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- 1. MultiTask in a fresh process ------------------------------------------------------------------------------
def multitask_worker(backbone_spec: str, root: Path, size: int, repeats: int) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    backbone = vptune.load_backbone(backbone_spec)
    backbone.fingerprint()
    x = torch.randn(8, 3, size, size)
    start = time.perf_counter()
    served = vptune.MultiTask(backbone, root=root)
    names = served.servable()
    listing_s = time.perf_counter() - start
    served(x[:1], [names[0]])  # the structure's table and the first row: part of the fixed cost
    before = rss_mib()
    start = time.perf_counter()
    for name in names[1:]:
        served.info(name)
    load_s = time.perf_counter() - start
    after = rss_mib()
    per_task_mib = (after - before) / max(1, len(names) - 1)
    rng = random.Random(0)

    def mixed() -> None:
        served(x, rng.sample(names, 8))

    def single() -> None:
        served(x, [rng.choice(names)] * 8)

    for fn in (mixed, single):
        fn()
    times = {"mixed": [], "single": []}
    for _ in range(repeats):  # alternated, so that both see the same machine
        for label, fn in (("mixed", mixed), ("single", single)):
            begin = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - begin)
    mixed_ips, single_ips = (8 / statistics.median(times[k]) for k in ("mixed", "single"))
    kept = sum(s.cache.computed for s in served.groups() if s.cache is not None) // backbone.depth
    return {
        "tasks": len(names),
        "listing_s": round(listing_s, 3),
        "load_ms_per_task": round(1000 * load_s / max(1, len(names) - 1), 3),
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(after, 1),
        "resident_kib_per_task": round(1024 * per_task_mib, 1),
        "task_file_kib": round(task_file_bytes(root) / 1024, 1),
        "resident_per_file": round(1024 * per_task_mib / (task_file_bytes(root) / 1024), 3),
        "mixed8_images_per_s": round(mixed_ips, 2),
        "single8_images_per_s": round(single_ips, 2),
        "mixed_over_single": round(mixed_ips / single_ips, 3),
        "rss_after_batches_mib": round(rss_mib(), 1),  # with the prompt keys and values kept for the tasks used
        "tasks_with_kept_keys_values": kept,
    }


# --- 2 and 3. the HTTP server -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(backbone: str, root: Path, max_resident: int | None) -> tuple[subprocess.Popen, str, float]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "vptune.cli", "serve", "--lazy", "--task-root", str(root), "--backbone", backbone]
    command += ["--port", str(port), "--max-wait-ms", "5"]
    if max_resident:
        command += ["--max-resident", str(max_resident)]
    begin = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server stopped: {process.stderr.read()}")
        time.sleep(0.05)
    return process, url, time.perf_counter() - begin


def timed_request(client, url: str, name: str, image: bytes) -> float:
    begin = time.perf_counter()
    answer = client.post(f"{url}/predict", files={"image": ("x.png", image, "image/png")}, data={"task": name})
    if answer.status_code != 200:
        raise RuntimeError(f"{name}: {answer.status_code} {answer.text}")
    return 1000 * (time.perf_counter() - begin)


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "p50_ms": round(ordered[len(ordered) // 2], 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        "n": len(ordered),
    }


def server_latency(backbone: str, root: Path, size: int, requests: int) -> dict:
    import httpx

    process, url, start_s = start_server(backbone, root, None)
    try:
        names = sorted({task_name(i) for i in range(int((root / "complete").read_text()))})
        rng = random.Random(1)
        cold = rng.sample(names, min(len(names), requests))
        image = png(0, size)
        with httpx.Client(timeout=60) as client:
            cold_ms = [timed_request(client, url, name, image) for name in cold]
            resident = cold[:8]
            warm_ms = [timed_request(client, url, resident[i % len(resident)], image) for i in range(requests)]
            listed = client.get(f"{url}/tasks").json()
        mixed, single = concurrent_rates(url, resident, image, requests)
        return {
            "start_s": round(start_s, 2),
            "cold": percentiles(cold_ms),
            "resident": percentiles(warm_ms),
            "servable_listed": len(listed["servable"]),
            "concurrent8_mixed_requests_per_s": mixed,
            "concurrent8_single_requests_per_s": single,
            "concurrent_mixed_over_single": round(mixed / single, 3),
            "server_rss_mib": round(rss_mib(process.pid), 1),
        }
    finally:
        process.terminate()
        process.wait()


def concurrent_rates(url: str, resident: list[str], image: bytes, requests: int) -> tuple[float, float]:
    """Requests/s of 8 clients at once, each asking its own resident task (the server's batches mix 8 tasks), against
    8 clients asking one task; alternated rounds, the median of each."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    clients = [httpx.Client(timeout=60) for _ in range(8)]

    def round_of(names: list[str]) -> float:
        def one(index: int) -> None:
            for _ in range(requests // 8 // 4):
                timed_request(clients[index], url, names[index], image)

        begin = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, range(8)))
        return 8 * (requests // 8 // 4) / (time.perf_counter() - begin)

    rates: dict[str, list[float]] = {"mixed": [], "single": []}
    try:
        for _ in range(4):
            rates["mixed"].append(round_of(resident[:8]))
            rates["single"].append(round_of([resident[0]] * 8))
    finally:
        for client in clients:
            client.close()
    return round(statistics.median(rates["mixed"]), 2), round(statistics.median(rates["single"]), 2)


def server_bounded(backbone: str, root: Path, size: int, max_resident: int, every: int) -> dict:
    import httpx

    process, url, start_s = start_server(backbone, root, max_resident)
    try:
        count = int((root / "complete").read_text())
        image, samples, latencies = png(0, size), [], []
        begin = time.perf_counter()
        with httpx.Client(timeout=60) as client:
            for index in range(count):
                latencies.append(timed_request(client, url, task_name(index), image))
                if index % every == 0 or index == count - 1:
                    samples.append({"requested": index + 1, "server_rss_mib": round(rss_mib(process.pid), 1)})
            resident = len(client.get(f"{url}/tasks").json()["resident"])
        return {
            "max_resident": max_resident,
            "requested": count,
            "seconds": round(time.perf_counter() - begin, 1),
            "latency": percentiles(latencies),
            "resident_at_end": resident,
            "rss_samples": samples,
        }
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2-small")
    parser.add_argument("--tasks", type=int, nargs="+", default=[16, 1000, 10000])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=20, help="batches of each kind, alternated")
    parser.add_argument("--requests", type=int, default=200, help="requests for each latency")
    parser.add_argument("--max-resident", type=int, default=100)
    parser.add_argument("--work", default="/tmp/vptune-serving-scale", help="where the task folders are made")
    parser.add_argument("--json", help="write the results here (rewritten after each step)")
    parser.add_argument(
        "--steps", nargs="+", default=["multitask", "server", "bounded"], choices=["multitask", "server", "bounded"]
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(multitask_worker(args.backbone, Path(args.worker), args.image_size, args.repeats)))
        return
    work = Path(args.work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict = {"command": " ".join(sys.argv), "commit": commit, "machine": machine()}
    results.update(multitask=[], server=[])

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    for count in args.tasks:
        root = make_root(args.backbone, args.image_size, count, work)
        if "multitask" in args.steps:
            worker = [sys.executable, __file__, "--worker", str(root), "--backbone", args.backbone]
            worker += ["--image-size", str(args.image_size), "--repeats", str(args.repeats)]
            measured = json.loads(subprocess.run(worker, capture_output=True, text=True, check=True).stdout)
            results["multitask"].append(measured)
            print("multitask", json.dumps(measured), flush=True)
            save()
        if "server" in args.steps:
            latency = {"tasks": count, **server_latency(args.backbone, root, args.image_size, args.requests)}
            results["server"].append(latency)
            print("server", json.dumps(latency), flush=True)
            save()
    if "bounded" in args.steps:
        largest = make_root(args.backbone, args.image_size, max(args.tasks), work)
        results["bounded"] = server_bounded(args.backbone, largest, args.image_size, args.max_resident, 500)
        print("bounded", json.dumps(results["bounded"]), flush=True)
        save()


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
