"""How many worker-shaped round trips per second the stub control plane serves.

Run (the repository's venv): python bench/stub_roundtrip.py [commands]
One process (client and server share the CPU), one httpx client, sequential commands, each doing
claim + command.started + call.done + command.completed. Tells whether the stub, not the worker,
would cap a benchmark that uses it.
"""

from __future__ import annotations

import sys
import time

import httpx
import trio

from noetl_worker.testing import StubState, open_stub_server


async def main(n: int) -> None:
    state = StubState()
    commands = [state.enqueue_command(step="s", tool_kind="noop", tool_config={}) for _ in range(n)]
    async with open_stub_server(state) as stub, httpx.AsyncClient(base_url=stub.url) as client:
        wall, cpu = time.perf_counter(), time.process_time()
        for cmd in commands:
            await client.post(f"/api/commands/{cmd.event_id}/claim", json={"worker_id": "w"})
            for name in ("command.started", "call.done", "command.completed"):
                payload = {"command_id": cmd.command_id}
                if name == "call.done":
                    payload["result"] = {"status": "success", "context": {"data": None}}
                await client.post(
                    "/api/events",
                    json={
                        "execution_id": cmd.execution_id,
                        "event_type": name,
                        "step": "s",
                        "context": payload,
                    },
                )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    requests = 4 * n
    print(
        f"{n} commands, {requests} requests: {requests / wall:.0f} req/s, "
        f"{1000 * cpu / requests:.2f} ms CPU per request (client + server)"
    )


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 300)
