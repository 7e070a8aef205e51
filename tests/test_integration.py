"""The worker tree against a real nats-server and the stub control plane over real HTTP."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from noetl_worker.config import Settings
from noetl_worker.testing import Publisher, StubServer, StubState, open_worker

from .conftest import poll_until

pytestmark = pytest.mark.usefixtures("nats")


async def wait_acked(publisher: Publisher, timeout: float = 10) -> None:
    """Until the consumer has no message pending or delivered-but-unacked."""
    with trio.fail_after(timeout):
        while True:
            lag = await publisher.bus.consumer_lag()
            if lag.pending == 0 and lag.ack_pending == 0:
                return
            await trio.sleep(0.05)


SERVER_WRITTEN = ("command.issued", "command.claimed")


def worker_events(stub: StubServer, command: Any) -> list[str]:
    """The event types the worker sent for ``command``, in order (server-written ones left out)."""
    return [t for t in stub.state.event_types(command) if t not in SERVER_WRITTEN]


def payloads(stub: StubServer, command: Any, event_type: str) -> list[dict[str, Any]]:
    return [e.payload for e in stub.state.events_for(command) if e.event_type == event_type]


@pytest.mark.parametrize("stub_state", [StubState(), StubState(flavor="rust")], ids=["python", "rust"])
async def test_commands_run_end_to_end(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    with trio.fail_after(30):
        async with open_worker(make_settings(WORKER_MAX_CONCURRENT="4")) as worker:
            noop = stub.state.enqueue_command(
                step="hello", tool_kind="noop", tool_config={"result": {"x": 1}}
            )
            shell = stub.state.enqueue_command(
                step="greet", tool_kind="shell", tool_config={"command": "echo hello"}
            )
            for command in (noop, shell):
                await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([noop, shell], timeout=20)
            await wait_acked(publisher)

            async with httpx.AsyncClient(base_url=worker.urls[0]) as client:
                assert (await client.get("/healthz")).text == "ok"
                assert (await client.get("/readyz")).status_code == 200
                metrics = (await client.get("/metrics")).text
            assert 'noetl_worker_pulls_total{outcome="claimed"} 2.0' in metrics
            assert 'noetl_worker_dispatch_duration_seconds_count{tool_kind="shell"} 1.0' in metrics

    python = stub.state.flavor == "python"
    # The worker told the servers apart by GET /api/health (NOETL_SERVER_DIALECT=auto).
    assert stub.state.requests_to(r"^/api/health$", "GET")
    for command in (noop, shell):
        expected = (
            ["command.started", "step.enter", "call.done", "step.exit", "command.completed"]
            if python
            else ["command.started", "call.done", "command.completed"]
        )
        assert worker_events(stub, command) == expected
        assert stub.state.command(command.event_id).status == "COMPLETED"  # type: ignore[union-attr]
    (done,) = payloads(stub, shell, "call.done")
    stored = stub.state.step_results[shell.execution_id]["greet"]
    if python:
        # the tool's value as `response`; its control fields in the envelope the server logs
        assert done["result"]["status"] == "COMPLETED"
        assert done["result"]["context"]["returncode"] == 0 and "commands" not in done["result"]["context"]
        assert done["response"]["stdout"] == "hello\n" and done["response"]["returncode"] == 0
        assert stored == done["response"]
        assert (
            stub.state.step_results[noop.execution_id]["hello"]
            == payloads(stub, noop, "call.done")[0]["response"]
        )
    else:
        assert done["result"]["status"] == "success"
        assert done["result"]["context"]["data"]["stdout"] == "hello\n"
        assert payloads(stub, noop, "call.done")[0]["result"]["context"]["data"] == {"x": 1}
        assert stored == done["result"]["context"]["data"]
    # Fast commands: claim + one batch call (started, call.done, completed) each.
    assert len(stub.state.requests_to(r"^/api/events/batch$", "POST")) == 2
    assert not stub.state.requests_to(r"^/api/events$", "POST")
    # registered on start, deregistered on the way out
    assert stub.state.registrations and stub.state.deregistrations


async def test_a_slow_command_reports_started_before_it_ends(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    with trio.fail_after(30):
        async with open_worker(make_settings()):
            command = stub.state.enqueue_command(
                step="slow", tool_kind="shell", tool_config={"command": "sleep 1"}
            )
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_for(lambda: "command.started" in stub.state.event_types(command), 10)
            assert not stub.state.command(command.event_id).terminal  # type: ignore[union-attr]
            await stub.state.wait_terminal([command], timeout=10)
    assert worker_events(stub, command) == [
        "command.started",
        "step.enter",
        "call.done",
        "step.exit",
        "command.completed",
    ]
    # Sent before the tool ended: the start events in a call of their own.
    first = stub.state.requests_to(r"^/api/events/batch$", "POST")[0].body
    assert [e["event_type"] for e in first["events"]] == ["command.started", "step.enter"]


async def test_bare_legacy_subject_and_routed_subjects_reach_a_default_pool_worker(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    with trio.fail_after(30):
        async with open_worker(make_settings(WORKER_MAX_CONCURRENT="2")):
            bare = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
            routed = stub.state.enqueue_command(step="b", tool_kind="noop", tool_config={})
            await publisher.publish_command(bare.notification(stub.url), subject="noetl.commands")
            await publisher.publish_command(
                routed.notification(stub.url), subject=f"noetl.commands.shared.{routed.execution_id}"
            )
            await stub.state.wait_terminal([bare, routed], timeout=20)


async def test_a_system_pool_worker_only_sees_its_segment(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(WORKER_POOL_NAME="system", NATS_CONSUMER="worker-system")
    with trio.fail_after(30):
        async with open_worker(settings):
            mine = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
            other = stub.state.enqueue_command(step="b", tool_kind="noop", tool_config={})
            await publisher.publish_command(other.notification(stub.url), subject="noetl.commands.shared.1")
            await publisher.publish_command(mine.notification(stub.url), subject="noetl.commands.system.1")
            await stub.state.wait_terminal([mine], timeout=20)
    assert not stub.state.command(other.event_id).worker_id  # type: ignore[union-attr]


async def test_empty_server_url_falls_back_to_noetl_server_url_and_api_suffix_is_tolerated(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    with trio.fail_after(30):
        async with open_worker(make_settings(NOETL_SERVER_URL=stub.url + "/api/")):
            a = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
            b = stub.state.enqueue_command(step="b", tool_kind="noop", tool_config={})
            await publisher.publish_command({**a.notification(stub.url), "server_url": ""})
            await publisher.publish_command(b.notification(stub.url + "/api"))
            await stub.state.wait_terminal([a, b], timeout=20)


# ---- claim outcomes ---------------------------------------------------------------------------


async def test_409_another_worker_holds_it_is_asked_again_until_terminal_then_acked(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    """A claim held by another worker is not acked away: that worker may have been drained or
    killed mid-command, and this notification may be the command's last. Once the command is
    terminal, the next answer (409 already_terminal) is acked."""
    command = stub.state.enqueue_command(step="a", tool_kind="shell", tool_config={"command": "echo no"})
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{stub.url}/api/commands/{command.event_id}/claim", json={"worker_id": "other"}
        )
        assert r.status_code == 200
    with trio.fail_after(40):
        async with open_worker(make_settings()) as worker:
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_for(lambda: len(stub.state.requests_to(r"/claim$")) == 3, 20)
            lag = await publisher.bus.consumer_lag()
            assert lag.pending + lag.ack_pending == 1, "the notification was dropped"
            registry = worker.runtime.metrics.registry  # type: ignore[union-attr]
            assert registry.get_sample_value("noetl_worker_pulls_total", {"outcome": "already_claimed"}) == 2
            stub.state.command(command.event_id).status = "COMPLETED"  # the other worker finished
            await wait_acked(publisher, timeout=20)
    assert "command.started" not in stub.state.event_types(command)
    assert len(stub.state.requests_to(r"/claim$")) == 4


async def test_404_unknown_command_is_reported_and_terminated_not_redelivered(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    ghost = {
        "execution_id": 7,
        "event_id": 424242,
        "command_id": "7:ghost:424242",
        "step": "ghost",
        "server_url": stub.url,
    }
    with trio.fail_after(30):
        async with open_worker(make_settings(NOETL_WORKER_NATS_ACK_WAIT_SECONDS="1")):
            await publisher.publish_command(ghost)
            await stub.state.wait_for(lambda: bool(stub.state.requests_to(r"^/api/events$", "POST")), 10)
            await wait_acked(publisher)
            # A redelivery would come after ack_wait (1 s): give it the chance, it must not happen.
            await trio.sleep(2.5)
    assert len(stub.state.requests_to(r"/commands/424242/claim$")) == 1
    (report,) = stub.state.requests_to(r"^/api/events$", "POST")
    body = report.body
    assert body["event_type"] == "command.failed" and "status=404" in body["context"]["error"]


async def test_transient_503_on_claim_is_retried_in_process(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    command = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
    stub.state.inject("POST", r"/claim$", 503, times=2, retry_after=0.1)
    with trio.fail_after(30):
        async with open_worker(make_settings()):
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([command], timeout=20)
    assert len(stub.state.requests_to(r"/claim$")) == 3


async def test_a_busy_server_gets_the_message_back_later_with_a_delay(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    command = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
    fault = stub.state.inject("POST", r"/claim$", 503, times=3, retry_after=0.1)
    with trio.fail_after(30):
        async with open_worker(make_settings()):
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_for(lambda: fault.hits == 3, 10)
            naked_at = trio.current_time()
            await stub.state.wait_terminal([command], timeout=20)
            # nak'd with a delay (not a hot redelivery spin), then claimed on the redelivery
            assert trio.current_time() - naked_at >= 2.0
    assert len(stub.state.requests_to(r"/claim$")) == 4


async def test_other_4xx_on_claim_reports_command_failed_and_acks(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    command = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
    stub.state.inject("POST", r"/claim$", 422, times=1, body={"detail": "bad worker_id"})
    with trio.fail_after(30):
        async with open_worker(make_settings(NOETL_WORKER_NATS_ACK_WAIT_SECONDS="1")):
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_for(lambda: "command.failed" in stub.state.event_types(command), 10)
            await wait_acked(publisher)
            await trio.sleep(2)  # no redelivery after ack_wait
    assert len(stub.state.requests_to(r"/claim$")) == 1
    (failed,) = payloads(stub, command, "command.failed")
    assert "status=422" in failed["error"]


async def test_malformed_notifications_are_terminated_and_the_next_command_runs(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    command = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
    with trio.fail_after(30):
        async with open_worker(make_settings(NOETL_WORKER_NATS_ACK_WAIT_SECONDS="1")) as worker:
            await publisher.publish("noetl.commands", b"this is not json")
            await publisher.publish("noetl.commands", {"execution_id": 1, "step": "x"})
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([command], timeout=20)
            await wait_acked(publisher)
            await trio.sleep(2)  # terminated, so no redelivery after ack_wait
            registry = worker.runtime.metrics.registry  # type: ignore[union-attr]
            assert registry.get_sample_value("noetl_worker_poison_messages_total") == 2
    assert len(stub.state.requests_to(r"/claim$")) == 1


# ---- event delivery -------------------------------------------------------------------------


async def test_event_delivery_survives_server_errors_without_duplicates(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    command = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
    stub.state.inject("POST", r"^/api/events", 503, times=2, retry_after=0.1)
    stub.state.inject("POST", r"^/api/events", None, times=1, delay=0.2)
    with trio.fail_after(30):
        async with open_worker(make_settings()):
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([command], timeout=20)
            await wait_acked(publisher)
    assert stub.state.event_types(command).count("command.completed") == 1
    # every retry carried the same idempotency key and the same event ids
    batches = stub.state.requests_to(r"^/api/events/batch$", "POST")
    assert len(batches) == 3 and len({b.headers.get("idempotency-key") for b in batches}) == 1
    ids = {json.dumps([e["event_id"] for e in b.body["events"]]) for b in batches}
    assert len(ids) == 1


async def test_a_server_without_the_batch_route_gets_single_events(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    stub.state.inject("POST", r"^/api/events/batch$", 404, times=100)
    commands = [stub.state.enqueue_command(step=f"s{i}", tool_kind="noop", tool_config={}) for i in range(3)]
    with trio.fail_after(30):
        async with open_worker(make_settings()):
            for command in commands:
                await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal(commands, timeout=20)
    # the first command discovers the missing route once; later ones go straight to /api/events
    assert len(stub.state.requests_to(r"^/api/events/batch$")) == 1
    for command in commands:
        assert worker_events(stub, command) == [
            "command.started",
            "step.enter",
            "call.done",
            "step.exit",
            "command.completed",
        ]


async def test_a_tool_error_is_reported_as_call_error_and_command_failed(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    bad = stub.state.enqueue_command(step="a", tool_kind="shell", tool_config={"cmds": 42})
    with trio.fail_after(30):
        async with open_worker(make_settings()):
            await publisher.publish_command(bad.notification(stub.url))
            await stub.state.wait_terminal([bad], timeout=20)
    assert worker_events(stub, bad) == [
        "command.started",
        "step.enter",
        "call.error",
        "step.exit",
        "command.failed",
    ]
    (error,) = payloads(stub, bad, "call.error")
    assert "shell.cmds" in error["error"] and "list of strings" in error["error"]
    assert stub.state.command(bad.event_id).status == "FAILED"  # type: ignore[union-attr]
    assert stub.state.execution_outcome(bad.execution_id) == "FAILED"
    assert "shell.cmds" in (stub.state.executions[bad.execution_id].failure or "")


async def test_internal_api_token_is_sent_on_every_control_plane_call(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    command = stub.state.enqueue_command(step="a", tool_kind="noop", tool_config={})
    with trio.fail_after(30):
        async with open_worker(make_settings(NOETL_INTERNAL_API_TOKEN="s3cret-token")):
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([command], timeout=20)
    paths = {r.path for r in stub.state.request_log}
    assert {
        "/api/worker/pool/register",
        f"/api/commands/{command.event_id}/claim",
        "/api/events/batch",
    } <= paths
    for request in stub.state.request_log:
        assert request.headers.get("authorization") == "Bearer s3cret-token", request.path


async def test_a_shell_command_past_its_deadline_leaves_no_process_behind(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; sleep 300"
    command = stub.state.enqueue_command(
        step="a", tool_kind="shell", tool_config={"command": script, "timeout": 1}
    )
    with trio.fail_after(30):
        async with open_worker(make_settings()):
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([command], timeout=20)
    # A timeout is a failed tool on the Python server: call.error + command.failed.
    (failed,) = payloads(stub, command, "call.error")
    assert "timed out" in failed["error"] and failed["response"]["status"] == "error"
    assert stub.state.command(command.event_id).status == "FAILED"  # type: ignore[union-attr]
    child = int(pids.read_text())
    # the whole process group was killed: the background `sleep` is gone (or a zombie awaiting init)
    try:
        stat = await trio.Path(f"/proc/{child}/stat").read_text()
    except FileNotFoundError:
        return
    assert stat.split()[2] == "Z"


async def test_consumer_lag_gauges_are_exported(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    with trio.fail_after(30):
        async with open_worker(make_settings(WORKER_NATS_LAG_POLL_INTERVAL="0.2")) as worker:
            registry = worker.runtime.metrics.registry  # type: ignore[union-attr]
            labels = {"stream": "noetl_commands", "consumer": "worker-pool"}
            await poll_until(
                lambda: registry.get_sample_value("noetl_worker_nats_consumer_pending", labels) is not None
            )
            assert registry.get_sample_value("noetl_worker_nats_consumer_ack_pending", labels) == 0


async def test_failure_log_lines_carry_the_scrubbed_error(
    stub: StubServer,
    publisher: Publisher,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "log-secret-4f3e2d1c"
    monkeypatch.setenv("LOG_TEST_TOKEN", secret)
    raised = stub.state.enqueue_command(
        step="raised",
        tool_kind="python",
        tool_config={"code": f"def main():\n    raise ValueError('bad input near {secret}')\n"},
    )
    unrunnable = stub.state.enqueue_command(
        step="unrunnable", tool_kind="shell", tool_config={"command": "true", "cwd": f"/nonexistent/{secret}"}
    )
    settings = make_settings(WORKER_MAX_CONCURRENT="2", NOETL_KEYCHAIN_ENV_VARS="LOG_TEST_TOKEN")
    with caplog.at_level(logging.WARNING, logger="noetl_worker.dispatch"), trio.fail_after(30):
        async with open_worker(settings):
            for command in (raised, unrunnable):
                await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([raised, unrunnable], timeout=20)
    lines = [r.getMessage() for r in caplog.records if r.name == "noetl_worker.dispatch"]
    assert any(
        line.startswith("command finished: error: ") and "bad input near [REDACTED]" in line for line in lines
    )
    assert any(line.startswith("command failed: ") and "/nonexistent/[REDACTED]" in line for line in lines)
    assert not any(secret in line for line in lines)
