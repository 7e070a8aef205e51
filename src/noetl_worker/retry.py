"""The one retry/backoff policy of the worker: HTTP retries, reconnect loops, restarts.

Every wait the worker takes before trying again comes from a :class:`RetryPolicy`:

- retry ``n`` (1-based) waits a *capped exponential* ``b = min(cap, initial * 2**(n-1))``
  with **equal jitter**: a uniformly random point of ``[b/2, b]``. Half the delay is kept so a
  retry never comes back almost at once; the random half spreads workers that failed together
  (a server restart) so they do not return in step. (Not "full jitter", ``[0, b]``, which can
  retry immediately.)
- a server's ``Retry-After`` (seconds, or an HTTP date) is a floor: the wait is the larger of
  it and the backoff, capped by ``max_retry_after`` so a hostile or broken server cannot park
  a worker for hours.

:class:`Backoff` is the same schedule for loops that retry until they succeed (connect,
register, supervised restarts): ``next()`` gives the following wait, ``reset()`` starts over
after a success.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

import attrs


@attrs.frozen
class RetryPolicy:
    """How often to try and how long to wait in between (see the module docstring)."""

    attempts: int = 4  # tries in all, the first included
    initial: float = 0.25
    cap: float = 5.0
    max_retry_after: float = 30.0

    def backoff(self, attempt: int) -> float:
        """The capped exponential before jitter, for retry number ``attempt`` (1-based)."""
        # The exponent is bounded: a loop that has failed for hours (attempt in the thousands)
        # must not overflow a float; 2**62 is past any cap.
        return float(min(self.cap, self.initial * 2.0 ** min(max(0, attempt - 1), 62)))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before retry number ``attempt`` (1-based): equal jitter over the backoff,
        raised to ``retry_after`` when the server asked for longer (capped)."""
        backoff = self.backoff(attempt)
        jittered = backoff / 2 + random.uniform(0, backoff / 2)
        if retry_after is not None:
            return float(min(max(retry_after, jittered), self.max_retry_after))
        return jittered


class Backoff:
    """A policy's schedule as state, for loops that retry until they succeed."""

    def __init__(self, initial: float = 0.25, cap: float = 10.0) -> None:
        self.policy = RetryPolicy(attempts=0, initial=initial, cap=cap)
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return self.policy.delay(self.failures)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3); None if
    absent or unreadable. A date in the past means "now" (0)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


# Named policies (one place to read every retry budget the worker has).
CLAIM_RETRY: Final = RetryPolicy(attempts=3, initial=0.2, cap=2.0, max_retry_after=2.0)
EVENT_RETRY: Final = RetryPolicy(attempts=8, initial=0.25, cap=8.0)
ONCE: Final = RetryPolicy(attempts=1)
# Terminal events: until TERMINAL_PATIENCE (dispatch.py) runs out, however many tries that is.
TERMINAL_RETRY: Final = RetryPolicy(attempts=1_000_000, initial=0.25, cap=10.0)
# Server reads/writes behind tools (result store, playbook status polls).
SERVER_CALL_RETRY: Final = RetryPolicy(attempts=3)
# Credential lookups before a command runs (pipeline.py).
CREDENTIAL_RETRY: Final = RetryPolicy(attempts=3, initial=1.0, cap=4.0)
# The playbook tool's calls: retried until its own timeout (attempts unbounded there).
PLAYBOOK_RETRY: Final = RetryPolicy(attempts=1_000_000, initial=0.5, cap=10.0, max_retry_after=10.0)
# nats-py's fixed per-server wait between tries of one reconnect round (its reconnect hook in
# bus.py takes each round's delay from a RetryPolicy): the policy's first step.
NATS_RECONNECT_WAIT: Final = 0.5
