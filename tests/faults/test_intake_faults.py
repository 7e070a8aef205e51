"""Intake faults with real parts (nats-server, HTTP stub): foreign servers, replay storms, NATS
outages, an existing durable, the metrics port taken, a worker killed mid-command."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from noetl_worker.bus import _call
from noetl_worker.config import Settings
from noetl_worker.testing import NatsServer, Publisher, StubServer, StubState, open_stub_server, open_worker

from ..conftest import PYTHON, poll_until, subprocess_env
from ..test_faults import kill_tree, wait_registered, worker_process
from ..test_integration import wait_acked

TOKEN = "s3cr3t-internal-token"


def _sample(worker: object, name: str, labels: dict[str, str] | None = None) -> float | None:
    registry = worker.runtime.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value(name, labels or {})  # type: ignore[no-any-return]


# ---- server-URL policy -----------------------------------------------------------------------


async def test_a_notification_naming_another_server_is_terminated_and_nothing_goes_there(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    async with open_stub_server(StubState()) as collector:
        command = collector.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
        with trio.fail_after(30):
            async with open_worker(make_settings(NOETL_INTERNAL_API_TOKEN=TOKEN)) as worker:
                await publisher.publish_command(command.notification(collector.url))
                await poll_until(lambda: _sample(worker, "noetl_worker_server_url_rejected_total") == 1)
                await wait_acked(publisher)
        assert collector.state.request_log == [], "a request (and the token) went to the collector"
        assert not stub.state.requests_to(r"/claim$")


async def test_an_allowlisted_second_server_is_served(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    async with open_stub_server(StubState()) as second:
        command = second.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
        settings = make_settings(NOETL_INTERNAL_API_TOKEN=TOKEN, NOETL_SERVER_URL_ALLOWLIST=second.url + "/")
        with trio.fail_after(30):
            async with open_worker(settings):
                await publisher.publish_command(command.notification(second.url))
                await second.state.wait_terminal([command], timeout=20)
        assert set(second.state.authorization_headers) == {f"Bearer {TOKEN}"}


# ---- no replay storm -------------------------------------------------------------------------


async def _publish_stale(stub: StubServer, publisher: Publisher, n: int) -> list[int]:
    """``n`` notifications of commands that are long finished (the server answers 409
    already_terminal to each)."""
    ids = []
    for i in range(n):
        command = stub.state.enqueue_command(step=f"old{i}", tool_kind="noop", tool_config={})
        command.status = "COMPLETED"
        await publisher.publish_command(command.notification(stub.url))
        ids.append(command.event_id)
    return ids


async def test_a_new_durable_does_not_replay_old_notifications(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    with trio.fail_after(120):
        await _publish_stale(stub, publisher, 2000)
        published = time.time()
        # The stale ones must be older than the window: wall-clock age, nothing to wait on.
        await trio.sleep(max(0.0, published + 1.5 - time.time()))
        settings = make_settings(NATS_DELIVER_WINDOW_SECONDS="1", WORKER_MAX_CONCURRENT="4")
        async with open_worker(settings):
            fresh = [
                stub.state.enqueue_command(step=f"new{i}", tool_kind="noop", tool_config={}) for i in range(3)
            ]
            for command in fresh:
                await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal(fresh, timeout=30)
            await wait_acked(publisher)
    claims = stub.state.requests_to(r"/claim$")
    assert len(claims) == 3, f"{len(claims)} claims: the stale notifications were replayed"


async def test_replaying_on_purpose_costs_one_request_per_stale_notification(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    """NATS_DELIVER_POLICY=all replays the stream; each stale one is one claim (409
    already_terminal), acked without a retry, an event or a backoff."""
    with trio.fail_after(180):
        ids = await _publish_stale(stub, publisher, 500)
        async with open_worker(make_settings(NATS_DELIVER_POLICY="all", WORKER_MAX_CONCURRENT="4")):
            await stub.state.wait_for(lambda: len(stub.state.requests_to(r"/claim$")) >= len(ids), 120)
            await wait_acked(publisher, timeout=60)
    claims = stub.state.requests_to(r"/claim$")
    assert len(claims) == len(ids)
    assert not stub.state.requests_to(r"^/api/events")


async def test_an_existing_durable_is_bound_as_it_is(
    nats: NatsServer, stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    config = ConsumerConfig(
        durable_name=settings.consumer,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=settings.subject,
        ack_wait=42,
    )
    js = publisher.bus.js
    await _call(js.add_consumer, settings.stream, config)
    with trio.fail_after(30):
        async with open_worker(settings):
            info = await _call(js.consumer_info, settings.stream, settings.consumer)
    assert info.config.deliver_policy == DeliverPolicy.ALL and info.config.ack_wait == 42


# ---- NATS outage: a readable trail -----------------------------------------------------------


async def test_a_nats_outage_logs_one_line_per_backoff_step_with_the_next_delay(
    nats: NatsServer,
    stub: StubServer,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="noetl_worker")
    with trio.fail_after(60):
        async with open_worker(make_settings()) as worker:
            assert _sample(worker, "noetl_worker_nats_connected") == 1
            nats.kill()
            await nats.wait()
            await poll_until(lambda: not worker.readiness()[0])
            caplog.clear()
            await trio.sleep(8)  # a real outage of 8 s
            lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert _sample(worker, "noetl_worker_nats_connected") == 0
            await nats.restart()
            await poll_until(lambda: worker.readiness()[0])
            # nats-py reports the reconnect (callback) just after the connection is usable again.
            await poll_until(lambda: _sample(worker, "noetl_worker_nats_reconnects_total") == 1)
            assert _sample(worker, "noetl_worker_nats_connected") == 1
    text = "\n".join(r.getMessage() for r in lines)
    # 0.5, 1, 2, 4 s … : at most 5 steps fit in 8 s (nats-py's own: one error every 0.5 s).
    assert 1 <= len(lines) <= 6, text
    assert all(re.search(r"in \d+\.\ds", r.getMessage()) for r in lines), text


# ---- the metrics port already in use ---------------------------------------------------------


def test_the_metrics_port_in_use_is_one_line_and_exit_2() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = subprocess_env(
            WORKER_METRICS_BIND=f"127.0.0.1:{port}", NATS_URL="nats://127.0.0.1:9", NOETL_LOG_FORMAT="text"
        )
        done = subprocess.run(
            [PYTHON, "-m", "noetl_worker"], env=env, capture_output=True, text=True, timeout=60
        )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = [line for line in output.splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1 and f"WORKER_METRICS_BIND=127.0.0.1:{port}" in errors[0], output
    assert "Address already in use" in errors[0]


# ---- a worker killed mid-command ---------------------------------------------------------------


@pytest.mark.parametrize(
    "stub_state", [StubState(claim_lease_seconds=3, heartbeat_stale_seconds=3)], ids=["short-lease"]
)
async def test_a_worker_killed_mid_command_is_redelivered_and_completed_once(
    nats: NatsServer, stub: StubServer, publisher: Publisher, tmp_path: Path
) -> None:
    ledger, starts = tmp_path / "ledger", tmp_path / "starts"
    command = stub.state.enqueue_command(
        step="long",
        tool_kind="shell",
        tool_config={"command": f"echo started >> {starts}; sleep 3; echo done >> {ledger}"},
    )
    with trio.fail_after(120):
        # each worker in a session of its own, so a kill takes its tool processes too (as a pod
        # kill takes every process of the container)
        async with worker_process(
            stub,
            nats,
            tmp_path / "a.log",
            own_session=True,
            WORKER_ID="w-killed",
            NOETL_WORKER_NATS_ACK_WAIT_SECONDS="2",
        ) as a:
            await wait_registered(stub, "w-killed")
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_for(lambda: "command.started" in stub.state.event_types(command), 30)
            kill_tree(a.pid)
            await a.wait()
        async with worker_process(stub, nats, tmp_path / "b.log", own_session=True, WORKER_ID="w-next") as b:
            await stub.state.wait_terminal([command], timeout=90)
            b.send_signal(signal.SIGTERM)
            assert await b.wait() == 0
    assert ledger.read_text().split() == ["done"]
    assert starts.read_text().split() == ["started", "started"]
    types = stub.state.event_types(command)
    assert types.count("command.completed") == 1 and types.count("call.done") == 1, types
    assert stub.state.command(command.event_id).worker_id == "w-next"
