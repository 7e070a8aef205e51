"""The server dialects: what each server is told about a command, and how a server is recognised.

Python (noetl 4.12.1, as its own worker sends it): `response` = the tool's value, a failed tool is
call.error + command.failed, only call.* actionable. Rust: the Rust worker's ToolResult envelope,
a failed tool is still call.done + command.completed.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
import trio
import trio.lowlevel

from noetl_worker.dialect import (
    DEFAULT_DIALECT,
    DIALECT_MODES,
    REPROBE_AFTER,
    Dialects,
    PythonDialect,
    Reported,
    RustDialect,
    classify_health,
    dialect_for_command,
)
from noetl_worker.errors import TransportError
from noetl_worker.events import Event, EventFactory
from noetl_worker.tools.base import ToolResult

from .test_events import python_server_accepts, rust_server_accepts

SHELL_DATA = {"returncode": 7, "stdout": "partial\n", "stderr": "oops\n", "commands": [], "duration_ms": 3}


@pytest.fixture
def events() -> EventFactory:
    counter = itertools.count(1)
    return EventFactory(lambda: next(counter), 42, "fetch", "99", "w-1")


def inline(value: Any, status: str = "success") -> Reported:
    return Reported({"status": status, "context": value})


def shape(batch: list[Event]) -> list[tuple[str, bool]]:
    return [(e.event_type, e.to_json()["actionable"]) for e in batch]


# ---- python -----------------------------------------------------------------------------------


def test_python_success_sends_the_tools_value_as_response(events: EventFactory) -> None:
    dialect = PythonDialect()
    result = ToolResult("success", data={"greeting": "hello"}, stdout="log line\n")
    assert not dialect.tool_failed(result, "python")
    assert dialect.reported_value(result, failed=False) == {"greeting": "hello"}
    batch = [
        *dialect.start_events(events),
        *dialect.success_events(events, inline({"greeting": "hello"}), result, (), ()),
    ]
    assert shape(batch) == [
        ("command.started", False),
        ("step.enter", False),
        ("call.done", True),  # the one the batch route acts on
        ("step.exit", False),
        ("command.completed", False),
    ]
    done = batch[2].to_json()["context"]
    assert done["response"] == {"greeting": "hello"}
    # the server logs result as the event's result: the value's control fields, as noetl's worker
    assert done["result"] == {"status": "COMPLETED", "context": {"greeting": "hello"}}
    assert batch[3].to_json()["context"]["status"] == "COMPLETED"
    for event in batch:
        python_server_accepts(event.to_json())


def test_python_result_context_is_the_values_control_projection(events: EventFactory) -> None:
    dialect = PythonDialect()
    value = {
        "status_code": 200,
        "url": "http://x/",
        "headers": {"content-type": "application/json", "set": ["a"]},
        "data": {"big": "body"},
        "rows": [{"a": 1}],
        "columns": ["a"],
        "command_1_rows": 1,
        "command_id": 7,
        "items": [1, 2],
        "ref": {"kind": "result_ref", "ref": "noetl://x", "nested": {"k": 1}},
    }
    batch = dialect.success_events(events, inline(value), ToolResult("success", data=value), (), ())
    done = batch[0].to_json()["context"]
    assert done["response"] == value
    assert done["result"] == {
        "status": "COMPLETED",
        "context": {
            "status_code": 200,
            "url": "http://x/",
            "headers": {"content-type": "application/json"},
            "command_id": 7,
            "ref": {"kind": "result_ref", "ref": "noetl://x", "nested": {"k": 1}},
        },
    }
    for other in ("still here", [1, 2], {"data": [1]}):
        sent = dialect.success_events(events, inline(other), ToolResult("success", data=other), (), ())
        assert sent[0].to_json()["context"]["result"] == {"status": "COMPLETED"}
        python_server_accepts(sent[0].to_json())


@pytest.mark.parametrize(
    ("result", "kind"),
    [
        (ToolResult("error", data=SHELL_DATA, error="command exited with code 7"), "shell"),
        (ToolResult("timeout", error="timed out after 1s"), "shell"),
        # upstream's rule: a value that says it failed is a failed tool
        (ToolResult("success", data={"status": "error", "error": "bad row"}), "python"),
        (ToolResult("success", data={"load": {"status": "error", "error": "bad row"}}), "python"),
    ],
)
def test_python_failed_tool_is_call_error_then_command_failed(
    events: EventFactory, result: ToolResult, kind: str
) -> None:
    dialect = PythonDialect()
    assert dialect.tool_failed(result, kind)
    value = dialect.reported_value(result, failed=True)
    error = dialect.error_text(result)
    batch = dialect.tool_error_events(events, inline(value), result, error, (), ())
    assert shape(batch) == [("call.error", True), ("step.exit", False), ("command.failed", False)]
    call_error, step_exit, failed = (e.to_json()["context"] for e in batch)
    assert call_error["error"] == error == failed["error"] == step_exit["error"]
    assert call_error["response"] == value
    # the tool's error envelope, or the value itself when the value said it failed
    assert value == result.data if result.status == "success" else value["status"] == "error"
    assert step_exit["status"] == "FAILED" and failed["result"] == {"status": "FAILED"}
    for event in batch:
        python_server_accepts(event.to_json())


def test_python_error_envelope_and_text(events: EventFactory) -> None:
    dialect = PythonDialect()
    shell = ToolResult("error", data=SHELL_DATA, error="command exited with code 7")
    assert dialect.reported_value(shell, failed=True) == {
        "status": "error",
        "error": "command exited with code 7",
        "data": SHELL_DATA,
    }
    said = ToolResult("success", data={"status": "failed", "error": {"message": "quota"}})
    assert dialect.error_text(said) == "quota"
    assert dialect.error_text(ToolResult("success", data={"status": "error"})) == "Tool returned error status"
    assert (
        dialect.error_text(ToolResult("error", exit_code=3, stderr="nope\n"))
        == "tool returned exit code 3: nope"
    )


def test_python_agent_envelopes_and_plain_values_are_not_failures() -> None:
    dialect = PythonDialect()
    assert not dialect.tool_failed(ToolResult("success", data={"status": "error"}), "agent")
    assert not dialect.tool_failed(ToolResult("success", data=[{"status": "error"}]), "python")
    assert not dialect.tool_failed(ToolResult("success", data={"status": "ok", "n": 1}), "python")


def test_python_large_result_goes_as_a_reference_without_response(events: EventFactory) -> None:
    reference = {"kind": "result_ref", "ref": "noetl://execution/42/result/fetch/ab", "store": "kv"}
    reported = Reported(
        {"status": "success", "context": {"data": {"_ref": reference["ref"]}}, "reference": reference}
    )
    batch = PythonDialect().success_events(events, reported, ToolResult("success", data=1), (), ())
    done = batch[0].to_json()["context"]
    assert "response" not in done
    assert done["result"] == {"status": "COMPLETED", "reference": reference}
    python_server_accepts(batch[0].to_json())


def test_python_unstorable_large_result_reports_its_status_only(events: EventFactory) -> None:
    batch = PythonDialect().success_events(
        events, Reported({"status": "success"}), ToolResult("success"), (), ()
    )
    assert batch[0].to_json()["context"]["result"] == {"status": "COMPLETED"}
    assert "response" not in batch[0].to_json()["context"]


def test_python_loop_meta_goes_back_with_call_events(events: EventFactory) -> None:
    meta = {"loop_event_id": "loop_1_2", "loop_iteration_index": 3, "__loop_epoch_id": "e1", "other": "x"}
    dialect = dialect_for_command("python", meta)
    done, step_exit, _ = dialect.success_events(events, inline(9), ToolResult("success", data=9), (), ())
    body = done.to_json()
    assert body["context"]["loop_event_id"] == "loop_1_2"
    assert body["context"]["loop_iteration_index"] == 3
    assert body["meta"]["__loop_epoch_id"] == "e1" and "other" not in body["meta"]
    assert step_exit.to_json()["meta"]["loop_iteration_index"] == 3
    (error, *_) = dialect.exception_events(events, "boom", "ValueError")
    assert error.to_json()["context"]["loop_event_id"] == "loop_1_2"


def test_python_exception_events(events: EventFactory) -> None:
    batch = PythonDialect().exception_events(events, "Tool not found: teleport", "ToolError")
    assert shape(batch) == [("call.error", True), ("step.exit", False), ("command.failed", False)]
    assert batch[2].to_json()["context"]["error_type"] == "ToolError"
    assert all(e.to_json()["context"]["error"] == "Tool not found: teleport" for e in batch)
    for event in batch:
        python_server_accepts(event.to_json())


def test_python_case_step_exit_replaces_the_dialects_own(events: EventFactory) -> None:
    case_exit = events.step_exit("finished", "ada")
    batch = PythonDialect().success_events(events, inline(1), ToolResult("success", data=1), (case_exit,), ())
    assert [e.event_type for e in batch] == ["call.done", "step.exit", "command.completed"]
    assert batch[1] is case_exit


# ---- rust -------------------------------------------------------------------------------------


def test_rust_sends_the_tool_result_envelope_and_a_failed_tool_still_completes(events: EventFactory) -> None:
    dialect = RustDialect()
    result = ToolResult("error", data=SHELL_DATA, error="command exited with code 7", exit_code=7)
    assert not dialect.tool_failed(result, "shell")
    value = dialect.reported_value(result, failed=False)
    assert value == result.to_json()
    batch = [
        *dialect.start_events(events),
        *dialect.success_events(events, inline(value, "error"), result, (), ()),
    ]
    assert [e.event_type for e in batch] == ["command.started", "call.done", "command.completed"]
    done, completed = batch[1].to_json(), batch[2].to_json()
    assert done["context"]["result"] == {"status": "error", "context": value}
    assert completed["status"] == "error" and completed["context"]["status"] == "error"
    for event in batch:
        rust_server_accepts(event.to_json())
        python_server_accepts(event.to_json())


def test_rust_exception_is_call_error_then_command_failed(events: EventFactory) -> None:
    batch = RustDialect().exception_events(events, "boom", "RuntimeError")
    assert [e.event_type for e in batch] == ["call.error", "command.failed"]


# ---- telling the servers apart ------------------------------------------------------------------


RUST_HEALTH = b'{"status":"ok","database":"connected","nats":"removed","uptime_seconds":5,"version":"3.83.1"}'


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, RUST_HEALTH, "rust"),
        (503, b'{"status":"unhealthy","database":"disconnected","version":"3.83.1"}', "rust"),
        (200, b'{"status":"ok"}', "python"),
        (404, b'{"detail":"Not Found"}', "python"),
        (200, b"<html>ok</html>", None),
        (200, b'["ok"]', None),
        (500, b'{"detail":"Internal Server Error"}', None),
        (401, b"", None),
    ],
)
def test_health_answers_are_classified(status: int, body: bytes, expected: str | None) -> None:
    assert classify_health(status, body) == expected


class Health:
    """A scripted GET /api/health: each call takes the next answer (an exception is raised)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    async def __call__(self, server_url: str) -> tuple[int, bytes]:
        self.calls.append(server_url)
        await trio.lowlevel.checkpoint()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]


