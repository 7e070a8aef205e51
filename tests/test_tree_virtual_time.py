"""The whole task tree against in-memory fakes, in virtual time: cadences, deadlines, drains."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio

from noetl_worker import service, tools
from noetl_worker.config import Settings
from noetl_worker.tools.base import ToolContext, ToolResult

from .fakes import FakeBus, FakePlane


def settings(**env: str) -> Settings:
    base = {"WORKER_ID": "w-test", "NOETL_SERVER_URL": "http://server", "WORKER_HEARTBEAT_INTERVAL": "10"}
    base.update(env)
    return Settings.from_env(base)


async def sleeper(config: Any, ctx: ToolContext) -> ToolResult:
    await trio.sleep(float(config["seconds"]))
    return ToolResult("success", data={"slept": config["seconds"]})


tools.register("test_sleep", sleeper)


async def start_tree(
    nursery: trio.Nursery, s: Settings, bus: FakeBus, plane: FakePlane
) -> service.WorkerState:
    state = service.WorkerState(s.heartbeat_interval)
    nursery.start_soon(
        lambda: service.serve(s, state=state, bus=bus, plane=plane, http=False, handle_signals=False)
    )
    await state.started.wait()
    return state


async def test_heartbeat_cadence_and_reregistration_on_404(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), FakePlane()
    s = settings(WORKER_HEARTBEAT_INTERVAL="10")
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, s, bus, plane)
        await trio.sleep(35)
        assert plane.registered == [pytest.approx(0, abs=0.01)]
        assert plane.heartbeats == [pytest.approx(t, abs=0.01) for t in (10, 20, 30)]
        assert state.readiness() == (True, "ready")
        # The server forgets us (e.g. it was restarted with a fresh database): register again.
        plane.heartbeat_status = lambda: 404
        await trio.sleep(10)
        plane.heartbeat_status = lambda: 200
        assert plane.registered[-1] == pytest.approx(40, abs=0.01)
        await trio.sleep(10.5)
        assert plane.heartbeats[-1] == pytest.approx(50, abs=0.01)
        state.stop.set()
    assert plane.deregistered, "a stopping worker deregisters"


async def test_readiness_turns_false_when_heartbeats_fail(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), FakePlane()
    s = settings(WORKER_HEARTBEAT_INTERVAL="5")
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, s, bus, plane)
        await trio.sleep(1)
        assert state.readiness()[0]
        plane.heartbeat_status = lambda: 503
        await trio.sleep(31)
        assert state.readiness() == (False, "no heartbeat accepted recently")
        plane.heartbeat_status = lambda: 200
        await trio.sleep(6)
        assert state.readiness()[0]
        state.stop.set()
        assert state.readiness() == (False, "draining")


RUST_HEALTH = (200, b'{"status":"ok","database":"connected","nats":"removed","version":"3.83.1"}')


@pytest.mark.parametrize("server", ["python", "rust"])
async def test_command_timeout_reports_timeout_and_acks(autojump_clock: trio.abc.Clock, server: str) -> None:
    bus, plane = FakeBus(), FakePlane()
    if server == "rust":
        plane.health = RUST_HEALTH
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(), bus, plane)
        msg = bus.publish(plane.add(1, "test_sleep", {"seconds": 1000, "timeout": 5}))
        start = trio.current_time()
        await plane.wait_terminal("cmd-1")
        assert trio.current_time() - start == pytest.approx(5, abs=0.1)
        if server == "rust":
            assert plane.types("cmd-1") == ["command.started", "call.done", "command.completed"]
            done = next(e for e in plane.events if e.event_type == "call.done")
            assert done.context["result"]["status"] == "timeout"
            assert plane.terminal("cmd-1").status == "timeout"  # type: ignore[union-attr]
        else:
            # A timeout is a failed tool on the Python server.
            assert plane.types("cmd-1") == [
                "command.started",
                "step.enter",
                "call.error",
                "step.exit",
                "command.failed",
            ]
            error = next(e for e in plane.events if e.event_type == "call.error")
            assert error.context["error"] == "timed out after 5s"
            assert error.context["response"]["status"] == "error"
        await trio.sleep(0.1)
        assert msg.settled == "ack"
        state.stop.set()


@pytest.mark.parametrize(("server", "beats"), [("python", 2), ("rust", 0)])
async def test_a_long_command_sends_heartbeats_to_the_python_server_only(
    autojump_clock: trio.abc.Clock, server: str, beats: int
) -> None:
    bus, plane = FakeBus(), FakePlane()
    if server == "rust":
        plane.health = RUST_HEALTH
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(), bus, plane)
        bus.publish(plane.add(1, "test_sleep", {"seconds": 40}))
        await plane.wait_terminal("cmd-1")
        heartbeats = [e for e in plane.events if e.event_type == "command.heartbeat"]
        # noetl's own worker: one per 15 s while the tool runs, none after it returned
        assert len(heartbeats) == beats
        for beat in heartbeats:
            assert beat.context == {"command_id": "cmd-1", "worker_id": state.runtime.settings.worker_id}  # type: ignore[union-attr]
            assert beat.to_json()["actionable"] is False
        await trio.sleep(60)
        assert len([e for e in plane.events if e.event_type == "command.heartbeat"]) == beats
        state.stop.set()


async def test_worker_cap_bounds_the_tool_timeout(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), FakePlane()
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(NOETL_WORKER_COMMAND_TIMEOUT_SECONDS="7"), bus, plane)
        bus.publish(plane.add(1, "test_sleep", {"seconds": 1000, "timeout": 60}))
        start = trio.current_time()
        await plane.wait_terminal("cmd-1")
        assert trio.current_time() - start == pytest.approx(7, abs=0.1)
        state.stop.set()


async def test_in_progress_acks_keep_a_long_command_alive(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(ack_wait=30), FakePlane()
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(), bus, plane)
        msg = bus.publish(plane.add(1, "test_sleep", {"seconds": 100}))
        await plane.wait_terminal("cmd-1")
        # one in-progress ack every ack_wait/3 = 10 s while the 100 s command ran
        assert len(msg.progress) >= 9
        assert all(b - a == pytest.approx(10, abs=0.1) for a, b in itertools.pairwise(msg.progress))
        state.stop.set()


async def test_drain_finishes_short_commands_and_naks_long_ones(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), FakePlane()
    s = settings(WORKER_MAX_CONCURRENT="4", NOETL_WORKER_SHUTDOWN_GRACE_SECONDS="10")
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, s, bus, plane)
        short = bus.publish(plane.add(1, "test_sleep", {"seconds": 3}))
        long = bus.publish(plane.add(2, "test_sleep", {"seconds": 100}))
        await trio.sleep(1)
        stopped_at = trio.current_time()
        state.stop.set()
    # serve returned: the drain took exactly the grace period for the long command
    assert trio.current_time() - stopped_at == pytest.approx(10, abs=0.2)
    assert short.settled == "ack" and plane.terminal("cmd-1") is not None
    assert long.settled == "nak" and plane.terminal("cmd-2") is None
    assert plane.deregistered and plane.deregistered[0] >= stopped_at + 10 - 0.2
    assert bus.closed


async def test_nothing_new_is_fetched_after_the_stop(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), FakePlane()
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(), bus, plane)
        busy = bus.publish(plane.add(1, "test_sleep", {"seconds": 5}))
        await trio.sleep(1)
        state.stop.set()
        later = bus.publish(plane.add(2, "test_sleep", {"seconds": 1}))
    assert busy.settled == "ack"
    assert later.settled is None and 2 not in plane.claimed


async def test_concurrency_is_bounded_by_worker_max_concurrent(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), FakePlane()
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(WORKER_MAX_CONCURRENT="2"), bus, plane)
        for i in range(1, 7):
            bus.publish(plane.add(i, "test_sleep", {"seconds": 10}))
        await plane.wait_terminal(*(f"cmd-{i}" for i in range(1, 7)))
        # 6 commands of 10 s through 2 slots: three waves
        assert trio.current_time() == pytest.approx(30, abs=0.5)
        gauge = state.runtime.metrics.concurrent._value.get()  # type: ignore[union-attr]
        assert gauge == 0
        state.stop.set()


async def test_waiting_tool_gives_its_slot_back(autojump_clock: trio.abc.Clock) -> None:
    """A parent step waiting on a child must not deadlock a single-slot worker ("waiting is not
    working", docs/architecture.md)."""
    child_done = trio.Event()

    async def parent(config: Any, ctx: ToolContext) -> ToolResult:
        async with ctx.release_slot():
            await child_done.wait()
        return ToolResult("success", data="parent")

    async def child(config: Any, ctx: ToolContext) -> ToolResult:
        child_done.set()
        return ToolResult("success", data="child")

    tools.register("test_parent", parent)
    tools.register("test_child", child)
    bus, plane = FakeBus(), FakePlane()
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(WORKER_MAX_CONCURRENT="1"), bus, plane)
        bus.publish(plane.add(1, "test_parent", {}))
        await trio.sleep(1)
        bus.publish(plane.add(2, "test_child", {}))
        with trio.fail_after(60):
            await plane.wait_terminal("cmd-1", "cmd-2")
        state.stop.set()


