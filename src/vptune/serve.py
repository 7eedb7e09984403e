"""``vptune serve``: an HTTP service (FastAPI + uvicorn) over :class:`MultiTask` with dynamic batching.

Concurrent requests wait at most ``max_wait_ms`` to be gathered into one mixed-task batch of at most ``max_batch``
images; the batch runs on one worker thread, so the model never runs twice at once and tasks can be added or removed
between batches. Safe to expose: request bodies and images are bounded before they are read or decoded, the endpoints
that change the served tasks need an admin token (and are off without one), every malformed request gets a 4xx with
a JSON message, and ``/metrics`` counts every response by status.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import re
import threading
import time
import warnings
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

try:  # optional: pip install 'vptune[serve]'; FastAPI reads the handlers' annotations from this module
    from fastapi import FastAPI, HTTPException, Request, Response
    from fastapi.responses import JSONResponse
    from starlette.datastructures import UploadFile  # what request.form() yields
except ImportError:  # pragma: no cover - checked in create_app
    FastAPI = None

from .backbones import load_backbone
from .config import check_fields, option
from .httpguard import BodyLimit, Guard, Metrics, TooLarge
from .multitask import MultiTask
from .preprocessing import DataError, Preprocessing
from .report import top_classes
from .taskfile import RECORD, read_record

_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError)


@dataclass
class ServeConfig:
    """How the server batches and what it accepts."""

    max_batch: int = option(32, "most images per model run")
    max_wait_ms: float = option(5.0, "longest wait to fill a batch (milliseconds)")
    top_k: int = option(5, "classes per answer unless the request says")
    max_upload_bytes: int = option(10 * 2**20, "largest request body in bytes, refused while it streams in")
    max_pixels: int = option(40_000_000, "largest image (width x height), refused before it is decoded")
    max_tasks: int = option(16, "most tasks one request may ask for")
    decode_workers: int = option(2, "images decoded at once (bounds what decoding takes in memory)")
    admin_token: str | None = option(None, "token for POST/DELETE /tasks (Authorization: Bearer ...); none: off")
    task_root: str | None = option(None, "folder every task added over HTTP must lie in; none: any folder")

    def __post_init__(self) -> None:
        check_fields(self)
        limits = ("max_batch", "max_wait_ms", "top_k", "max_upload_bytes", "max_pixels", "max_tasks", "decode_workers")
        bad = [name for name in limits if getattr(self, name) <= 0]
        if bad:
            raise ValueError(f"ServeConfig: {', '.join(bad)} must be > 0")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("ServeConfig: admin_token must be at least 16 characters")


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ROUTES = ("/health", "/tasks", "/predict", "/metrics", "/metrics.json")


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

    def __init__(self, served: MultiTask, config: ServeConfig, metrics: Metrics | None = None):
        self.served, self.config, self.metrics = served, config, metrics
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
                if self.metrics is not None:
                    self.metrics.batch.observe(len(items))
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
    """The FastAPI application: ``/health``, ``/tasks``, ``/predict``, ``/metrics``, ``/metrics.json``."""
    if FastAPI is None:
        raise ImportError("vptune serve needs FastAPI and uvicorn: pip install 'vptune[serve]'")
    config = config or ServeConfig()
    metrics = Metrics(ROUTES)
    batcher = Batcher(served, config, metrics)
    decoding = threading.BoundedSemaphore(config.decode_workers)
    for name in served.names:
        _check_name(name)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="vptune", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    app.add_middleware(Guard, metrics=metrics)  # added last: the outermost, it sees every response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "tasks": len(served.names)}

    @app.get("/tasks")
    async def tasks() -> dict:
        return {"tasks": [_describe(name, model) for name, model in zip(served.names, served.models, strict=True)]}

    @app.post("/tasks")
    async def add_task(request: Request) -> dict:
        _admin(request, config)
        path, name = _task_request(await request.body(), config)
        try:
            added = await asyncio.to_thread(_locked, batcher.lock, served.add, path, name)
        except (ValueError, OSError, KeyError) as error:
            raise HTTPException(400, _message(error)) from error
        metrics.tasks.set(len(served.names))
        return {"added": added, "tasks": served.names}

    @app.delete("/tasks/{name}")
    async def remove_task(name: str, request: Request) -> dict:
        _admin(request, config)
        try:
            await asyncio.to_thread(_locked, batcher.lock, served.remove, name)
        except KeyError as error:
            raise HTTPException(404, _message(error)) from error
        metrics.tasks.set(len(served.names))
        return {"removed": name, "tasks": served.names}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        start = time.perf_counter()
        form = await _form(request)
        try:
            image, names, top_k = _predict_request(form, served, config)
            data = await image.read()
        finally:
            await form.close()  # the upload's spooled file
        models = [served.task(name) for name in names]
        preprocessings = [model.preprocessing for model in models]
        inputs = await asyncio.to_thread(_decode, data, preprocessings, config.max_pixels, decoding)
        try:
            logits = await asyncio.gather(*(batcher.predict(x, name) for x, name in zip(inputs, names, strict=True)))
        except KeyError as error:
            raise HTTPException(404, _message(error)) from error
        answers = {
            name: top_classes(values.float().softmax(dim=-1), model.classes, top_k)
            for name, values, model in zip(names, logits, models, strict=True)
        }
        batcher.stats.requests += 1
        batcher.stats.images += len(names)
        batcher.stats.latencies_ms.append(1000 * (time.perf_counter() - start))
        metrics.images.inc(len(names))
        return {"predictions": answers}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.tasks.set(len(served.names))
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/metrics.json")
    async def metrics_json() -> dict:
        return {**batcher.stats.snapshot(), "responses_by_status": dict(metrics.by_status)}

    @app.exception_handler(DataError)
    async def bad_image(request, error: DataError):
        return JSONResponse({"detail": f"the image cannot be decoded: {error}"}, status_code=400)

    @app.exception_handler(TooManyPixels)
    async def too_many_pixels(request, error: TooManyPixels):
        return JSONResponse({"detail": str(error)}, status_code=413)

    return app


class TooManyPixels(ValueError):
    """An image larger than the server decodes."""


def _admin(request: Request, config: ServeConfig) -> None:
    """Only a request with the admin token may change the served tasks; without a token those endpoints are off."""
    if config.admin_token is None:
        raise HTTPException(403, "changing tasks is off: start the server with --admin-token (or VPTUNE_ADMIN_TOKEN)")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {config.admin_token}".encode()):
        raise HTTPException(401, "send the admin token as 'Authorization: Bearer <token>'")


def _task_request(body: bytes, config: ServeConfig) -> tuple[Path, str | None]:
    """The folder and name a POST /tasks body asks for, each checked."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        request = None
    if not isinstance(request, dict) or not isinstance(request.get("path"), str) or not request["path"]:
        raise HTTPException(400, 'send JSON {"path": "<task folder>", "name": "<optional name>"}')
    name = request.get("name")
    if name is not None and not isinstance(name, str):
        raise HTTPException(400, "name must be a string")
    path = Path(request["path"])
    if config.task_root is not None and not path.resolve().is_relative_to(Path(config.task_root).resolve()):
        raise HTTPException(403, f"tasks must lie in the task root {config.task_root}")
    _check_name(name if name is not None else path.name)
    return path, name