async def test_probe_decides_per_server_url_and_caches() -> None:
    health = Health((200, RUST_HEALTH), (200, b'{"status":"ok"}'))
    dialects = Dialects("auto", fetch=health)
    with trio.fail_after(5):
        assert await dialects.for_server("http://rust:8082") == "rust"
        assert await dialects.for_server("http://py:8082") == "python"
        assert await dialects.for_server("http://rust:8082") == "rust"
        assert await dialects.for_server("http://py:8082") == "python"
    assert health.calls == ["http://rust:8082", "http://py:8082"]


async def test_concurrent_first_commands_share_one_probe() -> None:
    health = Health((200, RUST_HEALTH))
    dialects = Dialects("auto", fetch=health)
    seen: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(lambda: _collect(dialects, seen))
    assert seen == ["rust"] * 5 and len(health.calls) == 1


async def _collect(dialects: Dialects, seen: list[str]) -> None:
    seen.append(await dialects.for_server("http://s"))


async def test_an_odd_answer_falls_back_to_the_default_with_one_warning_and_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = Health((200, b"<html>hello</html>"))
    dialects = Dialects("auto", fetch=health)
    with caplog.at_level(logging.WARNING, logger="noetl_worker.dialect"), trio.fail_after(5):
        assert await dialects.for_server("http://odd") == DEFAULT_DIALECT == "python"
        assert await dialects.for_server("http://odd") == "python"
    assert len(health.calls) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NOETL_SERVER_DIALECT" in warnings[0].getMessage()