async def test_malformed_and_foreign_pool_notifications(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), FakePlane()
    s = settings(WORKER_POOL_NAME="shared")
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, s, bus, plane)
        poison = bus.publish(b"{not json")
        wrong = bus.publish({**plane.add(1, "noop", {}), "execution_pool": "system"})
        right = bus.publish({**plane.add(2, "noop", {}), "execution_pool": "shared"})
        await plane.wait_terminal("cmd-2")
        await trio.sleep(0.1)
        assert poison.settled == "term"
        assert wrong.settled == "ack" and 1 not in plane.claimed
        assert right.settled == "ack"
        metrics = state.runtime.metrics  # type: ignore[union-attr]
        assert metrics.poison._value.get() == 1
        state.stop.set()


async def test_a_server_down_at_start_is_retried_not_fatal(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), FakePlane(register_failures=5)
    s = settings()
    state = service.WorkerState(s.heartbeat_interval)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: service.serve(s, state=state, bus=bus, plane=plane, http=False, handle_signals=False)
        )
        await state.started.wait()
        await trio.sleep(1)
        assert state.readiness() == (False, "not registered with the server")
        with trio.fail_after(60):
            await state.ready.wait()
        assert len(plane.registered) == 1
        msg = bus.publish(plane.add(1, "noop", {}))
        await plane.wait_terminal("cmd-1")
        state.stop.set()
    assert msg.settled == "ack"


async def test_a_second_delivery_of_a_running_command_is_acked_without_running_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    runs = []

    async def counted(config: Any, ctx: ToolContext) -> ToolResult:
        runs.append(ctx.command_id)
        await trio.sleep(10)
        return ToolResult("success")

    tools.register("test_counted", counted)
    bus, plane = FakeBus(), FakePlane()
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(WORKER_MAX_CONCURRENT="2"), bus, plane)
        notification = plane.add(1, "test_counted", {})
        first = bus.publish(notification)
        await trio.sleep(1)
        second = bus.publish(notification)  # e.g. redelivered after a missed in-progress ack
        await trio.sleep(0.1)
        assert second.settled == "ack" and first.settled is None
        await plane.wait_terminal("cmd-1")
        state.stop.set()
    assert runs == ["cmd-1"] and first.settled == "ack"
