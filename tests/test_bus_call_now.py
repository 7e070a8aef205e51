"""bus._call_now: nats-py calls run in the trio task when they never suspend (acks, pull
requests), and are finished as an asyncio task when they do (a full outbound buffer)."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
import trio
import trio.testing
import trio_asyncio

from noetl_worker import bus
from noetl_worker.errors import BusError


async def test_a_call_that_never_suspends_runs_in_place_and_one_that_does_is_finished() -> None:
    order: list[str] = []

    async def appends(value: int) -> int:  # like nc.publish: appends to a buffer, returns
        order.append(f"ran {value}")
        return value * 2

    async with trio_asyncio.open_loop() as loop:
        gate: asyncio.Future[str] = loop.create_future()

        async def waits_for_a_flush() -> str:  # like a publish over the pending-size limit
            order.append("waiting")
            flushed = await gate
            order.append(f"resumed with {flushed}")
            return flushed + "!"

        async def other() -> None:
            order.append("another task ran")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            # In place: done before the trio task waiting to run gets its turn (through the
            # bridge, this call would have yielded to it first).
            assert await bus._call_now(appends, 21) == 42
            assert order == ["ran 21"]
        assert order == ["ran 21", "another task ran"]
        async with trio.open_nursery() as nursery:
            results: list[str] = []

            async def call() -> None:
                results.append(await bus._call_now(waits_for_a_flush))

            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert order[-1] == "waiting" and not results
            gate.set_result("flushed")
        assert results == ["flushed!"]
        assert order[-1] == "resumed with flushed"

        async def yields_once() -> str:  # a bare yield, as asyncio.sleep(0) does
            await asyncio.sleep(0)
            return "after a turn"

        assert await bus._call_now(yields_once) == "after a turn"


async def test_nats_errors_become_bus_errors_on_both_paths() -> None:
    async def closed() -> None:
        raise nats.errors.ConnectionClosedError

    async with trio_asyncio.open_loop() as loop:
        gate: asyncio.Future[None] = loop.create_future()

        async def fails_after_waiting() -> None:
            await gate
            raise nats.errors.OutboundBufferLimitError

        with pytest.raises(BusError, match="ConnectionClosedError"):
            await bus._call_now(closed)
        loop.call_later(0.01, gate.set_result, None)
        with pytest.raises(BusError, match="OutboundBufferLimitError"):
            await bus._call_now(fails_after_waiting)


async def test_a_cancelled_wait_closes_the_suspended_call() -> None:
    cleaned: list[str] = []

    async with trio_asyncio.open_loop() as loop:
        never: asyncio.Future[None] = loop.create_future()

        async def stuck() -> None:
            try:
                await never
            finally:
                cleaned.append("closed")

        with trio.move_on_after(0.05) as scope:
            await bus._call_now(stuck)
        assert scope.cancelled_caught
        for _ in range(20):  # the asyncio side unwinds on its next turns
            if cleaned:
                break
            await trio.sleep(0.01)
    assert cleaned == ["closed"]