async def test_a_transport_error_falls_back_and_is_asked_again_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    health = Health(TransportError("connection refused"), TransportError("still down"), (200, RUST_HEALTH))
    dialects = Dialects("auto", fetch=health, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="noetl_worker.dialect"), trio.fail_after(5):
        assert await dialects.for_server("http://s") == "python"
        now[0] += REPROBE_AFTER / 2
        assert await dialects.for_server("http://s") == "python"  # not asked again yet
        assert len(health.calls) == 1
        now[0] += REPROBE_AFTER
        assert await dialects.for_server("http://s") == "python"  # asked again, still down
        now[0] += REPROBE_AFTER + 1
        assert await dialects.for_server("http://s") == "rust"  # back: decided and kept
        now[0] += 10 * REPROBE_AFTER
        assert await dialects.for_server("http://s") == "rust"
    assert len(health.calls) == 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


async def test_a_fixed_dialect_never_probes() -> None:
    health = Health((200, RUST_HEALTH))
    with trio.fail_after(5):
        assert await Dialects("python", fetch=health).for_server("http://s") == "python"
        assert await Dialects("rust", fetch=health).for_server("http://s") == "rust"
    assert health.calls == []


def test_an_unknown_mode_names_the_accepted_values() -> None:
    with pytest.raises(ValueError, match="auto, python, rust"):
        Dialects("fastapi")


def test_the_setting_accepts_exactly_the_dialect_modes() -> None:
    from noetl_worker.config import SERVER_DIALECTS, ConfigError, Settings

    assert SERVER_DIALECTS == DIALECT_MODES
    assert Settings.from_env({}).server_dialect == "auto"
    assert Settings.from_env({"NOETL_SERVER_DIALECT": "Rust"}).server_dialect == "rust"
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"NOETL_SERVER_DIALECT": "fastapi"})
    assert "NOETL_SERVER_DIALECT" in str(raised.value) and "auto, python, rust" in str(raised.value)
