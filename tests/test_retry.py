"""The one retry policy: its schedule (capped exponential, equal jitter), Retry-After in both
forms, and that every retry loop of the worker takes its waits from it."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from noetl_worker import control_plane, dispatch, pipeline, retry, service
from noetl_worker.control_plane import Response
from noetl_worker.retry import Backoff, RetryPolicy, parse_retry_after

SRC = Path(__file__).resolve().parent.parent / "src" / "noetl_worker"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(1234)  # the jitter is random; the bounds below hold for every draw


def test_delay_is_equal_jitter_over_a_capped_exponential() -> None:
    policy = RetryPolicy(attempts=10, initial=0.25, cap=4.0)
    for attempt, backoff in enumerate([0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0], start=1):
        assert policy.backoff(attempt) == backoff
        draws = [policy.delay(attempt) for _ in range(500)]
        assert all(backoff / 2 <= d <= backoff for d in draws)
        # Spread over the whole upper half, not a fixed value.
        assert min(draws) < backoff * 0.55 and max(draws) > backoff * 0.95


def test_retry_after_is_a_floor_capped_by_max_retry_after() -> None:
    policy = RetryPolicy(initial=0.25, cap=4.0, max_retry_after=30.0)
    assert policy.delay(1, retry_after=7.0) == 7.0
    assert policy.delay(1, retry_after=3600.0) == 30.0
    assert 0.125 <= policy.delay(1, retry_after=0.0) <= 0.25  # a smaller ask never shortens it


def test_a_loop_failing_for_hours_keeps_its_cap() -> None:
    # Attempt numbers grow without bound in retry-until-success loops (NATS down for a day).
    policy = RetryPolicy(initial=0.25, cap=10.0)
    for attempt in (1_025, 100_000, 10**9):
        assert 5.0 <= policy.delay(attempt) <= 10.0
    backoff = Backoff(0.25, 10.0)
    backoff.failures = 50_000
    assert 5.0 <= backoff.next() <= 10.0


def test_backoff_grows_and_resets() -> None:
    backoff = Backoff(0.5, 4.0)
    waits = [backoff.next() for _ in range(6)]
    for wait, ceiling in zip(waits, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert ceiling / 2 <= wait <= ceiling
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 2.5 ", 2.5),
        ("-3", 0.0),
        (format_datetime(NOW + timedelta(seconds=45), usegmt=True), 45.0),
        ("Tue, 01 Dec 2026 12:01:30 GMT", 90.0),
        ("Tuesday, 01-Dec-26 12:00:10 GMT", 10.0),  # RFC 850, still valid in Retry-After
        ("Tue, 01 Dec 2026 11:00:00 GMT", 0.0),  # in the past: retry now
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_seconds_or_http_date(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_a_response_with_an_http_date_is_honoured() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    response = Response(503, b"", {"retry-after": when})
    assert response.retry_after is not None and 18.0 <= response.retry_after <= 20.0
    # The wait the control plane takes for it: the date, not the 0.25 s backoff.
    assert control_plane.EVENT_RETRY.delay(1, response.retry_after) >= 18.0


# retry.py itself, and a playbook's own task-retry rule (task_sequence: `backoff: exponential`
# with the playbook's delay, noetl's semantics, no jitter): a user's policy, not the worker's.
PLAYBOOK_RULES = {"retry.py", "task_sequence.py"}


def test_every_retry_loop_uses_the_one_policy() -> None:
    assert service.Backoff is retry.Backoff
    assert control_plane.RetryPolicy is retry.RetryPolicy
    assert dispatch.TERMINAL_RETRY is retry.TERMINAL_RETRY
    assert retry.CREDENTIAL_RETRY.attempts == pipeline.CREDENTIAL_RETRIES
    # No other module computes a backoff or jitter of its own.
    own = re.compile(r"random\.(uniform|random)|\* 2 \*\*|\* 2\*\*|delay \* 2|reconnect_time_wait\": [0-9]")
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if path.name not in PLAYBOOK_RULES and "testing" not in path.parts and own.search(path.read_text())
    ]
    assert offenders == []
