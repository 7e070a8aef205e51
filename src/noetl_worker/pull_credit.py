"""Bookkeeping of the intake's JetStream pull requests: how many messages are asked for and
still owed (pure; ``bus.py`` does the I/O).

The intake keeps pull requests open on one subscription instead of a fetch per message: a
request for as many messages as there are free slots waits at the server and is answered
message by message as commands are published. What is still owed is *credit*; a new request
asks only for free slots beyond it, so every delivered message has a slot waiting for it.

A request ends when all its messages arrived, when the server says it ended (a status message
on that request's own reply subject: 408 expired, 409 conflict, …), or — a request lost in a
reconnect — a margin after its expiry. Data messages do not say which request they answer; the
server serves one consumer's waiting requests in order, so they count against the oldest.
Counting wrong can only over-ask (a message then waits for a slot, its ack_wait protected by
JetStream and the claim), never strand credit: every request ends by its deadline.
"""

from __future__ import annotations

import attrs

# A request whose end was never seen (lost with a connection) is forgotten this long after its
# expiry; by then the server has dropped it too.
EXPIRY_MARGIN = 2.0


@attrs.define
class _Request:
    remaining: int
    deadline: float  # when the server expires it


@attrs.define
class PullCredit:
    max_batch: int | None = None  # the consumer's max request batch, once the server named it
    _requests: dict[int, _Request] = attrs.field(factory=dict)
    _seq: int = 0

    @property
    def owed(self) -> int:
        return sum(r.remaining for r in self._requests.values())

    @property
    def open_requests(self) -> int:
        return len(self._requests)

    def wanted(self, free: int, buffered: int) -> int:
        """How many messages a new request should ask for: free slots beyond what is owed or
        already delivered and not yet taken — once that is at least half the free slots (0:
        nothing to ask yet). Topping up at every freed slot would send a request per message
        again; at half, a paced stream costs one request per half a slot-full."""
        covered = buffered + self.owed
        want = free - covered
        if covered > 0 and want * 2 < free:
            return 0
        if self.max_batch is not None:
            want = min(want, self.max_batch)
        return max(0, want)

    def issue(self, batch: int, now: float, expires: float) -> int:
        """Record a request for ``batch`` messages; returns its sequence number (its reply
        subject's last token)."""
        self._seq += 1
        self._requests[self._seq] = _Request(batch, now + expires)
        return self._seq

    def delivered(self) -> None:
        """A data message arrived: it answers the oldest request still owed something."""
        for seq, request in self._requests.items():
            if request.remaining > 0:
                request.remaining -= 1
                if request.remaining == 0:
                    del self._requests[seq]
                return

    def ended(self, seq: int) -> None:
        """The server ended request ``seq`` (expired, conflict): what it still owed is void."""
        self._requests.pop(seq, None)

    def expire(self, now: float) -> None:
        """Forget requests past their expiry plus the margin (their end was lost)."""
        for seq in [s for s, r in self._requests.items() if now > r.deadline + EXPIRY_MARGIN]:
            del self._requests[seq]

    def next_deadline(self) -> float | None:
        """When the oldest request is forgotten at the latest (a waiter re-checks then)."""
        if not self._requests:
            return None
        return min(r.deadline for r in self._requests.values()) + EXPIRY_MARGIN

    def reset(self) -> None:
        self._requests.clear()
