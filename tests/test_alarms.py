"""The commands' shared timer (alarms.py), in virtual time: what fires when, what never does."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from noetl_worker.alarms import Alarms

from .fakes import FakeBus, FakePlane
from .test_tree_virtual_time import settings, start_tree


def recorder(log: list[tuple[str, float]], name: str):  # type: ignore[no-untyped-def]
    async def work() -> None:
        log.append((name, trio.current_time()))

    return work


async def quick_command(alarms: Alarms, log: list[tuple[str, float]], name: str, lasting: float) -> None:
    """A command that ends after ``lasting`` s, before any of its three timers is due."""
    async with trio.open_nursery() as command:
        timers = [alarms.after(d, command, recorder(log, name)) for d in (0.05, 10, 15)]
        await trio.sleep(lasting)
        for timer in timers:
            timer.cancel()


async def test_alarms_fire_at_their_deadlines_in_the_commands_nursery(autojump_clock: trio.abc.Clock) -> None:
    alarms, log = Alarms(), []
    async with trio.open_nursery() as root:
        root.start_soon(alarms.run)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        async with trio.open_nursery() as command:
            alarms.after(5, command, recorder(log, "late"))
            await trio.sleep(1)
            # Registered while the task sleeps towards 5 s: it must wake earlier for this one.
            alarms.after(1, command, recorder(log, "early"))
            await trio.sleep(10)
        root.cancel_scope.cancel()
    assert [(name, round(t - t0, 3)) for name, t in log] == [("early", 2.0), ("late", 5.0)]
    assert alarms.pending == 0


async def test_a_cancelled_alarm_never_runs_and_never_wakes_the_timer(autojump_clock: trio.abc.Clock) -> None:
    alarms, log = Alarms(), []
    async with trio.open_nursery() as root:
        root.start_soon(alarms.run)
        await trio.testing.wait_all_tasks_blocked()
        # 100 quick commands, each with three timers it never needs: what a burst looks like.
        for i in range(100):
            await quick_command(alarms, log, f"{i}", 0.01)
        assert alarms.pending == 0  # nothing left behind
        await trio.sleep(60)
        root.cancel_scope.cancel()
    assert log == []
    assert alarms.wakeups == 0  # the task slept through: no wake-up for a cancelled deadline


async def test_an_alarm_due_after_its_nursery_closed_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    alarms, log = Alarms(), []
    async with trio.open_nursery() as root:
        root.start_soon(alarms.run)
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as command:
            alarms.after(1, command, recorder(log, "orphan"))  # never cancelled by its owner
            command.cancel_scope.cancel()
        await trio.sleep(5)  # fires into a closed nursery: skipped, the timer task survives
        async with trio.open_nursery() as command:
            alarms.after(1, command, recorder(log, "next"))
            await trio.sleep(2)
        root.cancel_scope.cancel()
    assert [name for name, _ in log] == ["next"]


@pytest.mark.parametrize("timer_running", [False, True])
async def test_without_the_timer_task_an_alarm_still_fires_or_is_cancelled(
    autojump_clock: trio.abc.Clock, timer_running: bool
) -> None:
    """A Runtime built without the service (tool and dispatch tests) has no timer task; and the
    task may stop (shutdown, a restart) with alarms pending: those fall back to a sleeping task."""
    alarms, log = Alarms(), []
    timer = trio.CancelScope()

    async def timer_task() -> None:
        with timer:
            await alarms.run()

    async with trio.open_nursery() as root:
        if timer_running:
            root.start_soon(timer_task)
            await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        async with trio.open_nursery() as command:
            alarms.after(3, command, recorder(log, "kept"))
            alarms.after(2, command, recorder(log, "cancelled")).cancel()
            await trio.sleep(1)
            timer.cancel()  # the timer task (if any) ends here; the command goes on
            await trio.sleep(5)
    assert [(name, round(t - t0, 3)) for name, t in log] == [("kept", 3.0)]


async def test_quick_commands_leave_no_timer_work_behind(autojump_clock: trio.abc.Clock) -> None:
    """Through the whole tree: commands far shorter than every timer never wake the timer task,
    and a long one still gets its in-progress acks (test_tree_virtual_time covers the cadence)."""
    bus, plane = FakeBus(ack_wait=30), FakePlane()
    async with trio.open_nursery() as nursery:
        state = await start_tree(nursery, settings(), bus, plane)
        alarms = state.runtime.alarms  # type: ignore[union-attr]
        quick = [bus.publish(plane.add(i, "test_sleep", {"seconds": 0.001})) for i in range(1, 21)]
        for i in range(1, 21):
            await plane.wait_terminal(f"cmd-{i}")
        await trio.sleep(1)
        assert all(m.settled == "ack" for m in quick)
        assert alarms.wakeups == 0 and alarms.pending == 0
        slow = bus.publish(plane.add(21, "test_sleep", {"seconds": 25}))
        await plane.wait_terminal("cmd-21")
        assert len(slow.progress) == 2  # at 10 and 20 s
        assert alarms.pending == 0
        state.stop.set()


async def test_cancelled_alarms_behind_a_long_lived_one_do_not_pile_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A long command's first in-progress ack sits at the head of the heap for ack_wait/3 while
    thousands of short commands come and go behind it: their cancelled alarms are dropped."""
    alarms, log = Alarms(), []
    async with trio.open_nursery() as root:
        root.start_soon(alarms.run)
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as long_command:
            alarms.after(10, long_command, recorder(log, "long"))
            for i in range(5000):
                await quick_command(alarms, log, f"{i}", 0.001)
                assert alarms.pending <= 1 + 2 * 257  # bounded, not 15 000
            await trio.sleep(10)
        root.cancel_scope.cancel()
    assert [name for name, _ in log] == ["long"]
