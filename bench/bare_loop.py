"""The naive design-card loop bench/throughput.py measures the worker against.

    python bench/bare_loop.py NATS_URL CONCURRENCY

trio + trio-asyncio + nats-py + httpx, written the obvious way: one task pulls ``fetch(1)``
from its own durable consumer (``bare`` on the stream ``noetl_commands``, subject
``noetl.commands``) and hands each message to CONCURRENCY tasks; each does the httpx claim, then
three separate ``/api/events`` POSTs (command.started, call.done, command.completed), then the
ack. No metrics, no logging, no retries, no validation. Runs until SIGTERM.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
import time
from typing import Any

import httpx
import nats
import trio
import trio_asyncio
from nats.js.api import ConsumerConfig

STREAM, CONSUMER, SUBJECT = "noetl_commands", "bare", "noetl.commands"


def event(
    event_id: int, note: dict[str, Any], event_type: str, status: str, ctx: dict[str, Any]
) -> dict[str, Any]:
    ctx = {"command_id": str(note["command_id"]), **ctx}
    return {
        "execution_id": str(note["execution_id"]),
        "worker_id": "bare",
        "event_id": event_id,
        "event_type": event_type,
        "name": event_type,
        "step": note["step"],
        "status": status,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "context": ctx,
        "payload": ctx,
        "meta": {"attempts": 0, "command_id": str(note["command_id"])},
        "actionable": event_type == "call.done",
        "informative": True,
    }


async def main(nats_url: str, concurrency: int) -> None:
    ids = iter(range(time.time_ns() // 1000, 1 << 62))
    async with trio_asyncio.open_loop():
        nc = await trio_asyncio.aio_as_trio(nats.connect)(nats_url)
        js = nc.jetstream()
        sub = await trio_asyncio.aio_as_trio(js.pull_subscribe)(
            SUBJECT, durable=CONSUMER, stream=STREAM, config=ConsumerConfig(filter_subject=SUBJECT)
        )
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits) as client:
            send, receive = trio.open_memory_channel[Any](0)

            async def handle() -> None:
                async for msg in receive:
                    note = json.loads(msg.data)
                    server = note["server_url"]
                    r = await client.post(
                        f"{server}/api/commands/{note['event_id']}/claim", json={"worker_id": "bare"}
                    )
                    r.raise_for_status()
                    for event_type, status, ctx in (
                        ("command.started", "STARTED", {}),
                        ("call.done", "COMPLETED", {"result": {"status": "success"}}),
                        ("command.completed", "success", {"status": "success"}),
                    ):
                        r = await client.post(
                            f"{server}/api/events", json=event(next(ids), note, event_type, status, ctx)
                        )
                        r.raise_for_status()
                    await trio_asyncio.aio_as_trio(msg.ack)()

            async def pull() -> None:
                async with send:
                    while True:
                        try:
                            msgs = await trio_asyncio.aio_as_trio(sub.fetch)(1, timeout=5)
                        except nats.errors.TimeoutError:
                            continue
                        for msg in msgs:
                            await send.send(msg)

            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    for _ in range(concurrency):
                        nursery.start_soon(handle)
                    nursery.start_soon(pull)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break
        await trio_asyncio.aio_as_trio(nc.close)()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
