"""``vptune serve --backend ray``: the task server as a Ray Serve application, over replicas on one or many machines.

Every replica holds the backbone and a :class:`~vptune.MultiTask` over one task root (a folder each replica can read:
shared storage), each task loaded on its first request. A request names its task in the header
``serve_multiplexed_model_id``: Ray Serve's model multiplexing routes it to a replica that already has that task
resident, and each replica keeps at most ``max_resident`` tasks (Ray's least-recently-used bound and the
MultiTask's agree). Concurrent requests on a replica are gathered into mixed-task batches (``serve.batch``).

``POST /predict`` (multipart ``image``, optional ``top_k``; the task in the header or a ``task`` field) answers as
the local server does: ``{"predictions": {task: [{label, class, probability}, ...]}}``, a 4xx naming what is wrong
with the request or the task folder.
"""

from __future__ import annotations

import asyncio
import os
import threading

import torch

from .multitask import MultiTask, TaskInfo
from .preprocessing import DataError
from .report import top_classes
from .serve import ServeConfig, TooManyPixels, _decode, _form, _task_errors, _top_k, answer_batch, served_tasks

TASK_HEADER = "serve_multiplexed_model_id"


def ray_app(
    task_root: str | os.PathLike,
    backbone: str | None = None,
    *,
    max_resident: int = 64,
    replicas: int = 1,
    config: ServeConfig | None = None,
    cpus_per_replica: float = 1.0,
):
    """The Ray Serve application (``serve.run(ray_app(...))``): ``replicas`` replicas, each serving every task folder
    under ``task_root`` on ``backbone`` (default: the one the first task folder names), at most ``max_resident``
    tasks resident in each."""
    try:
        from ray import serve
    except ImportError as error:
        raise ImportError("the Ray backend needs Ray Serve: pip install 'vptune[ray]'") from error
    config = config or ServeConfig()
    options = {"num_cpus": cpus_per_replica}
    replica = serve.deployment(name="vptune", num_replicas=replicas, ray_actor_options=options)(
        _replica_class(max_resident, config)
    )
    return replica.bind(str(task_root), backbone, max_resident, config)


def _replica_class(max_resident: int, config: ServeConfig) -> type:
    """The replica's class; Ray Serve's decorators take their bounds when the class is made."""
    from ray import serve
    from starlette.responses import JSONResponse

    class TaskReplica:
        """One backbone, the tasks under one root loaded as they are asked for, mixed-task batches."""

        def __init__(self, root: str, backbone: str | None, max_resident: int, config: ServeConfig):
            self.served: MultiTask = served_tasks([], backbone, root, max_resident)
            self.config = config
            self.lock = threading.Lock()  # model runs and loads never overlap
            self.decoding = threading.BoundedSemaphore(config.decode_workers)

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def task(self, name: str) -> TaskInfo:
            """The task, resident on this replica from now on (what Ray's routing counts)."""
            return await asyncio.to_thread(self._info, name)

        def _info(self, name: str) -> TaskInfo:
            with self.lock:
                return self.served.info(name)

        @serve.batch(max_batch_size=config.max_batch, batch_wait_timeout_s=config.max_wait_ms / 1000)
        async def logits(self, pixels: list[torch.Tensor], names: list[str]) -> list:
            return await asyncio.to_thread(self._run, pixels, names)

        def _run(self, pixels: list[torch.Tensor], names: list[str]) -> list:
            with self.lock:
                return answer_batch(self.served, pixels, names)[0]

        async def __call__(self, request) -> JSONResponse:
            from fastapi import HTTPException

            try:
                return JSONResponse(await self._answer(request))
            except HTTPException as error:
                return JSONResponse({"detail": error.detail}, status_code=error.status_code)
            except TooManyPixels as error:
                return JSONResponse({"detail": str(error)}, status_code=413)
            except DataError as error:
                return JSONResponse({"detail": f"the image cannot be decoded: {error}"}, status_code=400)

        async def _answer(self, request) -> dict:
            from fastapi import HTTPException
            from starlette.datastructures import UploadFile

            if request.method != "POST" or request.url.path.rstrip("/") not in ("", "/predict"):
                raise HTTPException(404, "POST /predict with the image and the task")
            length = request.headers.get("content-length")
            if length is None or not length.isdigit() or int(length) > self.config.max_upload_bytes:
                raise HTTPException(413, f"send a Content-Length of at most {self.config.max_upload_bytes} bytes")
            form = await _form(request)
            try:
                image, named = form.get("image"), form.getlist("task")
                if not isinstance(image, UploadFile):
                    raise HTTPException(400, "send the image as the multipart field 'image'")
                name = _task_name(serve.get_multiplexed_model_id(), named)
                top_k = _top_k(form.get("top_k"), self.config.top_k)
                data = await image.read()
            finally:
                await form.close()
            with _task_errors():
                info = await self.task(name)
            (pixels,) = await asyncio.to_thread(
                _decode, data, [info.preprocessing], self.config.max_pixels, self.decoding
            )
            with _task_errors():
                values = await self.logits(pixels, name)
                if isinstance(values, BaseException):
                    raise values
            return {"predictions": {name: top_classes(values.float().softmax(dim=-1), info.classes, top_k)}}

    return TaskReplica


def _task_name(header: str, fields: list) -> str:
    from fastapi import HTTPException

    names = [name for name in dict.fromkeys([header, *fields]) if isinstance(name, str) and name]
    if len(names) != 1:
        raise HTTPException(
            400, f"name one task, in the header {TASK_HEADER} (which routes it to a replica holding it) or 'task'"
        )
    return names[0]


def serve_ray(
    task_root: str,
    backbone: str | None,
    host: str,
    port: int,
    config: ServeConfig,
    *,
    max_resident: int | None = None,
    replicas: int = 1,
    address: str | None = None,
) -> None:
    """Start Ray (or join ``address``), run :func:`ray_app` on ``host:port`` and serve until interrupted."""
    import ray
    from ray import serve

    ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    app = ray_app(task_root, backbone, max_resident=max_resident or 64, replicas=replicas, config=config)
    serve.run(app, blocking=True)
