"""The worker gives freed memory back once it has gone quiet, once per quiet period."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from noetl_worker import memory


async def test_trims_once_per_quiet_stretch_never_while_busy(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    trims: list[float] = []
    monkeypatch.setattr(memory, "trim", lambda: trims.append(trio.current_time()))
    started, running = 0, 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory.trim_when_quiet, lambda: started, lambda: running, 5.0)
        await trio.sleep(12)  # start-up, then quiet: one trim, not one per poll
        assert len(trims) == 1
        for _ in range(6):  # steady work: a command starts between every two polls
            started += 1
            await trio.sleep(4)
        assert len(trims) == 1
        running = 1  # a long command: nothing new starts, but it still holds its memory
        await trio.sleep(20)
        assert len(trims) == 1
        running = 0
        await trio.sleep(11)  # quiet again: one more trim
        assert len(trims) == 2
        nursery.cancel_scope.cancel()


def test_trim_runs_here() -> None:
    memory.trim()  # glibc's malloc_trim where present; must never raise
