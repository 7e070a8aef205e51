"""What the intake asks JetStream for: free slots beyond what is owed, topped up at half."""

from __future__ import annotations

from noetl_worker.pull_credit import EXPIRY_MARGIN, PullCredit


def test_the_first_request_asks_for_every_free_slot() -> None:
    credit = PullCredit()
    assert credit.wanted(free=16, buffered=0) == 16
    credit.issue(16, now=0.0, expires=5.0)
    assert credit.owed == 16 and credit.wanted(free=16, buffered=0) == 0


def test_topped_up_only_once_half_the_free_slots_are_uncovered() -> None:
    credit = PullCredit()
    credit.issue(16, now=0.0, expires=5.0)
    for _ in range(7):
        credit.delivered()
    assert credit.wanted(free=16, buffered=0) == 0  # 9 owed: more than half covered
    credit.delivered()
    assert credit.wanted(free=16, buffered=0) == 8  # 8 owed: ask for the other 8
    assert credit.wanted(free=16, buffered=8) == 0  # delivered but not taken counts as covered


def test_deliveries_count_against_the_oldest_request() -> None:
    credit = PullCredit()
    first = credit.issue(2, now=0.0, expires=5.0)
    credit.issue(3, now=0.0, expires=5.0)
    credit.delivered()
    credit.delivered()
    assert credit.open_requests == 1 and credit.owed == 3  # the first one is complete
    credit.ended(first)  # a late status for a finished request changes nothing
    assert credit.owed == 3


def test_a_request_the_server_ended_owes_nothing() -> None:
    credit = PullCredit()
    seq = credit.issue(16, now=0.0, expires=5.0)
    credit.delivered()
    credit.ended(seq)
    assert credit.owed == 0 and credit.wanted(free=16, buffered=0) == 16


def test_a_lost_request_is_forgotten_after_its_expiry_and_the_margin() -> None:
    credit = PullCredit()
    credit.issue(16, now=0.0, expires=5.0)
    assert credit.next_deadline() == 5.0 + EXPIRY_MARGIN
    credit.expire(now=5.0 + EXPIRY_MARGIN - 0.1)
    assert credit.owed == 16
    credit.expire(now=5.0 + EXPIRY_MARGIN + 0.1)
    assert credit.owed == 0 and credit.next_deadline() is None


def test_the_consumers_batch_limit_caps_a_request() -> None:
    credit = PullCredit(max_batch=4)
    assert credit.wanted(free=16, buffered=0) == 4
