from __future__ import annotations

import json

import pytest

from noetl_worker.errors import NotificationError
from noetl_worker.notification import parse_notification


def test_python_server_shape_with_integer_ids() -> None:
    raw = {
        "execution_id": 770916021908537897,
        "event_id": 770916124677374613,
        "command_id": 770916124677374612,
        "step": "done",
        "server_url": "http://127.0.0.1:58082",
    }
    note = parse_notification(json.dumps(raw).encode())
    assert note.execution_id == 770916021908537897 and note.event_id == 770916124677374613
    assert note.command_id == "770916124677374612" and note.execution_pool is None


def test_rust_server_shape_with_string_command_id_pool_and_trace() -> None:
    raw = {
        "execution_id": "614025361772412928",
        "event_id": "614025361772412933",
        "command_id": "614025361772412928:fetch:614025361772412933",
        "step": "fetch",
        "server_url": "http://noetl:8082",
        "execution_pool": "shared",
        "trace": {"traceparent": "00-x"},
    }
    note = parse_notification(json.dumps(raw).encode())
    assert note.execution_id == 614025361772412928 and note.execution_pool == "shared"
    assert note.command_id.endswith(":614025361772412933")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"event_id": 1, "command_id": "c", "step": "s"}).encode(), "execution_id"),
        (
            json.dumps({"execution_id": 1, "event_id": 1.5, "command_id": "c", "step": "s"}).encode(),
            "event_id",
        ),
        (
            json.dumps({"execution_id": True, "event_id": 1, "command_id": "c", "step": "s"}).encode(),
            "execution_id",
        ),
        (
            json.dumps({"execution_id": 1, "event_id": 1, "command_id": None, "step": "s"}).encode(),
            "command_id",
        ),
        (
            json.dumps({"execution_id": 1, "event_id": 1, "command_id": [1], "step": "s"}).encode(),
            "command_id",
        ),
        (json.dumps({"execution_id": 1, "event_id": 1, "command_id": "c", "step": ""}).encode(), "step"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_notifications_are_rejected_with_a_reason(payload: bytes, fragment: str) -> None:
    with pytest.raises(NotificationError, match=fragment):
        parse_notification(payload)
