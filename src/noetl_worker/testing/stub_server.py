"""A stub NoETL control plane served over real HTTP, for tests, the demo and users' own tools.

It answers the worker-facing API with the upstream servers' exact shapes (the Python FastAPI
server by default, the Rust server with ``StubState(flavor="rust")``), keeps everything in a
``StubState`` that tests inspect and script, and can inject faults (statuses, delays).

    async with open_stub_server() as stub:
        command = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
        ... publish command.notification() on NATS, run the worker ...
        await stub.state.wait_terminal([command], timeout=10)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from ._asgi import BadRequest, Request, Response, Router, make_app
from ._common import error
from ._routes_commands import CommandRoutes
from ._routes_misc import MiscRoutes
from ._state import Fault, RecordedRequest, StubState

__all__ = ["StubServer", "build_app", "open_stub_server", "serve_stub"]

log = logging.getLogger(__name__)


def _fault_response(state: StubState, fault: Fault) -> Response:
    assert fault.status is not None
    headers = {} if fault.retry_after is None else {"retry-after": _seconds(fault.retry_after)}
    if fault.body is not None:
        return Response(fault.status, fault.body, headers)
    if fault.status == 503:
        return error(
            state,
            503,
            "injected fault: database pool saturated",
            code="pool_saturated",
            retry_after=fault.retry_after,
        )
    return error(state, fault.status, f"injected fault: HTTP {fault.status}", retry_after=fault.retry_after)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def build_app(state: StubState) -> Callable[..., Awaitable[None]]:
    """The ASGI app over ``state`` (exposed for serving it with another ASGI server)."""
    router = Router()
    CommandRoutes(state).install(router)
    MiscRoutes(state).install(router)

    async def on_request(request: Request) -> Response:
        try:
            body: Any = json.loads(request.body) if request.body else None
        except ValueError:
            body = request.body
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=body,
            received_at=time.monotonic(),
        )
        state.request_log.append(record)
        state._changed()  # lets tests wait for a request to arrive, e.g. one that will hang
        response = await _answer(request)
        record.status = response.status
        state._changed()
        return response

    async def _answer(request: Request) -> Response:
        fault = state.take_fault(request.method, request.path)
        if fault is not None:
            if fault.delay > 0:
                await trio.sleep(fault.delay)
            if fault.status is not None:
                return _fault_response(state, fault)
        handler, params, path_known = router.match(request.method, request.path)
        if handler is None:
            if path_known:
                return Response(405, {"detail": "Method Not Allowed"})
            return Response(404, {"detail": "Not Found"})
        try:
            return await handler(attrs.evolve(request, params=params))
        except BadRequest as exc:
            if state.flavor == "rust":
                return Response(422, {"error": str(exc), "status": 422})
            return Response(422, {"detail": [{"type": "value_error", "loc": ["body"], "msg": str(exc)}]})
        except Exception as exc:
            # A bug in the stub must be loud in the test that hit it, not a silent 500.
            log.exception("stub control plane handler failed")
            state.server_errors.append(exc)
            return Response(500, {"detail": "Internal Server Error"})

    return make_app(on_request)


async def serve_stub(
    state: StubState,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    host: str = "127.0.0.1",
    port: int = 0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve the stub until cancelled (or ``shutdown_trigger`` returns).

    Use with ``nursery.start``: it reports the base URL (``http://127.0.0.1:<port>``), which
    is also stored as ``state.server_url``.
    """
    config = hypercorn.config.Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    app = build_app(state)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=shutdown_trigger)
        )
        url = binds[0]
        state.server_url = url
        for command in state.commands.values():
            if command.server_url is None:
                command.server_url = url
        task_status.started(url)


@attrs.define
class StubServer:
    url: str
    state: StubState


@asynccontextmanager
async def open_stub_server(
    state: StubState | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[StubServer]:
    """Serve a stub on a free loopback port for the duration of the block, then stop it."""
    state = state if state is not None else StubState()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            partial(serve_stub, state, host=host, port=port, shutdown_trigger=stop.wait)
        )
        try:
            yield StubServer(url=url, state=state)
        finally:
            stop.set()
            # hypercorn drains within graceful_timeout; the deadline is only a backstop.
            nursery.cancel_scope.deadline = trio.current_time() + 5.0
