"""Virtual time, fakes: /readyz notices a stalled intake; tool_kind label values stay bounded;
a held claim is asked again with a growing delay, a terminal one acked at once."""

from __future__ import annotations

import pytest
import trio

from noetl_worker.control_plane import AlreadyClaimed
from noetl_worker.dispatch import HELD_CLAIM_MAX_DELIVERIES, held_claim_settle

from ..fakes import FakeBus
from .support import ScriptedPlane, settings, start_tree


async def test_readyz_turns_not_ready_when_slots_are_held_by_nothing(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), ScriptedPlane()
    async with trio.open_nursery() as nursery:
        state, rt = await start_tree(nursery, settings(WORKER_MAX_CONCURRENT="1"), bus, plane)
        await trio.sleep(1)
        assert state.readiness() == (True, "ready")
        # A slot lost to a bug: nothing runs, yet the intake can never take a message again.
        leaked = object()
        bus.publish(plane.add(1, "noop", {}))
        await plane.wait_terminal("cmd-1")
        await rt.slots.acquire_on_behalf_of(leaked)  # got when the intake's idle fetch returns
        await trio.sleep(state.intake_stall_bound + 10)
        ready, reason = state.readiness()
        assert not ready and "intake has not run" in reason
        rt.slots.release_on_behalf_of(leaked)
        await trio.sleep(6)
        assert state.readiness() == (True, "ready")
        state.stop.set()


async def test_a_busy_worker_stays_ready(autojump_clock: trio.abc.Clock) -> None:
    """All slots busy with running commands is back-pressure, not a stall."""
    from noetl_worker import tools
    from noetl_worker.tools.base import ToolResult

    async def long(config: object, ctx: object) -> ToolResult:
        await trio.sleep(600)
        return ToolResult("success")

    tools.register("test_long", long)
    bus, plane = FakeBus(), ScriptedPlane()
    async with trio.open_nursery() as nursery:
        state, _ = await start_tree(
            nursery,
            settings(WORKER_MAX_CONCURRENT="1", NOETL_WORKER_COMMAND_TIMEOUT_SECONDS="900"),
            bus,
            plane,
        )
        bus.publish(plane.add(1, "test_long", {}))
        await trio.sleep(300)
        assert state.readiness() == (True, "ready")
        state.stop.set()


async def test_tool_kind_labels_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    bus, plane = FakeBus(), ScriptedPlane()
    async with trio.open_nursery() as nursery:
        state, rt = await start_tree(nursery, settings(WORKER_MAX_CONCURRENT="4"), bus, plane)
        for i in range(1, 21):
            bus.publish(plane.add(i, f"made-up-kind-{i}", {}))
        await plane.wait_terminal(*(f"cmd-{i}" for i in range(1, 21)))
        registry = rt.metrics.registry
        assert registry.get_sample_value("noetl_worker_dispatch_errors_total", {"tool_kind": "unknown"}) == 20
        kinds = {
            sample.labels["tool_kind"]
            for metric in registry.collect()
            for sample in metric.samples
            if "tool_kind" in sample.labels
        }
        assert kinds == {"unknown"}
        state.stop.set()


def test_held_claims_are_asked_again_with_a_growing_delay_and_terminal_ones_acked() -> None:
    held = AlreadyClaimed("active_claim", "held", "w-gone", 2.0)
    delays = [held_claim_settle(held, n) for n in range(1, 8)]
    assert [d[0] for d in delays] == ["nak"] * 7
    assert [d[1] for d in delays] == [2, 4, 8, 16, 30, 30, 30]
    assert held_claim_settle(held, HELD_CLAIM_MAX_DELIVERIES) == ("ack", 0.0)
    assert held_claim_settle(AlreadyClaimed("already_terminal", "done"), 1) == ("ack", 0.0)
    assert held_claim_settle(AlreadyClaimed("execution_cancelled", "x"), 1) == ("ack", 0.0)
    assert held_claim_settle(AlreadyClaimed("active_claim", "", None, 25.0), 1) == ("nak", pytest.approx(25))
