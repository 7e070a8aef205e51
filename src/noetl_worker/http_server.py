"""The worker's only listening socket: /metrics, /healthz, /readyz (a tiny ASGI dispatcher).

hypercorn's lifespan protocol is answered here, since ``prometheus_client.make_asgi_app`` cannot be
the root app (it asserts ``scope["type"] == "http"``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import make_asgi_app

from .config import Bind
from .errors import WorkerError
from .metrics import Metrics


class BindError(WorkerError):
    """The metrics/probe address cannot be listened on (e.g. the port is already in use)."""


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Complete hypercorn's lifespan startup and shutdown. An app that simply returned on the
    lifespan scope would make hypercorn send into a closed channel and fail at startup."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def make_app(
    metrics: Metrics, readiness: Callable[[], tuple[bool, str]]
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    metrics_app = make_asgi_app(registry=metrics.registry)

    async def plain(send: Send, status: int, body: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            await metrics_app(scope, receive, send)
        elif path in ("/healthz", "/livez"):
            await plain(send, 200, "ok")
        elif path == "/readyz":
            ready, reason = readiness()
            await plain(send, 200 if ready else 503, "ready" if ready else f"not ready: {reason}")
        else:
            await plain(send, 404, "not found")

    return app


async def serve_http(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    bind: Bind,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = Config()
    config.bind = [str(bind)]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    status = _Started(task_status)
    try:
        await serve(app, config, shutdown_trigger=shutdown.wait, task_status=status)  # type: ignore[arg-type]
    except (OSError, BaseExceptionGroup) as exc:
        if status.started_already:
            raise
        failed = exc.split(OSError)[0] if isinstance(exc, BaseExceptionGroup) else exc
        if failed is None:
            raise
        first = _first_leaf(failed)
        reason = first.strerror if isinstance(first, OSError) and first.strerror else str(first)
        raise BindError(f"cannot listen on WORKER_METRICS_BIND={bind}: {reason}") from None


class _Started:
    """Passes hypercorn's ``started`` through, remembering that it happened."""

    def __init__(self, inner: trio.TaskStatus[list[str]]) -> None:
        self.inner = inner
        self.started_already = False

    def started(self, value: list[str]) -> None:
        self.started_already = True
        self.inner.started(value)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
