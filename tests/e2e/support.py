"""Helpers for the end-to-end tests: run commands through a real worker, read what the server saw."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from noetl_worker.config import Settings
from noetl_worker.testing import Publisher, StubCommand, StubServer, StubState, open_worker

# Events the server writes itself; the rest are what the worker reported.
SERVER_EVENTS = frozenset({"command.issued", "command.claimed"})

# Both server flavors, for ``@pytest.mark.parametrize("stub_state", FLAVORS, indirect=True)``.
FLAVORS = [pytest.param({}, id="python"), pytest.param({"flavor": "rust"}, id="rust")]


def make_stub_state(request: pytest.FixtureRequest) -> StubState:
    """The ``stub_state`` fixture body: StubState(**param) for an indirect parametrization."""
    return StubState(**getattr(request, "param", {}))


async def publish(stub: StubServer, publisher: Publisher, *commands: StubCommand) -> None:
    for command in commands:
        await publisher.publish_command(command.notification(stub.url))


async def run_commands(
    stub: StubServer,
    publisher: Publisher,
    settings: Settings,
    commands: Sequence[StubCommand],
    *,
    timeout: float = 20,
) -> None:
    """Start a worker, publish every command, wait until all are terminal, stop the worker."""
    async with open_worker(settings):
        await publish(stub, publisher, *commands)
        await stub.state.wait_terminal(commands, timeout=timeout)


def worker_events(state: StubState, command: StubCommand) -> list[str]:
    """The event types the worker reported for ``command``, in the order the server stored them."""
    return [t for t in state.event_types(command) if t not in SERVER_EVENTS]


def payload(state: StubState, command: StubCommand, event_type: str) -> dict[str, Any]:
    """The payload of the one ``event_type`` event of ``command``."""
    found = [e.payload for e in state.events_for(command) if e.event_type == event_type]
    assert len(found) == 1, f"{event_type}: {len(found)} events; all: {state.event_types(command)}"
    result: dict[str, Any] = found[0]
    return result


def call_done(state: StubState, command: StubCommand) -> dict[str, Any]:
    """``call.done``'s ``result`` object, after checking the success lifecycle."""
    assert worker_events(state, command) == ["command.started", "call.done", "command.completed"]
    result: dict[str, Any] = payload(state, command, "call.done")["result"]
    return result


def tool_result(state: StubState, command: StubCommand) -> dict[str, Any]:
    """The inline ToolResult (``call.done`` ``result.context``)."""
    context: dict[str, Any] = call_done(state, command)["context"]
    return context


def failure(state: StubState, command: StubCommand) -> str:
    """The error of a command that failed before its tool returned (call.error + command.failed)."""
    assert worker_events(state, command) == ["command.started", "call.error", "command.failed"]
    error = payload(state, command, "call.error")["error"]
    assert payload(state, command, "command.failed")["error"] == error
    assert state.command(command).status == "FAILED"
    return str(error)


def request_bodies(state: StubState) -> str:
    """Every request body the stub received, as one JSON text."""
    return "\n".join(json.dumps(r.body) for r in state.request_log)
