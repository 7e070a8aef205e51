from __future__ import annotations

import io
import json
import logging

import pytest

from noetl_worker import logs
from noetl_worker.control_plane import conflict_details
from noetl_worker.dispatch import Command
from noetl_worker.notification import Notification

NOTE = Notification(execution_id=1, event_id=2, command_id="1:s:2", step="s", server_url="http://x")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"detail": {"code": "active_claim", "message": "Command is being claimed"}}', "active_claim"),
        (b'{"detail": {"code": "already_terminal", "message": "done"}}', "already_terminal"),
        (b'{"error": "command already reached terminal state", "status": 409}', "already_terminal"),
        (b'{"error": "already claimed by worker w-9", "status": 409}', "active_claim"),
        (b'{"error": "execution has been cancelled", "status": 409}', "execution_cancelled"),
        (b'{"detail": "Command is being claimed by another worker"}', "active_claim"),
        (b"", "unknown"),
        (b"<html>", "unknown"),
    ],
)
def test_both_servers_409_bodies_are_understood(body: bytes, code: str) -> None:
    assert conflict_details(body)[0] == code


@pytest.mark.parametrize(
    ("meta", "attempts"), [({"attempt": 2}, 2), ({"attempts": 3}, 3), ({}, 0), ({"attempt": "x"}, 0)]
)
def test_meta_attempt_and_attempts_are_both_understood(meta: dict[str, object], attempts: int) -> None:
    body = {
        "execution_id": 1,
        "node_id": "s",
        "node_name": "s",
        "action": "noop",
        "context": {},
        "meta": meta,
    }
    assert Command.from_claim(NOTE, "http://x", body).attempts == attempts


def test_tool_config_assembly_from_either_server() -> None:
    rust = Command.from_claim(
        NOTE,
        "http://x",
        {
            "execution_id": 1,
            "node_name": "s",
            "action": "http",
            "context": {"tool_config": {"url": "http://a"}, "args": {"q": 1}},
            "meta": {"command_id": "1:s:2", "cursor": {"frame": 2, "row": 4}},
        },
    )
    assert rust.tool_config() == {"url": "http://a", "kind": "http", "args": {"q": 1}}
    assert rust.cursor == (2, 4)
    python = Command.from_claim(
        NOTE,
        "http://x",
        {
            "execution_id": 1,
            "node_name": "s",
            "action": "python",
            "context": {"tool_config": {"code": "x", "input": {"a": 1, "b": 1}}, "input": {"b": 2}},
            "meta": {"command_id": 99},
        },
    )
    assert python.tool_config()["input"] == {"a": 1, "b": 2}  # the command's input wins
    assert python.command_id == "99"
    pipeline = Command.from_claim(
        NOTE,
        "http://x",
        {
            "execution_id": 1,
            "node_name": "s",
            "action": "task_sequence",
            "context": {"tool_config": [{"a": {}}]},
        },
    )
    assert pipeline.tool_config() == {"tool_config": [{"a": {}}], "kind": "task_sequence"}


def test_deadline_is_the_smaller_of_the_tool_timeout_and_the_cap_except_for_waiting_kinds() -> None:
    body = {"execution_id": 1, "node_name": "s", "action": "shell", "context": {}}
    shell = Command.from_claim(NOTE, "http://x", body)
    assert shell.deadline_seconds({"timeout": 5}, cap=180) == 5
    assert shell.deadline_seconds({"timeout_seconds": "500"}, cap=180) == 180
    assert shell.deadline_seconds({"timeout": "soon"}, cap=180) == 180
    playbook = Command.from_claim(NOTE, "http://x", {**body, "action": "playbook"})
    assert playbook.deadline_seconds({"timeout": 600}, cap=180) > 600


def test_json_logs_carry_the_command_fields() -> None:
    stream = io.StringIO()
    logs.configure("info", "json", "w-7", stream=stream)
    token = logs.command_fields.set({"execution_id": 1, "command_id": "c", "step": "s"})
    try:
        logging.getLogger("noetl_worker.test").info("hello %s", "there", extra={"tool_kind": "shell"})
    finally:
        logs.command_fields.reset(token)
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["msg"] == "hello there" and record["level"] == "info"
    assert {k: record[k] for k in ("worker_id", "execution_id", "command_id", "step", "tool_kind")} == {
        "worker_id": "w-7",
        "execution_id": 1,
        "command_id": "c",
        "step": "s",
        "tool_kind": "shell",
    }
