"""GET /events: lifecycle records over a websocket; slow clients dropped, dispatch never slowed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

from noetl_worker.config import Bind, Settings
from noetl_worker.event_stream import EventHub
from noetl_worker.http_server import make_app, serve_http
from noetl_worker.metrics import Metrics
from noetl_worker.testing import Publisher, StubServer, open_worker


def test_a_full_queue_drops_that_client_only() -> None:
    metrics = Metrics()
    hub = EventHub(metrics, queue=2)
    slow, fast = hub.subscribe(), hub.subscribe()
    for n in range(3):
        hub.publish({"n": n})
        fast.receive.receive_nowait()
    assert slow.dropped and not fast.dropped and hub.clients == 1
    assert metrics.registry.get_sample_value("noetl_worker_events_stream_dropped_total") == 1
    assert metrics.registry.get_sample_value("noetl_worker_events_stream_clients") == 1


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, EventHub, Metrics]]:
    metrics = Metrics()
    hub = EventHub(metrics, queue=10)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            serve_http, make_app(metrics, lambda: (True, ""), hub), Bind("127.0.0.1", 0), stop
        )
        yield urls[0].replace("http://", "ws://") + "/events", hub, metrics
        stop.set()


async def test_records_arrive_as_json(served: tuple[str, EventHub, Metrics]) -> None:
    url, hub, _ = served
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            await hub.wait_for_clients(1)
            hub.publish({"event": "claimed", "command_id": "c1"})
            assert json.loads(await ws.get_message()) == {"event": "claimed", "command_id": "c1"}
        await hub.wait_for_clients(0)


async def test_a_client_that_stops_reading_is_dropped_and_others_keep_up(
    served: tuple[str, EventHub, Metrics],
) -> None:
    url, hub, metrics = served
    big = "x" * 65536
    total = 600  # ~38 MiB: more than the loopback socket buffers plus the 10-record queue
    received: list[int] = []
    with trio.fail_after(60):
        async with open_websocket_url(url, max_message_size=1 << 20) as stalled:
            async with open_websocket_url(url, max_message_size=1 << 20) as reader:
                await hub.wait_for_clients(2)
                for n in range(total):
                    hub.publish({"n": n, "pad": big})  # synchronous: never waits for a client
                    received.append(json.loads(await reader.get_message())["n"])
                assert received == list(range(total))
                assert hub.clients == 1
                assert metrics.registry.get_sample_value("noetl_worker_events_stream_dropped_total") == 1
            # The stalled client's connection was cut: reading it ends, short of the total.
            got = await _drain(stalled)
            assert got < total


async def _drain(ws: WebSocketConnection) -> int:
    count = 0
    try:
        while True:
            await ws.get_message()
            count += 1
    except ConnectionClosed:
        return count


async def test_off_by_default() -> None:
    metrics = Metrics()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            serve_http, make_app(metrics, lambda: (True, "")), Bind("127.0.0.1", 0), stop
        )
        with trio.fail_after(10), pytest.raises(ConnectionRejected):
            async with open_websocket_url(urls[0].replace("http://", "ws://") + "/events"):
                pass
        stop.set()
    assert Settings.from_env({}).events_stream is False


async def test_the_worker_streams_each_commands_lifecycle(
    stub: StubServer,
    publisher: Publisher,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "hunter2-events-secret"
    monkeypatch.setenv("EVENTS_TEST_SECRET", secret)
    settings = make_settings(WORKER_EVENTS_STREAM="true", NOETL_KEYCHAIN_ENV_VARS="EVENTS_TEST_SECRET")
    records: list[dict[str, Any]] = []
    with trio.fail_after(60):
        async with open_worker(settings) as state:
            url = state.urls[0].replace("http://", "ws://") + "/events"
            async with open_websocket_url(url) as ws:
                assert state.events is not None
                await state.events.wait_for_clients(1)
                ok = stub.state.enqueue_command(step="ok", tool_kind="noop", tool_config={"result": {"a": 1}})
                bad = stub.state.enqueue_command(step="bad", tool_kind=f"kind_{secret}", tool_config={})
                for command in (ok, bad):
                    await publisher.publish_command(command.notification(stub.url))
                while sum(r["event"] in ("finished", "failed") for r in records) < 2:
                    records.append(json.loads(await ws.get_message()))
    by_step: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record)
    assert [r["event"] for r in by_step["ok"]] == ["claimed", "started", "finished"]
    finished = by_step["ok"][-1]
    assert finished["status"] == "success" and isinstance(finished["duration_ms"], int)
    assert finished["tool_kind"] == "noop" and finished["command_id"] == str(ok.command_id)
    assert [r["event"] for r in by_step["bad"]] == ["claimed", "started", "failed"]
    error = by_step["bad"][-1]["error"]
    assert "Tool not found: kind_" in error and secret not in error  # scrubbed