def _check_name(name: str) -> None:
    if not TASK_NAME.fullmatch(name):
        raise HTTPException(
            400, f"task name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (a letter or digit first)"
        )


def _predict_request(form, served: MultiTask, config: ServeConfig) -> tuple[UploadFile, list[str], int]:
    """The image, the tasks (each once) and the top-k a POST /predict asks for, each checked."""
    image, names = form.get("image"), form.getlist("task")
    if not isinstance(image, UploadFile):
        raise HTTPException(400, "send the image as the multipart field 'image'")
    if not all(isinstance(name, str) for name in names):
        raise HTTPException(400, "'task' fields must be task names")
    names = list(dict.fromkeys(names)) or served.names
    if len(names) > config.max_tasks:
        raise HTTPException(400, f"{len(names)} tasks asked: name at most {config.max_tasks} in one request")
    unknown = [name for name in names if name not in served.names]
    if unknown:
        raise HTTPException(404, f"unknown task(s) {unknown}; serving: {', '.join(served.names)}")
    return image, names, _top_k(form.get("top_k"), config.top_k)


def _message(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _locked(lock: threading.Lock, fn, *args):
    with lock:
        return fn(*args)


async def _form(request):
    try:
        return await request.form(max_files=1, max_fields=64)
    except TooLarge:
        raise
    except Exception as error:  # a body that is not well-formed multipart form data
        raise HTTPException(400, f"send multipart/form-data with fields 'image' and 'task' ({error})") from error


def _top_k(value, default: int) -> int:
    try:
        top_k = int(value) if value is not None else default
    except (TypeError, ValueError) as error:
        raise HTTPException(400, f"top_k must be an integer, got {value!r:.40}") from error
    if not 1 <= top_k <= 1000:
        raise HTTPException(400, f"top_k must be in 1..1000, got {top_k}")
    return top_k


def _decode(
    data: bytes, preprocessings: list[Preprocessing], max_pixels: int, decoding: threading.BoundedSemaphore
) -> list[torch.Tensor]:
    """The image as each task's input, decoded once per distinct preprocessing; its size is checked from its header
    first, and only ``decode_workers`` images decode at once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below is ours
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as error:
        raise TooManyPixels(f"the image is too large to decode ({error})") from error
    except _UNREADABLE as error:
        raise DataError(str(error)) from error
    if width * height > max_pixels:
        raise TooManyPixels(f"the image has {width}x{height} pixels; this server decodes at most {max_pixels}")
    with decoding:
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


MALLOC_ARENAS = 2
"""glibc malloc arenas the server keeps when ``MALLOC_ARENA_MAX`` is not set (see :func:`limit_malloc_arenas`)."""


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas, so that the server's memory levels off under load.

    With one arena per thread (glibc's default: up to 8 per core), images decoded on worker threads fragment many
    arenas and the resident memory keeps creeping up (measured in docs/serving.md). An explicit ``MALLOC_ARENA_MAX``
    wins; on other C libraries this does nothing. Returns whether the cap was set."""
    import ctypes
    import ctypes.util
    import os

    if "MALLOC_ARENA_MAX" in os.environ or not ctypes.util.find_library("c"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    M_ARENA_MAX = -8
    return bool(mallopt(M_ARENA_MAX, arenas))


def serve_folders(paths: list[str], backbone: str | None, host: str, port: int, config: ServeConfig) -> None:
    """Load the task folders (or folders of task folders) on one backbone and serve them until interrupted."""
    import uvicorn

    limit_malloc_arenas()
    folders = [
        p for path in map(Path, paths) for p in ([path] if (path / RECORD).is_file() else sorted(path.iterdir()))
    ]
    folders = [folder for folder in folders if (folder / RECORD).is_file()]
    if not folders:
        raise ValueError(f"no task folders (with {RECORD}) in {paths}")
    bad = [folder.name for folder in folders if not TASK_NAME.fullmatch(folder.name)]
    if bad:
        raise ValueError(f"task folder names {bad} cannot be task names: use letters, digits, '.', '_' or '-'")
    spec = backbone or read_record(folders[0])["backbone"]["spec"]
    served = MultiTask(load_backbone(spec), folders)
    uvicorn.run(create_app(served, config), host=host, port=port, log_level="warning")
