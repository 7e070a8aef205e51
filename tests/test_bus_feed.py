"""The intake's NATS feed against a real nats-server: pull requests stay open for the free
slots (a paced stream needs few), what was delivered and not taken goes back at close, open
requests die with the subscription, and a deleted consumer is noticed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from noetl_worker.bus import Bus, _call
from noetl_worker.errors import BusError
from noetl_worker.testing import NatsServer, Publisher, open_publisher

from .conftest import poll_until

SUBJECT = "noetl.commands"


@asynccontextmanager
async def open_bus(nats: NatsServer) -> AsyncIterator[Bus]:
    """A bus bound to the durable ``feed`` (the publisher's connection, then its consumer)."""
    async with open_publisher(nats.url, NATS_CONSUMER="feed") as own:
        await own.bus.bind_consumer()
        yield own.bus


async def publish(publisher: Publisher, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await publisher.publish(SUBJECT, json.dumps({"i": i}).encode())


async def test_a_paced_stream_needs_a_pull_request_per_half_a_slot_full(
    nats: NatsServer, publisher: Publisher
) -> None:
    got = []
    with trio.fail_after(30):
        async with open_bus(nats) as bus:
            for i in range(24):
                await publish(publisher, 1, i)  # one at a time, each taken before the next
                messages = await bus.fetch(16, timeout=5)
                for m in messages:
                    got.append(json.loads(m.data)["i"])
                    await m.ack()
            sent = bus.pulls_sent
    assert got == list(range(24))
    assert sent <= 5, f"{sent} pull requests for 24 messages (a fetch per message would be 24)"


async def test_delivered_but_not_taken_messages_go_back_at_close(
    nats: NatsServer, publisher: Publisher
) -> None:
    with trio.fail_after(20):
        async with open_bus(nats) as first:
            assert await first.fetch(16, timeout=0.2) == []  # leaves a request for 16 open
            await publish(publisher, 3)
            await poll_until(lambda: first._buffered == 3)  # delivered into the feed, not taken
        # closed: the three were nak'd, so they come back now, not after ack_wait (30 s)
        async with open_bus(nats) as second:
            messages: list = []
            while len(messages) < 3:
                messages += await second.fetch(16, timeout=5)
            assert sorted(json.loads(m.data)["i"] for m in messages) == [0, 1, 2]
            assert {m.num_delivered for m in messages} == {2}


async def test_open_pull_requests_die_with_the_feed(nats: NatsServer, publisher: Publisher) -> None:
    with trio.fail_after(20):
        async with open_bus(nats) as first:
            assert await first.fetch(16, timeout=0.2) == []  # a request for 16 stays open
        await publish(publisher, 3)  # after the close: nothing may be delivered to its inbox
        async with open_bus(nats) as second:
            messages: list = []
            while len(messages) < 3:
                messages += await second.fetch(16, timeout=5)
            assert {m.num_delivered for m in messages} == {1}


async def test_a_deleted_consumer_is_noticed_by_the_waiting_fetch(
    nats: NatsServer, publisher: Publisher
) -> None:
    with trio.fail_after(20):
        async with open_bus(nats) as bus:

            async def delete_soon() -> None:
                await trio.sleep(0.3)
                await _call(publisher.bus.js.delete_consumer, bus.settings.stream, "feed")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(delete_soon)
                with pytest.raises(BusError, match="refused"):
                    await bus.fetch(16, timeout=10)
            assert not bus.bound  # the intake binds again, creating the consumer
            await bus.bind_consumer()
            await publish(publisher, 1)
            messages = await bus.fetch(16, timeout=5)
            assert [json.loads(m.data)["i"] for m in messages] == [0]
