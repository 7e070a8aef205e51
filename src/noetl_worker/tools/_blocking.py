"""Run a blocking database call in a worker thread and stop it on the server when cancelled.

``trio.to_thread.run_sync`` cannot interrupt its thread: abandoning the thread would leave the
query running on the server, holding locks and a connection. Instead, a cancellation (the
command's deadline, a shutdown) calls ``interrupt`` — a server-side cancel — in another thread,
then waits for the call to come back (it does, quickly, with a "cancelled" error) before
letting ``trio.Cancelled`` go on. The connection is then free to close or reuse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")
logger = logging.getLogger(__name__)


async def run_interruptible(function: Callable[[], T], interrupt: Callable[[], None]) -> T:
    """``function()`` in a thread; on cancellation ``interrupt()`` (in a thread) and wait."""
    result: list[outcome.Outcome[T]] = []

    async def call(cancel_scope: trio.CancelScope) -> None:
        with trio.CancelScope(shield=True):
            result.append(await outcome.acapture(trio.to_thread.run_sync, function))
        cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, nursery.cancel_scope)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            if not result:  # cancelled from outside, not by ``call`` finishing
                with trio.CancelScope(shield=True):
                    try:
                        await trio.to_thread.run_sync(interrupt)
                    except Exception:
                        # Nothing better to do than wait for the call to end on its own.
                        logger.warning("interrupting a blocking call failed", exc_info=True)
            raise
    return result[0].unwrap()
