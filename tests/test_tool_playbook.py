"""The playbook tool against a scripted in-memory control plane."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from noetl_worker.errors import HTTPStatusError, ToolConfigError, TransportError
from noetl_worker.tools import playbook
from noetl_worker.tools.base import ToolResult

from .tool_support import make_ctx


class ScriptedServer:
    """Answers each path from a list of scripted answers (the last one repeats);
    an exception in the script is raised instead of answered."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, Any]] = []

    def _answer(self, method: str, path: str, body: Any) -> Any:
        self.calls.append((method, path, body))
        script = self.answers[f"{method} {path}"]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        await trio.lowlevel.checkpoint()
        return self._answer("GET", path, None)

    async def post_json(self, path: str, body: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return self._answer("POST", path, body)

    async def put_json(self, path: str, body: Any) -> Any:
        raise AssertionError("unexpected PUT")


class SlotRecorder:
    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.log: list[str] = []

    @asynccontextmanager
    async def release(self) -> AsyncIterator[None]:
        self.log.append(f"release after {len(self.server.calls)} calls")
        try:
            yield
        finally:
            self.log.append(f"retake after {len(self.server.calls)} calls")


STARTED = {"execution_id": "555", "status": "started", "commands_generated": 1}
RUNNING = {"execution_id": "555", "completed": False, "failed": False, "current_step": "a"}
DONE = {"execution_id": "555", "completed": True, "failed": False, "variables": {"x": 1}}


async def _run(server: ScriptedServer, config: dict[str, Any]) -> tuple[ToolResult, SlotRecorder]:
    slots = SlotRecorder(server)
    ctx = make_ctx(server=server, release_slot=slots.release)
    with trio.fail_after(60):  # virtual seconds where a test uses the autojump clock
        result = await playbook.run({"poll_interval": 0.01, **config}, ctx)
    return result, slots


async def test_waits_for_completion_with_the_slot_released_while_polling(
    autojump_clock: trio.abc.Clock,
) -> None:
    status = "GET /api/executions/555/status"
    server = ScriptedServer({"POST /api/execute": [STARTED], status: [RUNNING, RUNNING, DONE]})
    config = {"path": "child/pb", "payload": {"k": "v"}, "version": 2, "return_step": "end"}
    result, slots = await _run(server, config)
    assert result.status == "success"
    assert result.data == {**DONE, "execution_id": "555"}
    assert server.calls[0] == (
        "POST",
        "/api/execute",
        {"path": "child/pb", "version": 2, "payload": {"k": "v"}, "parent_execution_id": "101"},
    )
    assert [c[1] for c in server.calls[1:]] == ["/api/executions/555/status"] * 3
    # released only after the execute POST, taken back after the last poll
    assert slots.log == ["release after 1 calls", "retake after 4 calls"]


async def test_transient_errors_are_retried(autojump_clock: trio.abc.Clock) -> None:
    status = "GET /api/executions/555/status"
    server = ScriptedServer(
        {
            "POST /api/execute": [HTTPStatusError(503, "busy", retry_after=1.0), STARTED],
            status: [TransportError("reset"), HTTPStatusError(502, "bad gw"), RUNNING, DONE],
        }
    )
    result, _ = await _run(server, {"catalog_id": 9, "args": {"a": 1}, "input": {"b": 2}, "wait": True})
    assert result.status == "success"
    assert server.calls[0][2]["catalog_id"] == "9"
    assert server.calls[0][2]["payload"] == {"a": 1, "b": 2}  # args and input merged, as noetl does
    assert len(server.calls) == 6


async def test_failed_child_is_its_status_document(autojump_clock: trio.abc.Clock) -> None:
    # noetl's worker stores the failed child's status and lets the parent route on it.
    failed = {"execution_id": "555", "completed": False, "failed": True, "current_step": "b"}
    server = ScriptedServer({"POST /api/execute": [STARTED], "GET /api/executions/555/status": [failed]})
    result, _ = await _run(server, {"path": "p", "return_step": "end"})
    assert result.status == "success"
    assert result.data == failed


async def test_status_strings_are_understood(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(
        {
            "POST /api/execute": [STARTED],
            "GET /api/executions/555/status": [{"status": "RUNNING"}, {"status": "COMPLETED"}],
        }
    )
    result, _ = await _run(server, {"path": "p", "return_step": "end"})
    assert result.status == "success"


async def test_timeout_reports_the_last_status(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer({"POST /api/execute": [STARTED], "GET /api/executions/555/status": [RUNNING]})
    slots = SlotRecorder(server)
    with trio.fail_after(3600):
        result = await playbook.run(
            {"path": "p", "timeout": 30, "return_step": "end"},
            make_ctx(server=server, release_slot=slots.release),
        )
    assert result.status == "timeout"
    assert result.data["current_step"] == "a"
    assert result.data["execution_id"] == "555"
    assert len(server.calls) == 1 + 15  # one poll every 2 s for 30 s
    assert slots.log[-1].startswith("retake")


async def test_final_4xx_is_an_error_result(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer({"POST /api/execute": [HTTPStatusError(404, "no such playbook")]})
    result, slots = await _run(server, {"path": "missing"})
    assert result.status == "error"
    assert result.data["status_code"] == 404
    assert "no such playbook" in (result.error or "")
    assert len(server.calls) == 1
    assert slots.log == []


async def test_unreachable_server_on_execute_is_an_error_after_retries(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer({"POST /api/execute": [TransportError("refused")]})
    result, _ = await _run(server, {"path": "p"})
    assert result.status == "error"
    assert len(server.calls) == playbook.EXECUTE_ATTEMPTS


@pytest.mark.parametrize("extra", [{}, {"return_step": "end", "wait": False}])
async def test_without_return_step_it_does_not_wait(extra: dict[str, Any]) -> None:
    server = ScriptedServer({"POST /api/execute": [STARTED]})
    result, slots = await _run(server, {"path": "p", "input": {"x": 1}, "parent_execution_id": 7, **extra})
    assert result.status == "success"
    assert result.data == {"status": "started", "execution_id": "555", "path": "p", "data": STARTED}
    assert len(server.calls) == 1
    assert server.calls[0][2]["parent_execution_id"] == "7"
    assert slots.log == []


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({}, "path"),
        ({"path": ""}, "path"),
        ({"path": "p", "payload": [1]}, "payload"),
        ({"path": "p", "poll_interval": 0}, "poll_interval"),
        ({"path": "p", "wait": "sometimes"}, "wait"),
    ],
)
async def test_config_errors_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        await playbook.run(config, make_ctx())
    assert info.value.field == field
