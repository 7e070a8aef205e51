"""The metric inventory means what docs/metrics.md says: one test per label value of
``noetl_worker_commands_total{status}`` (and what each adds to ``dispatch_errors_total``), the
configured-concurrency gauge, lag gauges absent until a poll answered, and the version in the
start-up log line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from noetl_worker import __version__
from noetl_worker.bus import ConsumerLag
from noetl_worker.config import Settings
from noetl_worker.errors import BusError
from noetl_worker.metrics import COMMAND_STATUSES, ERROR_STATUSES, Metrics
from noetl_worker.service import _lag_poller
from noetl_worker.testing import Publisher, StubServer, open_worker

from .conftest import poll_until

# status → (tool kind, tool config, cases) of a command that ends with it.
COMMANDS: dict[str, tuple[str, dict[str, Any], list[Any] | None]] = {
    "success": ("noop", {}, None),
    "error": ("shell", {"command": "exit 1"}, None),
    "timeout": ("shell", {"command": "sleep 30", "timeout": 0.3}, None),
    "failed": ("shell", {"cmds": 42}, None),  # invalid config: the tool never ran
}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_every_documented_status_has_a_test() -> None:
    assert set(COMMANDS) | {"cancelled", "failed (case)"} >= set(COMMAND_STATUSES)
    assert {"error", "timeout", "failed"} == ERROR_STATUSES


@pytest.mark.parametrize("status", sorted(COMMANDS))
async def test_commands_total_and_dispatch_errors_per_status(
    status: str, stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    kind, config, cases = COMMANDS[status]
    cmd = stub.state.enqueue_command(step="s", tool_kind=kind, tool_config=config, cases=cases)
    with trio.fail_after(40):
        async with open_worker(make_settings()) as worker:
            await publisher.publish_command(cmd.notification(stub.url))
            await stub.state.wait_terminal([cmd], timeout=30)
            metrics = worker.runtime.metrics  # type: ignore[union-attr]
            await poll_until(
                lambda: sample(metrics, "noetl_worker_commands_total", tool_kind=kind, status=status) > 0
            )
    counted = {
        s: sample(metrics, "noetl_worker_commands_total", tool_kind=kind, status=s) for s in COMMAND_STATUSES
    }
    assert counted == {s: 1.0 if s == status else 0.0 for s in COMMAND_STATUSES}
    errors = sample(metrics, "noetl_worker_dispatch_errors_total", tool_kind=kind)
    assert errors == (1.0 if status in ERROR_STATUSES else 0.0)


async def test_a_case_that_fails_the_command_counts_as_failed(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    cases = [{"when": [], "then": {"fail": {"message": "rejected by a case"}}}]
    cmd = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={}, cases=cases)
    with trio.fail_after(40):
        async with open_worker(make_settings()) as worker:
            await publisher.publish_command(cmd.notification(stub.url))
            await stub.state.wait_terminal([cmd], timeout=30)
            metrics = worker.runtime.metrics  # type: ignore[union-attr]
    assert stub.state.command(cmd.event_id).status == "FAILED"  # type: ignore[union-attr]
    assert sample(metrics, "noetl_worker_commands_total", tool_kind="noop", status="failed") == 1.0
    assert sample(metrics, "noetl_worker_commands_total", tool_kind="noop", status="success") == 0.0
    assert sample(metrics, "noetl_worker_dispatch_errors_total", tool_kind="noop") == 1.0


async def test_a_command_cancelled_by_the_drain_deadline_counts_as_cancelled(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    cmd = stub.state.enqueue_command(step="s", tool_kind="shell", tool_config={"command": "sleep 60"})
    settings = make_settings(NOETL_WORKER_SHUTDOWN_GRACE_SECONDS="0.3")
    with trio.fail_after(40):
        async with open_worker(settings) as worker:
            await publisher.publish_command(cmd.notification(stub.url))
            metrics = worker.runtime.metrics  # type: ignore[union-attr]
            await poll_until(lambda: sample(metrics, "noetl_worker_concurrent_dispatches") == 1.0)
        # open_worker's exit stopped the worker: the drain deadline cancelled the running shell.
    assert sample(metrics, "noetl_worker_commands_total", tool_kind="shell", status="cancelled") == 1.0
    for status in ("success", "error", "timeout", "failed"):
        assert sample(metrics, "noetl_worker_commands_total", tool_kind="shell", status=status) == 0.0
    assert sample(metrics, "noetl_worker_dispatch_errors_total", tool_kind="shell") == 0.0


async def test_concurrency_limit_gauge_and_version_in_the_start_up_line(
    stub: StubServer,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="noetl_worker")
    with trio.fail_after(30):
        async with open_worker(make_settings(WORKER_MAX_CONCURRENT="3", WORKER_POOL_NAME="shared")) as worker:
            metrics = worker.runtime.metrics  # type: ignore[union-attr]
            assert sample(metrics, "noetl_worker_concurrency_limit", worker_pool="shared") == 3.0
    (start,) = [r for r in caplog.records if r.getMessage().endswith("starting")]
    assert start.getMessage() == f"noetl-worker {__version__} starting"
    assert start.version == __version__  # type: ignore[attr-defined]


class ScriptedBus:
    """A bus whose consumer-info answers follow a script: ConsumerLag or BusError per poll."""

    def __init__(self, answers: list[ConsumerLag | BusError], bound: bool = True) -> None:
        self.answers, self.bound, self.polls = answers, bound, 0
        self.connected = True

    async def consumer_lag(self) -> ConsumerLag:
        self.polls += 1
        answer = self.answers.pop(0) if self.answers else BusError("no more answers")
        if isinstance(answer, BusError):
            raise answer
        return answer


async def test_lag_gauges_are_absent_until_a_poll_answers(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    settings = Settings.from_env({"WORKER_NATS_LAG_POLL_INTERVAL": "1"})
    rt = SimpleNamespace(settings=settings, metrics=metrics)
    labels = {"stream": "noetl_commands", "consumer": "worker-pool"}

    def pending() -> float | None:
        value: float | None = metrics.registry.get_sample_value("noetl_worker_nats_consumer_pending", labels)
        return value

    bus = ScriptedBus([ConsumerLag(7, 2), BusError("connection closed")], bound=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_lag_poller, rt, bus)
        await trio.sleep(2.5)
        assert bus.polls == 0 and pending() is None  # never bound: unknown, not 0
        assert "noetl_worker_nats_consumer_pending{" not in metrics_text(metrics)
        bus.bound = True
        await trio.sleep(1)
        assert pending() == 7.0
        ack = metrics.registry.get_sample_value("noetl_worker_nats_consumer_ack_pending", labels)
        assert ack == 2.0
        await trio.sleep(1)  # the next poll fails: the last value is no longer known
        assert bus.polls == 2 and pending() is None
        bus.connected, bus.answers = False, [ConsumerLag(1, 1)]
        await trio.sleep(3)  # NATS unreachable: no poll (the outage has its own log lines)
        assert bus.polls == 2 and pending() is None
        bus.connected = True
        await trio.sleep(1)
        assert bus.polls == 3 and pending() == 1.0
        nursery.cancel_scope.cancel()


def metrics_text(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
