"""In-memory stand-ins for the NATS bus and the control plane, for virtual-time tests.

They honour the same small surfaces ``service`` and ``dispatch`` use, and record what happened.
Never use them where a real nats-server or real HTTP can be used instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from noetl_worker.config import normalize_server_url
from noetl_worker.control_plane import AlreadyClaimed, Claimed, ClaimOutcome, Response
from noetl_worker.errors import HTTPStatusError, TransportError
from noetl_worker.events import Event


@attrs.define(eq=False)
class FakeMessage:
    data: bytes
    subject: str = "noetl.commands"
    num_delivered: int = 1
    settled: str | None = None
    nak_delay: float | None = None
    progress: list[float] = attrs.field(factory=list)

    async def ack(self) -> None:
        self.settled = self.settled or "ack"

    async def nak(self, delay: float | None = None) -> None:
        if self.settled is None:
            self.settled, self.nak_delay = "nak", delay

    async def term(self) -> None:
        self.settled = self.settled or "term"

    async def in_progress(self) -> None:
        self.progress.append(trio.current_time())


@attrs.define(eq=False)
class FakeBus:
    ack_wait: float = 30.0
    bound: bool = False
    connected: bool = False
    needs_connect: bool = True
    send: Any = None
    receive: Any = None
    closed: bool = False

    def __attrs_post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[FakeMessage](1000)

    def publish(self, payload: dict[str, Any] | bytes) -> FakeMessage:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        msg = FakeMessage(data)
        self.send.send_nowait(msg)
        return msg

    async def connect(self) -> None:
        self.connected, self.needs_connect = True, False

    async def ensure_stream(self) -> None:
        pass

    async def bind_consumer(self) -> None:
        self.bound = True

    async def fetch(self, batch: int, timeout: float) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        with trio.move_on_after(timeout):
            out.append(await self.receive.receive())
        while out and len(out) < batch:
            try:
                out.append(self.receive.receive_nowait())
            except trio.WouldBlock:
                break
        return out

    async def consumer_lag(self) -> Any:
        from noetl_worker.bus import ConsumerLag

        return ConsumerLag(0, 0)

    async def close(self) -> None:
        self.closed = True


@attrs.define(eq=False)
class FakeServer:
    """Minimal ServerAPI for tools."""

    async def get_json(self, path: str, *, params: Any = None) -> Any:
        return None

    async def post_json(self, path: str, body: Any) -> Any:
        return None

    async def put_json(self, path: str, body: Any) -> Any:
        return None


@attrs.define(eq=False)
class FakePlane:
    """Claims every command once (409 after), records events and registry calls with trio time."""

    commands: dict[int, dict[str, Any]] = attrs.field(factory=dict)
    claimed: set[int] = attrs.field(factory=set)
    events: list[Event] = attrs.field(factory=list)
    registered: list[float] = attrs.field(factory=list)
    heartbeats: list[float] = attrs.field(factory=list)
    deregistered: list[float] = attrs.field(factory=list)
    heartbeat_status: Callable[[], int] = lambda: 200
    register_failures: int = 0  # the server is down for this many registration attempts
    default_url: str = "http://server"
    # GET /api/health, which the worker's dialect probe reads: the Python server's by default.
    health: tuple[int, bytes] = (200, b'{"status":"ok"}')
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def request(self, method: str, server_url: str | None, path: str, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        assert (method, path) == ("GET", "/api/health"), (method, path)
        return Response(self.health[0], self.health[1], {})

    def base(self, server_url: str | None) -> str:
        return normalize_server_url(server_url) if server_url else self.default_url

    def add(
        self, event_id: int, action: str, tool_config: dict[str, Any], *, execution_id: int = 1
    ) -> dict[str, Any]:
        self.commands[event_id] = {
            "status": "ok",
            "event_id": event_id,
            "execution_id": execution_id,
            "node_id": f"step{event_id}",
            "node_name": f"step{event_id}",
            "action": action,
            "context": {"tool_config": tool_config},
            "meta": {"command_id": f"cmd-{event_id}", "attempt": 1},
        }
        return {
            "execution_id": execution_id,
            "event_id": event_id,
            "command_id": f"cmd-{event_id}",
            "step": f"step{event_id}",
            "server_url": self.default_url,
        }

    async def claim(self, server_url: str | None, event_id: int) -> ClaimOutcome:
        await trio.lowlevel.checkpoint()
        if event_id in self.claimed:
            return AlreadyClaimed("active_claim", "held")
        self.claimed.add(event_id)
        return Claimed(self.commands[event_id])

    async def emit(self, server_url: str | None, events: Sequence[Event], *, policy: Any = None) -> None:
        await trio.lowlevel.checkpoint()
        self.events.extend(events)
        self.changed.set()
        self.changed = trio.Event()

    def types(self, command_id: str) -> list[str]:
        return [e.event_type for e in self.events if e.command_id == command_id]

    def terminal(self, command_id: str) -> Event | None:
        for e in self.events:
            if e.command_id == command_id and e.event_type in ("command.completed", "command.failed"):
                return e
        return None

    async def wait_terminal(self, *command_ids: str) -> None:
        while not all(self.terminal(c) for c in command_ids):
            await self.changed.wait()

    async def register(self, public_key_b64: str | None = None) -> None:
        if self.register_failures:
            self.register_failures -= 1
            raise TransportError("connection refused")
        self.registered.append(trio.current_time())

    async def heartbeat(self) -> None:
        status = self.heartbeat_status()
        if status != 200:
            raise HTTPStatusError(status, "{}")
        self.heartbeats.append(trio.current_time())

    async def deregister(self) -> None:
        self.deregistered.append(trio.current_time())

    def server_api(self, server_url: str | None) -> FakeServer:
        return FakeServer()
