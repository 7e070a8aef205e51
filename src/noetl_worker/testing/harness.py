"""Run the real worker tree in-process, and publish notifications on NATS.

Used by the tests, the demo and the benchmarks::

    async with open_nats_server() as nats, open_stub_server() as stub, open_publisher(nats.url) as pub:
        settings = Settings.from_env({"NATS_URL": nats.url, "NOETL_SERVER_URL": stub.url, ...})
        async with open_worker(settings) as worker:
            command = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
            await pub.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([command], timeout=10)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio
import trio_asyncio

from ..bus import Bus, install_exception_handler
from ..config import Settings
from ..service import WorkerState, serve


@asynccontextmanager
async def open_worker(
    settings: Settings, *, ready_timeout: float = 20.0, **serve_kwargs: Any
) -> AsyncIterator[WorkerState]:
    """Start ``serve`` (no signal handling) and wait until /readyz would answer 200; on exit,
    request a graceful stop and wait for the drain to finish."""
    state = WorkerState(settings.heartbeat_interval)
    serve_kwargs.setdefault("handle_signals", False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve, settings, state=state, **serve_kwargs))
        with trio.fail_after(ready_timeout):
            await state.ready.wait()
        try:
            yield state
        finally:
            state.stop.set()


@attrs.define(eq=False)
class Publisher:
    bus: Bus
    subject: str

    async def publish(self, subject: str, payload: Mapping[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.bus.publish(subject, data)

    async def publish_command(self, notification: Mapping[str, Any], *, subject: str | None = None) -> None:
        """Publish on the bare subject by default, as the Python server does without routing."""
        await self.publish(subject or self.subject, notification)


@asynccontextmanager
async def open_publisher(nats_url: str, **env: str) -> AsyncIterator[Publisher]:
    """A NATS connection that ensures the command stream exists and publishes to it."""
    settings = Settings.from_env({"NATS_URL": nats_url, **env})
    async with trio_asyncio.open_loop() as loop:
        install_exception_handler(loop)
        bus = Bus(settings)
        await bus.connect()
        try:
            await bus.ensure_stream()
            yield Publisher(bus, settings.subject)
        finally:
            await bus.close()
