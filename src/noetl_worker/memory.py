"""Giving freed memory back to the system once the worker goes quiet.

A burst of commands grows the C heap (request and result buffers, parsed claim contexts);
glibc keeps the freed pages mapped, so the worker's resident memory would stay at its burst
level while it idles. When no command has started for a while, ``malloc_trim(0)`` returns them
(~0.1 ms; a full garbage collection first would cost ~20 ms for little more). Once per quiet
period: a worker that stays idle pays nothing more.
"""

from __future__ import annotations

import ctypes
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
