"""One task that keeps every running command's timers.

A command has three things to do only if it runs long: the in-progress ack (every ack_wait/3),
the ``command.heartbeat`` (every 15 s, Python server) and sending its start events on their own
(after the 50 ms coalescing window). Most commands end long before any of them is due, so a
sleeping task per timer — started, then cancelled, for every command — was pure cost: three task
spawns and cancellations per command, and as many trio scheduler passes, which a paced worker
pays for after every idle wake-up (docs/performance.md, "Paced against burst").

:class:`Alarms` keeps the deadlines in one heap and sleeps in one task until the earliest. An
alarm that comes due starts its work in the nursery the command gave (so the work is still the
command's child: cancelled with it, its errors are the command's). A command that ends first
cancels its alarms; a cancelled alarm at the head of the heap is dropped at once, so it never
wakes the task, and once more than half the heap is cancelled alarms (short commands' ones,
queued behind a long command's first in-progress ack) it is compacted. Without the task
running (a tool or dispatch test that builds a ``Runtime`` of its own) an alarm falls back to a
sleeping task in the command's nursery — the same behaviour.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Awaitable, Callable

import attrs
import trio

__all__ = ["Alarm", "Alarms"]

Work = Callable[[], Awaitable[object]]
_COMPACT_AT = 256  # cancelled alarms kept in the heap before it is compacted


@attrs.define(eq=False)
class Alarm:
    """One pending piece of a command's work. ``cancel`` is idempotent and never blocks."""

    deadline: float
    _nursery: trio.Nursery
    _work: Work
    _owner: Alarms | None
    cancelled: bool = False
    fired: bool = False

    def cancel(self) -> None:
        if not self.cancelled and not self.fired:
            self.cancelled = True
            if self._owner is not None:
                self._owner._cancelled_one()


@attrs.define(eq=False)
class Alarms:
    """The worker's timer task (:meth:`run`) and the alarms it keeps."""

    _heap: list[tuple[float, int, Alarm]] = attrs.field(factory=list)
    _order: itertools.count[int] = attrs.field(factory=itertools.count)
    _scope: trio.CancelScope | None = None
    _cancelled: int = 0  # cancelled alarms still in the heap
    wakeups: int = 0  # times the task woke to fire something (the tests read it)

    @property
    def pending(self) -> int:
        """Alarms in the heap, cancelled ones not yet dropped included."""
        return len(self._heap)

    def after(self, delay: float, nursery: trio.Nursery, work: Work) -> Alarm:
        """Start ``work`` in ``nursery`` after ``delay`` seconds unless cancelled first."""
        deadline = trio.current_time() + delay
        if self._scope is None:  # no timer task: the plain way
            alarm = Alarm(deadline, nursery, work, None)
            nursery.start_soon(_sleep_then, alarm)
            return alarm
        alarm = Alarm(deadline, nursery, work, self)
        heapq.heappush(self._heap, (deadline, next(self._order), alarm))
        if deadline < self._scope.deadline:
            self._scope.deadline = deadline
        return alarm

    async def run(self) -> None:
        """The timer task: sleeps until the earliest alarm, starts what is due, forever."""
        try:
            while True:
                with trio.CancelScope(deadline=self._next_deadline()) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self.wakeups += 1
                self._fire_due(trio.current_time())
        finally:
            self._scope = None
            # Alarms still pending fall back to a sleeping task each, in their own nursery
            # (the command is still running, e.g. while the worker drains).
            heap, self._heap, self._cancelled = self._heap, [], 0
            for _deadline, _n, alarm in heap:
                if not alarm.cancelled:
                    alarm._owner = None
                    _start(alarm, _sleep_then)

    def _next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def _fire_due(self, now: float) -> None:
        heap = self._heap
        while heap and (heap[0][2].cancelled or heap[0][0] <= now):
            _deadline, _n, alarm = heapq.heappop(heap)
            if alarm.cancelled:
                self._cancelled -= 1
            else:
                alarm.fired = True
                _start(alarm, _run_work)

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > _COMPACT_AT and self._cancelled * 2 > len(heap):
            # Cancelled alarms behind a long-lived head (a long command's first in-progress ack)
            # would pile up at the command rate until it fires: drop them all now.
            self._heap = heap = [entry for entry in heap if not entry[2].cancelled]
            heapq.heapify(heap)
            self._cancelled = 0
        elif not heap or not heap[0][2].cancelled:
            return
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        if self._scope is not None:
            # Later, never earlier: the task then sleeps through the dropped deadline.
            self._scope.deadline = self._next_deadline()


def _start(alarm: Alarm, runner: Callable[[Alarm], Awaitable[None]]) -> None:
    try:
        alarm._nursery.start_soon(runner, alarm)
    except RuntimeError:
        pass  # the command's nursery has closed: the command ended, nothing left to do


async def _run_work(alarm: Alarm) -> None:
    await alarm._work()


async def _sleep_then(alarm: Alarm) -> None:
    await trio.sleep_until(alarm.deadline)
    if not alarm.cancelled:
        alarm.fired = True
        await alarm._work()
