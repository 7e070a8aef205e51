"""A worker stops promptly: the NATS drain at shutdown must not wait on the cancelled fetch."""

from __future__ import annotations

from collections.abc import Callable

import trio

from noetl_worker.config import Settings
from noetl_worker.testing import Publisher, StubServer, open_worker

# The drain used to stall for its whole 5 s bound on every shutdown of a worker fetching more
# than one message at a time (the pull subscription's queue holds the answer to the fetch the
# shutdown cancelled, and drain waits for someone to read it); a healthy stop takes milliseconds.
PROMPT_STOP = 3.0


async def test_worker_stops_without_waiting_for_the_drain_timeout(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    with trio.fail_after(30):
        async with open_worker(make_settings(WORKER_MAX_CONCURRENT="2")):
            cmd = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
            await publisher.publish_command(cmd.notification(stub.url))
            await stub.state.wait_terminal([cmd], timeout=20)
            stop_requested = trio.current_time()
        stopped_after = trio.current_time() - stop_requested
    assert stopped_after < PROMPT_STOP, f"shutdown took {stopped_after:.1f}s"
    assert stub.state.deregistrations, "the worker deregistered on its way out"
