"""``vptune serve``: an HTTP service (FastAPI + uvicorn) over :class:`MultiTask` with dynamic batching.

Concurrent requests wait at most ``max_wait_ms`` to be gathered into one mixed-task batch of at most ``max_batch``
images; the batch runs on one worker thread, so the model never runs twice at once and tasks can be added or removed
between batches.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:  # optional: pip install 'vptune[serve]'; FastAPI reads the handlers' annotations from this module
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from starlette.datastructures import UploadFile  # what request.form() yields
except ImportError:  # pragma: no cover - checked in create_app
    FastAPI = None

from .backbones import load_backbone
from .multitask import MultiTask
from .preprocessing import DataError, Preprocessing
from .report import top_classes
from .taskfile import RECORD, read_record


@dataclass
class ServeConfig:
    """How the server batches and what it accepts."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    top_k: int = 5
    max_image_bytes: int = 10 * 2**20


@dataclass
class _Item:
    pixels: torch.Tensor  # normalised (3, S, S)
    task: str
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class _Stats:
    requests: int = 0
    images: int = 0
    batches: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=10_000))
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def snapshot(self) -> dict:
        latencies = sorted(self.latencies_ms)
        sizes = list(self.batch_sizes)

        def percentile(q: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

        return {
            "requests": self.requests,
            "images": self.images,
            "batches": self.batches,
            "mean_batch_size": round(sum(sizes) / len(sizes), 3) if sizes else None,
            "max_batch_size": max(sizes) if sizes else None,
            "latency_ms": {"p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99)},
        }


class Batcher:
    """Gathers single-image predictions from concurrent requests into mixed-task batches."""

    def __init__(self, served: MultiTask, config: ServeConfig):
        self.served, self.config = served, config
        self.lock = threading.Lock()  # model runs and task changes never overlap
        self.stats = _Stats()
        self.queue: asyncio.Queue[_Item] | None = None
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    async def predict(self, pixels: torch.Tensor, task: str) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        item = _Item(pixels, task, loop.create_future(), loop)
        await self.queue.put(item)
        return await item.future

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.perf_counter() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            await asyncio.to_thread(self._forward, batch)

    def _forward(self, batch: list[_Item]) -> None:
        with self.lock:
            names = self.served.names
            ready = [item for item in batch if item.task in names]
            for item in batch:
                if item.task not in names:
                    _resolve(item, KeyError(f"task {item.task!r} was removed"))
            by_size: dict[tuple, list[_Item]] = {}
            for item in ready:  # tasks with different input sizes run as separate batches
                by_size.setdefault(tuple(item.pixels.shape), []).append(item)
            for items in by_size.values():
                try:
                    pixels = torch.stack([item.pixels for item in items])
                    logits = self.served(pixels, [names.index(item.task) for item in items])
                except Exception as error:  # a failed batch answers its requests with the error
                    for item in items:
                        _resolve(item, error)
                    continue
                self.stats.batches += 1
                self.stats.batch_sizes.append(len(items))
                for item, values in zip(items, logits, strict=True):
                    _resolve(item, values)


def _resolve(item: _Item, value) -> None:
    def settle() -> None:
        if item.future.done():
            return
        if isinstance(value, BaseException):
            item.future.set_exception(value)
        else:
            item.future.set_result(value)

    item.loop.call_soon_threadsafe(settle)


def create_app(served: MultiTask, config: ServeConfig | None = None):
    """The FastAPI application: ``/health``, ``/tasks``, ``/predict``, ``/metrics``."""
    if FastAPI is None:
        raise ImportError("vptune serve needs FastAPI and uvicorn: pip install 'vptune[serve]'")
    from contextlib import asynccontextmanager

    config = config or ServeConfig()
    batcher = Batcher(served, config)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="vptune", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "tasks": len(served.names)}

    @app.get("/tasks")
    async def tasks() -> dict:
        return {"tasks": [_describe(name, model) for name, model in zip(served.names, served.models, strict=True)]}

    @app.post("/tasks")
    async def add_task(body: dict) -> dict:
        path = body.get("path") if isinstance(body, dict) else None
        if not path:
            raise HTTPException(400, 'send JSON {"path": "<task folder>", "name": "<optional name>"}')
        try:
            name = await asyncio.to_thread(_locked, batcher.lock, served.add, Path(path), body.get("name"))
        except (ValueError, FileNotFoundError) as error:
            raise HTTPException(400, str(error)) from error
        return {"added": name, "tasks": served.names}

    @app.delete("/tasks/{name}")
    async def remove_task(name: str) -> dict:
        try:
            await asyncio.to_thread(_locked, batcher.lock, served.remove, name)
        except KeyError as error:
            raise HTTPException(404, str(error.args[0])) from error
        return {"removed": name, "tasks": served.names}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        start = time.perf_counter()
        form = await _form(request)
        image, names = form.get("image"), form.getlist("task")
        if not isinstance(image, UploadFile):
            raise HTTPException(400, "send the image as the multipart field 'image'")
        names = names or served.names
        unknown = [name for name in names if name not in served.names]
        if unknown:
            raise HTTPException(404, f"unknown task(s) {unknown}; serving: {', '.join(served.names)}")
        data = await image.read(config.max_image_bytes + 1)
        if len(data) > config.max_image_bytes:
            raise HTTPException(413, f"image larger than {config.max_image_bytes} bytes")
        top_k = _top_k(form.get("top_k"), config.top_k)
        models = [served.task(name) for name in names]
        inputs = await asyncio.to_thread(_prepare, data, [model.preprocessing for model in models])
        try:
            logits = await asyncio.gather(*(batcher.predict(x, name) for x, name in zip(inputs, names, strict=True)))
        except KeyError as error:
            raise HTTPException(404, str(error.args[0])) from error
        answers = {
            name: top_classes(values.float().softmax(dim=-1), model.classes, top_k)
            for name, values, model in zip(names, logits, models, strict=True)
        }
        batcher.stats.requests += 1
        batcher.stats.images += len(names)
        batcher.stats.latencies_ms.append(1000 * (time.perf_counter() - start))
        return {"predictions": answers}

    @app.get("/metrics")
    async def metrics() -> dict:
        return batcher.stats.snapshot()

    @app.exception_handler(DataError)
    async def bad_image(request, error: DataError):
        return JSONResponse({"detail": f"the image cannot be decoded: {error}"}, status_code=400)

    return app


def _locked(lock: threading.Lock, fn, *args):
    with lock:
        return fn(*args)


async def _form(request):
    try:
        return await request.form()
    except Exception as error:  # a body that is not multipart form data
        raise HTTPException(400, f"send multipart/form-data with fields 'image' and 'task' ({error})") from error


def _top_k(value, default: int) -> int:
    try:
        top_k = int(value) if value is not None else default
    except ValueError as error:
        raise HTTPException(400, f"top_k must be an integer, got {value!r}") from error
    if top_k < 1:
        raise HTTPException(400, f"top_k must be >= 1, got {top_k}")
    return top_k


def _prepare(data: bytes, preprocessings: list[Preprocessing]) -> list[torch.Tensor]:
    """The image as each task's input, decoded once per distinct preprocessing."""
    inputs = {prep: prep(io.BytesIO(data)) for prep in dict.fromkeys(preprocessings)}
    return [inputs[prep] for prep in preprocessings]


def _describe(name: str, model) -> dict:
    return {
        "name": name,
        "method": model.method,
        "classes": model.classes,
        "image_size": model.image_size,
        "prompt_tokens": model.prompt_config.num_tokens,
    }


def serve_folders(paths: list[str], backbone: str | None, host: str, port: int, config: ServeConfig) -> None:
    """Load the task folders (or folders of task folders) on one backbone and serve them until interrupted."""
    import uvicorn

    folders = [
        p for path in map(Path, paths) for p in ([path] if (path / RECORD).is_file() else sorted(path.iterdir()))
    ]
    folders = [folder for folder in folders if (folder / RECORD).is_file()]
    if not folders:
        raise ValueError(f"no task folders (with {RECORD}) in {paths}")
    spec = backbone or read_record(folders[0])["backbone"]["spec"]
    served = MultiTask(load_backbone(spec), folders)
    uvicorn.run(create_app(served, config), host=host, port=port, log_level="warning")
