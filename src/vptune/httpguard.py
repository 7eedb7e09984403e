"""What stands between the network and the service: a limit on request bodies enforced while they stream in, a last
line that turns any unexpected failure into a JSON 500 (the connection stays usable), and the request metrics
(Prometheus text format, and a JSON view).

Both are plain ASGI middleware, so that they see every request, the ones the routes refuse included.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

try:  # optional: pip install 'vptune[serve]'
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError:  # pragma: no cover - checked in Metrics
    CollectorRegistry = None

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

LOG = logging.getLogger("vptune.serve")


class TooLarge(Exception):
    """A request body passed its limit while it streamed in."""


async def send_json(send: Send, status: int, detail: str, close: bool = False) -> None:
    """A whole JSON response ``{"detail": ...}``."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with a 413: at once when its declared length says so, else as soon
    as the bytes received pass the limit (nothing over the limit is kept)."""

    def __init__(self, app: App, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            detail = f"the request is larger than {self.limit} bytes" if declared.isdigit() else "bad content-length"
            return await send_json(send, 413 if declared.isdigit() else 400, detail, close=True)
        received, started = 0, False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except TooLarge:
            if not started:
                await send_json(send, 413, f"the request is larger than {self.limit} bytes", close=True)


class Guard:
    """The outermost layer: counts every response by route and status, and answers an unexpected failure with a
    JSON 500 instead of dropping the connection."""

    def __init__(self, app: App, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        except Exception:  # noqa: BLE001  (the last line: log it, answer, keep serving)
            LOG.exception("unexpected failure on %s %s", scope["method"], scope["path"])
            if not status[0]:  # nothing sent yet: the client gets an answer
                await send_json(send, 500, "the server failed on this request; it keeps serving")
            status[0] = 500
        self.metrics.observe(scope, status[0], time.perf_counter() - start)


class Metrics:
    """Request counts by route and status, latencies, and the serving figures, in a registry of their own."""

    def __init__(self, routes: tuple[str, ...]):
        if CollectorRegistry is None:
            raise ImportError("vptune serve needs prometheus-client: pip install 'vptune[serve]'")
        self.registry = CollectorRegistry()
        self.routes = routes
        self.requests = Counter(
            "vptune_requests", "HTTP requests by method, route and status", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.seconds = Histogram("vptune_request_seconds", "time to answer", ["route"], registry=self.registry)
        self.images = Counter("vptune_images", "images classified (one per task asked)", registry=self.registry)
        self.batch = Histogram(
            "vptune_batch_size", "images per model run", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry
        )
        self.tasks = Gauge("vptune_tasks", "tasks served", registry=self.registry)
        self.by_status: dict[str, int] = {}

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope["path"] if scope["path"] in self.routes else "other"
        self.requests.labels(scope["method"], route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1

    def text(self) -> bytes:
        """The Prometheus exposition format."""
        return generate_latest(self.registry)
