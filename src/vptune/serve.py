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
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
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
from .hub import HubTask, hub_folder, is_hub
from .multitask import TASK_NAME, MultiTask, TaskInfo, TaskNotFound
from .preprocessing import DataError, Preprocessing
from .report import top_classes
from .taskfile import RECORD, WEIGHTS, TaskFileError, read_record

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
    task_root: str | None = option(
        None, "folder every task added over HTTP must lie in (with --lazy: every task folder under it is served)"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        limits = ("max_batch", "max_wait_ms", "top_k", "max_upload_bytes", "max_pixels", "max_tasks", "decode_workers")
        bad = [name for name in limits if getattr(self, name) <= 0]
        if bad:
            raise ValueError(f"ServeConfig: {', '.join(bad)} must be > 0")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("ServeConfig: admin_token must be at least 16 characters")


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
            answers, runs = answer_batch(self.served, [item.pixels for item in batch], [item.task for item in batch])
        for size in runs:
            self.stats.batches += 1
            self.stats.batch_sizes.append(size)
            if self.metrics is not None:
                self.metrics.batch.observe(size)
        for item, answer in zip(batch, answers, strict=True):
            _resolve(item, answer)


def answer_batch(
    served: MultiTask, pixels: list[torch.Tensor], names: list[str]
) -> tuple[list[torch.Tensor | BaseException], list[int]]:
    """Each image's logits with its task, or the error its task gives (a task removed, or damaged on disk since its
    request came: that request alone fails); and the size of each model run (one per input size).

    Tasks are made resident one by one first, so that one task's folder never fails another's request; images of
    different input sizes run as separate batches.
    """
    answers: list[torch.Tensor | BaseException | None] = [None] * len(names)
    ready: dict[tuple, list[int]] = {}
    for index, name in enumerate(names):
        try:
            served.info(name)
        except TaskNotFound:
            answers[index] = TaskNotFound(f"task {name!r} was removed")
        except (ValueError, OSError) as error:
            answers[index] = error
        else:
            ready.setdefault(tuple(pixels[index].shape), []).append(index)
    runs = []
    for rows in ready.values():
        try:
            logits = served(torch.stack([pixels[row] for row in rows]), [names[row] for row in rows])
        except Exception as error:  # a failed batch answers its requests with the error
            for row in rows:
                answers[row] = error
            continue
        runs.append(len(rows))
        for row, values in zip(rows, logits, strict=True):
            answers[row] = values
    return answers, runs  # type: ignore[return-value]


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
        """The resident tasks described; under a task root also every servable name (listed, nothing loaded)."""
        resident = {"tasks": [_describe(info) for info in served.resident()], "resident": served.names}
        if served.root is None:
            return resident
        return {**resident, "servable": await asyncio.to_thread(served.servable)}

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
        with _task_errors():
            infos = await asyncio.to_thread(_locked, batcher.lock, lambda: [served.info(name) for name in names])
        preprocessings = [info.preprocessing for info in infos]
        inputs = await asyncio.to_thread(_decode, data, preprocessings, config.max_pixels, decoding)
        with _task_errors():
            logits = await asyncio.gather(*(batcher.predict(x, name) for x, name in zip(inputs, names, strict=True)))
        answers = {
            info.name: top_classes(values.float().softmax(dim=-1), info.classes, top_k)
            for values, info in zip(logits, infos, strict=True)
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
    if not names and served.root is not None:
        raise HTTPException(400, "name the task(s) to answer with 'task' fields (GET /tasks lists them)")
    names = list(dict.fromkeys(names)) or served.names
    if len(names) > config.max_tasks:
        raise HTTPException(400, f"{len(names)} tasks asked: name at most {config.max_tasks} in one request")
    return image, names, _top_k(form.get("top_k"), config.top_k)


@contextmanager
def _task_errors() -> Iterator[None]:
    """A task that is not served is a 404; one whose folder cannot be served (damaged, another backbone, a method
    that changes the backbone) a 422 naming the problem: never a 5xx, and other tasks are not affected."""
    try:
        yield
    except KeyError as error:
        raise HTTPException(404, _message(error)) from error
    except (ValueError, OSError) as error:
        raise HTTPException(422, _message(error)) from error


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


def _describe(info: TaskInfo) -> dict:
    return {
        "name": info.name,
        "method": info.method,
        "classes": info.classes,
        "image_size": info.image_size,
        "prompt_tokens": info.prompt_config.num_tokens,
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

    if "MALLOC_ARENA_MAX" in os.environ or not ctypes.util.find_library("c"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    M_ARENA_MAX = -8
    return bool(mallopt(M_ARENA_MAX, arenas))


def serve_folders(
    paths: list[str],
    backbone: str | None,
    host: str,
    port: int,
    config: ServeConfig,
    *,
    lazy: bool = False,
    max_resident: int | None = None,
) -> None:
    """Serve task folders (or folders of task folders) on one backbone until interrupted; with ``lazy``, every task
    folder under ``config.task_root``, each loaded on its first request (see :func:`served_tasks`)."""
    import uvicorn

    limit_malloc_arenas()
    served = served_tasks(paths, backbone, config.task_root if lazy else None, max_resident)
    uvicorn.run(create_app(served, config), host=host, port=port, log_level="warning")


def served_tasks(
    paths: list[str], backbone: str | None, root: str | None = None, max_resident: int | None = None
) -> MultiTask:
    """What ``vptune serve`` serves: the task folders in ``paths`` loaded now, and with a ``root`` every task folder
    under it on demand (startup lists nothing and reads no task file but, without ``backbone``, the first record
    found, for its backbone)."""
    local = [Path(path) for path in paths if not is_hub(path)]
    folders = [p for path in local for p in ([path] if (path / RECORD).is_file() else sorted(path.iterdir()))]
    named = [(folder, folder.name) for folder in folders if (folder / RECORD).is_file()]
    named += [(hub_folder(path, (RECORD, WEIGHTS)), HubTask.parse(path).name) for path in paths if is_hub(path)]
    if not named and root is None:
        raise ValueError(f"no task folders (with {RECORD}) in {paths}")
    bad = [name for _, name in named if not TASK_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"task folder names {bad} cannot be task names: use letters, digits, '.', '_' or '-'")
    if root is not None and not Path(root).is_dir():
        raise ValueError(f"task root {root} is not a folder")
    spec = backbone or _recorded_backbone(named[0][0] if named else None, Path(root) if root else None)
    served = MultiTask(load_backbone(spec), root=root, max_resident=max_resident)
    for folder, name in named:
        served.add(folder, name)
    return served


def _recorded_backbone(folder: Path | None, root: Path | None) -> str:
    """The backbone spec a task folder records: ``folder``'s, else the first readable one's under ``root``."""
    if folder is not None:
        return read_record(folder)["backbone"]["spec"]
    for place, dirs, files in os.walk(root):
        dirs.sort()
        if RECORD in files:
            try:
                return read_record(place)["backbone"]["spec"]
            except TaskFileError:
                continue  # a damaged folder is refused when asked for; it names no backbone
    raise ValueError(f"no readable task folder (with {RECORD}) under {root}: pass --backbone to start with none")
