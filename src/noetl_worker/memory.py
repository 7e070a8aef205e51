"""The worker's heap: settled once at start-up, freed memory given back once it goes quiet.

Settling: when the worker first turns ready, one full collection frees what start-up left
behind, and ``gc.freeze()`` moves every object that exists then — modules, classes, functions,
the runtime's long-lived state, ~47 000 objects — out of the cyclic collector's reach. A full
collection then walks only what was made since, instead of the whole start-up heap each time
(15-35 ms per collection before, ~1 ms after, in ``bench/throughput.py``). Those objects are
still freed as usual when nothing refers to them; only a reference cycle among them would never
be. The CLI does it (``service.run``), not an embedded worker, whose host owns its heap.

A burst of commands grows the C heap (request and result buffers, parsed claim contexts);
glibc keeps the freed pages mapped, so the worker's resident memory would stay at its burst
level while it idles. When no command has started for a while, ``malloc_trim(0)`` returns them
(~0.1 ms; a full garbage collection first would cost ~20 ms for little more). Once per quiet
period: a worker that stays idle pays nothing more.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable
from typing import Final

import trio

log = logging.getLogger(__name__)

QUIET_SECONDS: Final = 5.0  # no command started for this long (and none running): trim


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    return trim


_TRIM = _malloc_trim()


def settle() -> int:
    """Collect start-up's garbage, then freeze what is left; returns how many objects froze."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("start-up heap settled: %d objects out of the cyclic collector's reach", frozen)
    return frozen


async def settle_when_ready(ready: trio.Event) -> None:
    await ready.wait()
    settle()


def trim() -> None:
    """Hand the C heap's free pages back (glibc only)."""
    if _TRIM is not None:
        _TRIM(0)


async def trim_when_quiet(
    started: Callable[[], int], running: Callable[[], int], quiet: float = QUIET_SECONDS
) -> None:
    """Run for the worker's lifetime. ``started`` counts commands started so far, ``running``
    those running now; a trim follows start-up and each stretch of work, once it has been quiet
    for ``quiet`` seconds."""
    trimmed_at: int | None = None
    seen = started()
    while True:
        await trio.sleep(quiet)
        now = started()
        if now == seen and now != trimmed_at and running() == 0:
            trim()
            trimmed_at = now
            log.debug("memory trimmed after %d command(s)", now)
        seen = now
