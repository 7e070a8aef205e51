"""Fault-injecting stand-ins for virtual-time runs of the whole task tree.

``FaultyMessage`` can fail when it is settled; ``ScriptedPlane`` answers each claim as the test
scripts it (any outcome, or an exception). Everything else is ``tests/fakes.py``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from noetl_worker import service
from noetl_worker.config import Settings
from noetl_worker.control_plane import ClaimOutcome
from noetl_worker.dispatch import Runtime

from ..fakes import FakeBus, FakeMessage, FakePlane

ClaimScript = Callable[[], Awaitable[ClaimOutcome]]


def settings(**env: str) -> Settings:
    base = {"WORKER_ID": "w-test", "NOETL_SERVER_URL": "http://server", "WORKER_HEARTBEAT_INTERVAL": "10"}
    base.update(env)
    return Settings.from_env(base)


@attrs.define(eq=False)
class FaultyMessage(FakeMessage):
    """A delivery whose ack/nak/term raise ``fail`` (an exception instance) when set."""

    fail: BaseException | None = None
    attempts: list[str] = attrs.field(factory=list)

    async def _maybe_fail(self, how: str) -> None:
        self.attempts.append(how)
        await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail

    async def ack(self) -> None:
        await self._maybe_fail("ack")
        await super().ack()

    async def nak(self, delay: float | None = None) -> None:
        await self._maybe_fail("nak")
        await super().nak(delay)

    async def term(self) -> None:
        await self._maybe_fail("term")
        await super().term()

    @property
    def handled(self) -> bool:
        return bool(self.attempts)


@attrs.define(eq=False)
class ScriptedPlane(FakePlane):
    """Claims answer per event id from ``scripts``; unscripted ids behave as in FakePlane."""

    scripts: dict[int, ClaimScript] = attrs.field(factory=dict)
    claims: list[int] = attrs.field(factory=list)

    async def claim(self, server_url: str | None, event_id: int) -> ClaimOutcome:
        self.claims.append(event_id)
        script = self.scripts.get(event_id)
        if script is None:
            return await super().claim(server_url, event_id)
        await trio.lowlevel.checkpoint()
        return await script()


def notification(event_id: Any, **override: Any) -> bytes:
    body = {
        "execution_id": 1,
        "event_id": event_id,
        "command_id": f"cmd-{event_id}",
        "step": f"step{event_id}",
        "server_url": "http://server",
    }
    body.update(override)
    return json.dumps(body).encode()


async def start_tree(
    nursery: trio.Nursery, s: Settings, bus: FakeBus, plane: FakePlane
) -> tuple[service.WorkerState, Runtime]:
    state = service.WorkerState(s.heartbeat_interval)
    nursery.start_soon(
        lambda: service.serve(s, state=state, bus=bus, plane=plane, http=False, handle_signals=False)
    )
    await state.started.wait()
    assert state.runtime is not None
    return state, state.runtime


async def wait_until(predicate: Callable[[], bool], interval: float = 0.5) -> None:
    """Virtual time only (the callers run under a MockClock and bound it with fail_after)."""
    while not predicate():  # noqa: ASYNC110 - fakes have no event for every condition
        await trio.sleep(interval)
