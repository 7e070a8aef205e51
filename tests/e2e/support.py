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


# What the worker sends per dialect (the stub's flavour is the server it speaks to).
PYTHON_DONE = ["command.started", "step.enter", "call.done", "step.exit", "command.completed"]
PYTHON_FAILED = ["command.started", "step.enter", "call.error", "step.exit", "command.failed"]
RUST_DONE = ["command.started", "call.done", "command.completed"]
RUST_FAILED = ["command.started", "call.error", "command.failed"]


def call_done(state: StubState, command: StubCommand) -> dict[str, Any]:
    """``call.done``'s ``result`` object, after checking the success lifecycle."""
    expected = PYTHON_DONE if state.flavor == "python" else RUST_DONE
    assert worker_events(state, command) == expected
    result: dict[str, Any] = payload(state, command, "call.done")["result"]
    return result


def tool_result(state: StubState, command: StubCommand) -> dict[str, Any]:
    """The inline ToolResult (``call.done`` ``result.context``) — the Rust dialect's."""
    assert state.flavor == "rust", "only the Rust dialect sends the ToolResult envelope"
    context: dict[str, Any] = call_done(state, command)["context"]
    return context


def value(state: StubState, command: StubCommand) -> Any:
    """The tool's value of a successful command, as the server stores it for the step.

    Python dialect: ``call.done`` ``response``; Rust: ``result.context.data``. Either way the
    stub's stored step result must be that same value.
    """
    if state.flavor == "python":
        call_done(state, command)
        sent = payload(state, command, "call.done")["response"]
    else:
        sent = tool_result(state, command).get("data")
    assert state.step_results[command.execution_id][command.step] == sent
    return sent


def tool_error(state: StubState, command: StubCommand) -> tuple[str, dict[str, Any]]:
    """(status, envelope) of a tool that returned a failed result (error/timeout).

    Python dialect: ``call.error`` + ``command.failed``, the envelope is ``response``
    (``{status: error, error, data}``), the status is read from the error text; Rust:
    ``call.done`` with the ToolResult (``status`` error/timeout) + ``command.completed``.
    """
    if state.flavor == "python":
        assert worker_events(state, command) == PYTHON_FAILED
        sent = payload(state, command, "call.error")
        envelope: dict[str, Any] = sent["response"]
        assert envelope["status"] == "error" and envelope["error"] == sent["error"]
        assert state.command(command).status == "FAILED"
        status = "timeout" if "timed out" in sent["error"] else "error"
        return status, envelope
    result = tool_result(state, command)
    return str(result["status"]), result


def failure(state: StubState, command: StubCommand) -> str:
    """The error of a command that failed before its tool returned (call.error + command.failed)."""
    expected = PYTHON_FAILED if state.flavor == "python" else RUST_FAILED
    assert worker_events(state, command) == expected
    error = payload(state, command, "call.error")["error"]
    assert payload(state, command, "command.failed")["error"] == error
    assert state.command(command).status == "FAILED"
    return str(error)


def request_bodies(state: StubState) -> str:
    """Every request body the stub received, as one JSON text."""
    return "\n".join(json.dumps(r.body) for r in state.request_log)
