"""Load on ``vptune serve``: concurrent clients mixing good requests, malformed ones and oversized images.

    python benchmarks/serve_load.py --tasks 4 --image-size 112 --seconds 20 --clients 16 --json runs/load.json

Starts a server in a process of its own (DINOv2 ViT-S/14 from ../shared by default, or ``--backbone``) over VPT-Deep
task files it makes, and reports requests/s, latency p50/p99 of the good requests, answers by status, broken
connections, the server's resident memory before and after, and whether a fixed image got the same answer before
and after. ``tests/test_serve_load.py`` runs the same load on a tiny backbone and holds it to: no 5xx, no broken
connection, the same answer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

MALFORMED_TASKS = [b"", b"not json", b"[1]", b'{"path": 42}', b'{"path": ["a"]}', b'{"name": "x"}']


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A small PNG of a huge image."""
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def requests(names: list[str], upload_limit: int):
    """Request makers by kind: each returns (method, path, httpx keyword arguments)."""
    oversized, huge = bomb(), b"\0" * (upload_limit + 1000)
    as_json = {"content-type": "application/json"}
    return {
        "good": lambda rng: ("POST", "/predict", {
            "files": {"image": ("x.png", png(rng.randrange(10**6)))}, "data": {"task": rng.sample(names, 2)}}),
        "malformed": lambda rng: rng.choice([
            ("POST", "/tasks", {"content": rng.choice(MALFORMED_TASKS), "headers": as_json}),
            ("POST", "/predict", {"content": b"{}", "headers": as_json}),
            ("POST", "/predict", {"files": {"image": ("x.png", b"not an image")}}),
            ("POST", "/predict", {"files": {"image": ("x.png", png(1))}, "data": {"top_k": "many"}}),
            ("POST", "/predict", {"files": {"image": ("x.png", png(1))}, "data": {"task": "no-such-task"}}),
            ("DELETE", f"/tasks/{rng.choice(names)}", {}),
            ("GET", "/no/such/route", {}),
        ]),
        "oversized": lambda rng: rng.choice([
            ("POST", "/predict", {"files": {"image": ("x.png", oversized)}}),
            ("POST", "/predict", {"content": huge, "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ]),
    }  # fmt: skip


def run_load(url: str, names: list[str], seconds: float, clients: int, upload_limit: int, seed: int = 0) -> dict:
    """``clients`` threads, each with its own keep-alive connection, for ``seconds``: half good requests, a quarter
    malformed, a quarter oversized. Returns the counts by kind and status, broken connections, latencies."""
    makers, lock = requests(names, upload_limit), threading.Lock()
    statuses: dict[str, dict[int, int]] = {kind: {} for kind in makers}
    latencies: list[float] = []
    broken: list[str] = []
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        rng = random.Random(seed + index)
        with httpx.Client(base_url=url, timeout=120) as session:
            while time.perf_counter() < deadline:
                kind = rng.choice(["good", "good", "malformed", "oversized"])
                method, path, options = makers[kind](rng)
                start = time.perf_counter()
                try:
                    status = session.request(method, path, **options).status_code
                except httpx.TransportError as error:
                    with lock:
                        broken.append(f"{kind} {path}: {error!r}")
                    continue
                with lock:
                    statuses[kind][status] = statuses[kind].get(status, 0) + 1
                    if kind == "good" and status == 200:
                        latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    total = sum(sum(counts.values()) for counts in statuses.values())
    return {
        "seconds": round(elapsed, 2),
        "clients": clients,
        "requests": total,
        "requests_per_s": round(total / elapsed, 2),
        "good_latency_ms": {
            "p50": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p99": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
            if latencies
            else None,
        },  # fmt: skip
        "statuses": {kind: dict(sorted(counts.items())) for kind, counts in statuses.items()},
        "server_errors": sum(n for counts in statuses.values() for status, n in counts.items() if status >= 500),
        "broken_connections": broken,
    }


def answer(url: str, image: bytes, task: str) -> list[dict]:
    files = {"image": ("fixed.png", image)}
    return httpx.post(f"{url}/predict", files=files, data={"task": task, "top_k": "1000"}, timeout=120).json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2-small", help="backbone spec")
    parser.add_argument("--tasks", type=int, default=4, help="VPT-Deep task files served")
    parser.add_argument("--image-size", type=int, default=112, help="their input side")
    parser.add_argument("--seconds", type=float, default=20, help="how long the load lasts")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--max-upload-bytes", type=int, default=1_000_000, help="the server's upload limit")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    import vptune

    with tempfile.TemporaryDirectory() as tmp:
        backbone = vptune.load_backbone(args.backbone)
        names = [f"task{i}" for i in range(args.tasks)]
        for seed, name in enumerate(names):
            model = vptune.build("vpt-deep", backbone, 10, image_size=args.image_size, seed=seed)
            vptune.save_task(model, Path(tmp) / name)
        command = [sys.executable, "-m", "vptune.cli", "serve", tmp, "--port", str(args.port)]
        command += ["--max-upload-bytes", str(args.max_upload_bytes), "--backbone", args.backbone]
        server = subprocess.Popen(command)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            fixed = png(12345)
            before, rss_before = answer(url, fixed, names[0]), _rss(server.pid)
            with _sampled_rss(server.pid, every=args.seconds / 10) as samples:
                result = run_load(url, names, args.seconds, args.clients, args.max_upload_bytes)
            after, rss_after = answer(url, fixed, names[0]), _rss(server.pid)
        finally:
            server.terminate()
            server.wait()
    result.update(
        same_answer_before_and_after=before == after,
        server_rss_mib={"before": rss_before, "during": samples, "after": rss_after},
    )
    result["broken_connections"] = len(result["broken_connections"])
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


@contextlib.contextmanager
def _sampled_rss(pid: int, every: float) -> Iterator[list[float]]:
    """The server's resident memory every ``every`` seconds while the block runs (does it level off?)."""
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            samples.append(_rss(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


def _rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
