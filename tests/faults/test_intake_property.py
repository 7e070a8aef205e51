"""Property: no sequence of messages, good or bad, with failures injected at every stage, stops
the intake or keeps an execution slot. Afterwards every slot is free again (WORKER_MAX_CONCURRENT
commands start at once) and the worker still runs new work.

Pattern: a sync ``@given`` test that runs the whole tree in ``trio.run`` with a fresh MockClock
per example, against in-memory fakes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noetl_worker import tools
from noetl_worker.control_plane import (
    AlreadyClaimed,
    Claimed,
    InvalidAnswer,
    NotFound,
    Rejected,
    RetryLater,
)
from noetl_worker.errors import BusError, TransportError
from noetl_worker.tools.base import ToolContext, ToolResult

from ..conftest import fuzz_examples
from ..fakes import FakeBus
from .support import FaultyMessage, ScriptedPlane, notification, start_tree, wait_until
from .support import settings as worker_settings


async def _boom(config: Any, ctx: ToolContext) -> ToolResult:
    raise RuntimeError("a tool with a bug")


async def _nap(config: Any, ctx: ToolContext) -> ToolResult:
    await trio.sleep(float(config.get("seconds", 10)))
    return ToolResult("success")


tools.register("test_boom", _boom)
tools.register("test_nap", _nap)

BAD_BYTES = {
    "garbage": None,  # filled from hypothesis
    "unicode_id": notification("²"),
    "huge_id": notification("9" * 5000),
    "huge_json_number": b'{"execution_id": 1, "event_id": '
    + b"9" * 5000
    + b', "command_id": "c", "step": "s"}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep_field": notification(1)[:-1] + b', "t": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "file_url": notification(1, server_url="file:///etc/passwd"),
    "broken_url": notification(1, server_url="http://[::1"),
    "not_object": b"[1, 2, 3]",
}
CLAIM_FAULTS = (
    "ok",
    "tool_raises",
    "claim_raises",
    "claim_transport",
    "claim_invalid",
    "claim_weird_values",
    "conflict_terminal",
    "conflict_held",
    "retry_later",
    "rejected",
    "not_found",
    "foreign_server",
)
SETTLE_FAULTS = (None, "bus", "bug")

steps = st.lists(
    st.tuples(
        st.sampled_from(sorted(BAD_BYTES) + list(CLAIM_FAULTS)),
        st.sampled_from(SETTLE_FAULTS),
        st.binary(max_size=64),
    ),
    min_size=1,
    max_size=25,
)


def _script(kind: str) -> Any:
    async def raises_bug() -> Any:
        raise RuntimeError("the claim path has a bug")

    async def raises_transport() -> Any:
        raise TransportError("connection reset")

    def answer(outcome: Any) -> Any:
        async def script() -> Any:
            return outcome

        return script

    weird = {"execution_id": float("inf"), "action": "noop", "meta": {"attempts": float("-inf")}}
    return {
        "claim_raises": raises_bug,
        "claim_transport": raises_transport,
        "claim_invalid": answer(InvalidAnswer("claim answer is not JSON")),
        "claim_weird_values": answer(Claimed(weird)),
        "conflict_terminal": answer(AlreadyClaimed("already_terminal", "done")),
        "conflict_held": answer(AlreadyClaimed("active_claim", "held", "w-other", 2.0)),
        "retry_later": answer(RetryLater("HTTP 503", 1.0)),
        "rejected": answer(Rejected(422, "no")),
        "not_found": answer(NotFound("gone")),
    }.get(kind)


async def _run_example(plan: list[tuple[str, str | None, bytes]], slots: int) -> None:
    bus, plane = FakeBus(), ScriptedPlane()
    s = worker_settings(WORKER_MAX_CONCURRENT=str(slots))
    messages: list[FaultyMessage] = []
    expect_poison = expect_refused = 0
    async with trio.open_nursery() as nursery:
        state, rt = await start_tree(nursery, s, bus, plane)
        for index, (kind, settle_fault, garbage) in enumerate(plan):
            event_id = 100 + index
            if kind in BAD_BYTES:
                data = BAD_BYTES[kind] or garbage
                expect_poison += 1
            elif kind == "foreign_server":
                data = notification(event_id, server_url="http://collector.example:9999")
                expect_refused += 1
            else:
                tool = "test_boom" if kind == "tool_raises" else "noop"
                data = json.dumps(plane.add(event_id, tool, {})).encode()
                script = _script(kind)
                if script is not None:
                    plane.scripts[event_id] = script
            fail: BaseException | None = {None: None, "bus": BusError("nats down"), "bug": KeyError("bug")}[
                settle_fault
            ]
            msg = FaultyMessage(data, fail=fail)
            messages.append(msg)
            bus.send.send_nowait(msg)

        with trio.fail_after(900):  # virtual seconds
            await wait_until(lambda: all(m.handled for m in messages))
            await wait_until(lambda: not rt.running and rt.slots.borrowed_tokens <= 1)

        metrics = rt.metrics
        assert metrics.poison._value.get() >= expect_poison
        assert metrics.server_url_rejected._value.get() == expect_refused
        assert all(event.command_id != "cmd-foreign" for event in plane.events)

        # Every slot is free: `slots` commands of 10 s all run at once.
        began = trio.current_time()
        ids = [10_000 + i for i in range(slots)]
        for event_id in ids:
            bus.publish(plane.add(event_id, "test_nap", {"seconds": 10}))
        with trio.fail_after(60):
            await plane.wait_terminal(*(f"cmd-{i}" for i in ids))
        assert trio.current_time() - began == pytest.approx(10, abs=0.5)
        assert state.readiness()[0], state.readiness()
        state.stop.set()


@settings(
    max_examples=fuzz_examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=steps, slots=st.integers(min_value=1, max_value=4))
def test_free_slots_always_return_to_the_maximum(
    plan: list[tuple[str, str | None, bytes]], slots: int
) -> None:
    trio.run(_run_example, plan, slots, clock=trio.testing.MockClock(autojump_threshold=0))


def test_one_poison_message_used_to_take_the_only_slot_for_good() -> None:
    """The issue's reproduction, as a fixed example: WORKER_MAX_CONCURRENT=1, one message with
    event_id "²", then real work."""
    trio.run(
        _run_example,
        [("unicode_id", None, b""), ("deep", None, b""), ("ok", None, b"")],
        1,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
