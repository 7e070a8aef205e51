"""The operator event stream: ``GET /events`` (a websocket on the metrics port).

When ``WORKER_EVENTS_STREAM=true``, dispatch reports each command's lifecycle to a
:class:`Lifecycle` sink on the Runtime, which turns it into one JSON record per event and hands
it to every connected client::

    {"event": "claimed" | "started" | "finished" | "failed", "at": "<RFC 3339>",
     "execution_id", "command_id", "step", "tool_kind", "worker_id",
     "status": …, "duration_ms": …, "error": …}      # finished: status + duration; failed: error

Back-pressure: each client has a queue of ``QUEUE`` records. Publishing never waits — a client
whose queue is full is dropped (its connection is cut, ``noetl_worker_events_stream_dropped_total``
counts it), so a slow or stalled client can never slow dispatch. The error of a failed command is
the scrubbed text the server receives in ``command.failed``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio

from .events import COMMAND_COMPLETED, COMMAND_FAILED, Event

if TYPE_CHECKING:
    from .dispatch import Command
    from .metrics import Metrics

log = logging.getLogger(__name__)
QUEUE: Final = 1000
PATH: Final = "/events"


class LifecycleSink(Protocol):
    """What dispatch tells about a command: claimed, and the terminal events it reports."""

    def claimed(self, command: Command) -> None: ...

    def reported(self, command: Command, events: Sequence[Event]) -> None: ...


class NoLifecycle:
    """The sink when the stream is off: nothing is built, nothing kept."""

    def claimed(self, command: Command) -> None:
        pass

    def reported(self, command: Command, events: Sequence[Event]) -> None:
        pass


@attrs.define(eq=False)
class Subscription:
    receive: trio.MemoryReceiveChannel[str]
    send: trio.MemorySendChannel[str]
    # Cancelled when the client is dropped, so a send blocked on a stalled socket ends too.
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    dropped: bool = False


@attrs.define(eq=False)
class EventHub:
    """Fan-out of records to the connected clients; ``publish`` never blocks."""

    metrics: Metrics | None = None
    queue: int = QUEUE
    _subscriptions: set[Subscription] = attrs.field(factory=set)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def clients(self) -> int:
        return len(self._subscriptions)

    def subscribe(self) -> Subscription:
        send, receive = trio.open_memory_channel[str](self.queue)
        subscription = Subscription(receive, send)
        self._subscriptions.add(subscription)
        self._gauge()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        subscription.send.close()
        self._gauge()

    def publish(self, record: dict[str, Any]) -> None:
        if not self._subscriptions:
            return
        text = json.dumps(record, separators=(",", ":"), default=str)
        for subscription in list(self._subscriptions):
            try:
                subscription.send.send_nowait(text)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._drop(subscription)

    def _drop(self, subscription: Subscription) -> None:
        subscription.dropped = True
        subscription.scope.cancel()
        self.unsubscribe(subscription)
        log.warning("events stream client dropped: it fell %d records behind", self.queue)
        if self.metrics is not None:
            self.metrics.events_stream_dropped.inc()

    async def wait_for_clients(self, count: int) -> None:
        """Until exactly ``count`` clients are connected."""
        while len(self._subscriptions) != count:
            await self._changed.wait()

    def _gauge(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self.metrics is not None:
            self.metrics.events_stream_clients.set(len(self._subscriptions))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@attrs.define(eq=False)
class Lifecycle:
    """The sink when the stream is on: records for the hub, durations from claim to report."""

    hub: EventHub
    worker_id: str
    _claimed_at: dict[str, float] = attrs.field(factory=dict)

    def _record(self, event: str, command: Command, **extra: Any) -> dict[str, Any]:
        return {
            "event": event,
            "at": _now(),
            "execution_id": command.execution_id,
            "command_id": command.command_id,
            "step": command.step,
            "tool_kind": command.tool_kind,
            "worker_id": self.worker_id,
            **extra,
        }

    def claimed(self, command: Command) -> None:
        self._claimed_at[command.command_id] = trio.current_time()
        self.hub.publish(self._record("claimed", command))
        # The tool is dispatched right after the claim: "started" is the moment it runs.
        self.hub.publish(self._record("started", command))

    def reported(self, command: Command, events: Sequence[Event]) -> None:
        began = self._claimed_at.pop(command.command_id, None)
        duration = None if began is None else int((trio.current_time() - began) * 1000)
        for event in events:
            if event.event_type == COMMAND_COMPLETED:
                # The Python dialect says COMPLETED (its failures are command.failed); the Rust
                # one carries the tool's own status.
                status = "success" if event.status.upper() == "COMPLETED" else event.status.lower()
                record = self._record("finished", command, status=status, duration_ms=duration)
                self.hub.publish(record)
            elif event.event_type == COMMAND_FAILED:
                error = event.context.get("error")
                record = self._record("failed", command, status="failed", duration_ms=duration, error=error)
                self.hub.publish(record)


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def serve_events(hub: EventHub | None, receive: Receive, send: Send) -> None:
    """The ASGI websocket handler of ``GET /events``."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if hub is None:
        # Off by default: refuse the handshake (the client sees HTTP 403).
        await send({"type": "websocket.close", "code": 1008, "reason": "events stream disabled"})
        return
    await send({"type": "websocket.accept"})
    subscription = hub.subscribe()
    try:
        async with trio.open_nursery() as nursery:

            async def until_disconnect() -> None:
                while (await receive())["type"] != "websocket.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_disconnect)
            with subscription.scope:
                async for text in subscription.receive:
                    await send({"type": "websocket.send", "text": text})
            nursery.cancel_scope.cancel()
    finally:
        hub.unsubscribe(subscription)
    if subscription.dropped:
        with trio.move_on_after(1):
            try:
                await send({"type": "websocket.close", "code": 1008, "reason": "client too slow"})
            except Exception:  # the connection may already be unusable; it is closed either way
                log.debug("closing a dropped events client failed", exc_info=True)
