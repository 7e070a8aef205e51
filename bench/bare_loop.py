"""The floor for bench/throughput.py: the same NATS and HTTP calls as the worker, nothing else.

    python bench/bare_loop.py NATS_URL SERVER_URL N CONCURRENCY

trio + trio-asyncio + nats-py: one task pulls fetch(1) from the worker's durable consumer and
hands each message to CONCURRENCY tasks in a nursery; each does an httpx claim, one
/api/events/batch POST (started + call.done + completed) and the ack. Exits after N messages.
No metrics, no logging, no retries, no validation: what a no-op command costs at the least.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

import httpx
import nats
import trio
import trio_asyncio

STREAM, CONSUMER = "noetl_commands", "worker-pool"


def event(
    event_id: int, note: dict[str, Any], event_type: str, status: str, ctx: dict[str, Any]
) -> dict[str, Any]:
    ctx = {"command_id": str(note["command_id"]), **ctx}
    return {
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


async def main(nats_url: str, server_url: str, n: int, concurrency: int) -> None:
    ids = iter(range(time.time_ns() // 1000, 1 << 62))
    async with trio_asyncio.open_loop():
        nc = await trio_asyncio.aio_as_trio(nats.connect)(nats_url)
        sub = await trio_asyncio.aio_as_trio(nc.jetstream().pull_subscribe_bind)(
            durable=CONSUMER, stream=STREAM
        )
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits) as client:
            send, receive = trio.open_memory_channel[Any](0)

            async def handle() -> None:
                async for msg in receive:
                    note = json.loads(msg.data)
                    r = await client.post(
                        f"{server_url}/api/commands/{note['event_id']}/claim", json={"worker_id": "bare"}
                    )
                    r.raise_for_status()
                    body = {
                        "execution_id": str(note["execution_id"]),
                        "worker_id": "bare",
                        "events": [
                            event(next(ids), note, "command.started", "STARTED", {}),
                            event(
                                next(ids), note, "call.done", "COMPLETED", {"result": {"status": "success"}}
                            ),
                            event(next(ids), note, "command.completed", "success", {"status": "success"}),
                        ],
                    }
                    r = await client.post(f"{server_url}/api/events/batch", json=body)
                    r.raise_for_status()
                    await trio_asyncio.aio_as_trio(msg.ack)()

            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(handle)
                async with send:
                    done = 0
                    while done < n:
                        try:
                            msgs = await trio_asyncio.aio_as_trio(sub.fetch)(1, timeout=5)
                        except nats.errors.TimeoutError:
                            continue
                        for msg in msgs:
                            await send.send(msg)
                            done += 1
        await trio_asyncio.aio_as_trio(nc.close)()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
