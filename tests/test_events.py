"""Every event the worker builds is accepted by both servers' rules.

Python server: `name`/`payload` (or the EE aliases), no top-level
`_internal_data`, `payload.result` only status/reference/context/command_id with object values.
Rust server: all nine ExecutorEvent fields with their types, no nulls.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest

from noetl_worker.events import EventFactory


def python_server_accepts(body: dict[str, Any]) -> None:
    assert isinstance(body.get("name") or body.get("event_type"), str)
    assert isinstance(body.get("step") or body.get("node_name"), str)
    assert isinstance(body["execution_id"], (int, str))
    payload = body.get("payload", body.get("context"))
    assert isinstance(payload, dict)
    assert "_internal_data" not in payload
    if "result" in payload:
        result = payload["result"]
        assert isinstance(result, dict)
        assert set(result) <= {"status", "reference", "context", "command_id"}, set(result)
        for key in ("reference", "context"):
            if key in result:
                assert isinstance(result[key], dict)


def rust_server_accepts(body: dict[str, Any]) -> None:
    assert isinstance(body["execution_id"], int) and not isinstance(body["execution_id"], bool)
    assert isinstance(body["event_type"], str) and isinstance(body["step"], str)
    assert isinstance(body["status"], str)
    dt.datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))
    assert isinstance(body["context"], dict)
    assert isinstance(body["event_id"], int) and body["event_id"] > 0
    assert isinstance(body["worker_id"], str)
    assert isinstance(body["meta"], dict) and isinstance(body["meta"]["attempts"], int)
    assert None not in body.values()


@pytest.fixture
def factory() -> EventFactory:
    counter = itertools.count(1)
    return EventFactory(lambda: next(counter), 42, "fetch", "42:fetch:7", "w-1", attempts=2)


def test_every_lifecycle_event_is_valid_for_both_servers(factory: EventFactory) -> None:
    events = [
        factory.started(),
        factory.call_done({"status": "success", "context": {"status": "success", "data": {"x": 1}}}),
        factory.call_done(
            {
                "status": "success",
                "context": {"data": {"_ref": "noetl://x"}},
                "reference": {"kind": "result_ref"},
            }
        ),
        factory.call_error("Tool not found: nope"),
        factory.completed("error"),
        factory.failed("boom"),
        factory.step_exit("done", {"a": 1}),
    ]
    for event in events:
        body = event.to_json()
        python_server_accepts(body)
        rust_server_accepts(body)
        item = event.to_batch_item()
        python_server_accepts({**item, "execution_id": "42"})


def test_the_payload_is_sent_once(factory: EventFactory) -> None:
    body = factory.call_done({"status": "success", "context": {"data": "x" * 1000}}).to_json()
    assert set(body) == {
        "event_id", "execution_id", "event_type", "step", "status", "created_at", "context",
        "worker_id", "meta", "actionable", "informative",
    }  # fmt: skip


def test_event_ids_are_unique_and_command_identity_travels(factory: EventFactory) -> None:
    a, b = factory.started(), factory.completed("success")
    assert a.event_id != b.event_id
    for event in (a, b):
        body = event.to_json()
        assert body["context"]["command_id"] == "42:fetch:7"
        assert body["meta"] == {"attempts": 2, "worker_id": "w-1", "command_id": "42:fetch:7"}


def test_statuses_per_event_type(factory: EventFactory) -> None:
    assert factory.started().status == "STARTED"
    assert factory.call_done({"status": "error"}).status == "COMPLETED"
    assert factory.call_error("x").status == "FAILED"
    assert factory.failed("x").status == "FAILED"
    completed = factory.completed("timeout").to_json()
    assert completed["status"] == "timeout" and completed["context"]["status"] == "timeout"
    # Only routing events are actionable: the Python batch route acts on the last actionable one.
    assert factory.call_done({"status": "success"}).to_json()["actionable"] is True
    assert factory.completed("success").to_json()["actionable"] is False
    assert factory.started().to_json()["actionable"] is False
