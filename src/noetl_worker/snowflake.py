"""Snowflake event ids: 41-bit milliseconds since the epoch | 10-bit node id | 12-bit sequence.

The layout matches the server's and the upstream workers', so ids from every producer interleave
in the same bigint column. Ids are strictly increasing within a process even when the wall clock
steps back (the last used millisecond is reused and the sequence carries on).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

TIMESTAMP_BITS = 41
NODE_BITS = 10
SEQUENCE_BITS = 12
MAX_NODE = (1 << NODE_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
_TIMESTAMP_MASK = (1 << TIMESTAMP_BITS) - 1


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@attrs.define(eq=False)
class SnowflakeGenerator:
    node_id: int = attrs.field(
        validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(MAX_NODE))
    )
    epoch_ms: int = 1_704_067_200_000
    clock_ms: Callable[[], int] = _wall_ms
    _last_ms: int = 0
    _sequence: int = 0

    def next_id(self) -> int:
        # Single-threaded by construction: every caller runs on the trio thread.
        now = max(self.clock_ms() - self.epoch_ms, 0)
        if now < self._last_ms:
            now = self._last_ms  # clock stepped back: keep counting on the last millisecond
        if now == self._last_ms:
            self._sequence = (self._sequence + 1) & MAX_SEQUENCE
            if self._sequence == 0:
                # 4096 ids in one millisecond: borrow the next millisecond rather than spin.
                now = self._last_ms + 1
        else:
            self._sequence = 0
        self._last_ms = now
        return (
            ((now & _TIMESTAMP_MASK) << (NODE_BITS + SEQUENCE_BITS))
            | (self.node_id << SEQUENCE_BITS)
            | self._sequence
        )


def decompose(snowflake: int, epoch_ms: int = 1_704_067_200_000) -> tuple[int, int, int]:
    """(unix milliseconds, node id, sequence) of an id."""
    return (
        (snowflake >> (NODE_BITS + SEQUENCE_BITS)) + epoch_ms,
        (snowflake >> SEQUENCE_BITS) & MAX_NODE,
        snowflake & MAX_SEQUENCE,
    )
