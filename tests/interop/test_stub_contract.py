"""The stub's Python flavour must store what the real NoETL 4.12.1 server stores.

The same few small workflows run twice with our worker: once on the stub
(``noetl_worker.testing``, python flavour, which routes small workflows itself) and once on the
real server (the interop stack ``ours``). What each side stored is compared: every step's stored
result, the terminal event of the execution, and the event types the worker's reports left per
step. The fast tests use the stub; this keeps them from drifting away from the real server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import attrs
import pytest
import trio
import yaml

from noetl_worker.config import Settings
from noetl_worker.testing import (
    NatsServer,
    StubCommand,
    StubState,
    open_publisher,
    open_stub_server,
    open_worker,
)

from .harness import Run, Stack

try:  # the stub's workflow engine (python flavour)
    from noetl_worker.testing import Arc, WorkflowStep
except ImportError as exc:  # pragma: no cover - only before the stub learned to run workflows
    _MISSING: str | None = f"noetl_worker.testing has no workflow support (Arc, WorkflowStep): {exc}"
else:
    _MISSING = None

# what the worker reports (the servers add command.issued / command.claimed themselves)
WORKER_EVENTS = frozenset(
    {
        "command.started",
        "step.enter",
        "call.done",
        "call.error",
        "step.exit",
        "command.completed",
        "command.failed",
    }
)
# timings differ between two runs of the same step
_TIMING_KEYS = frozenset({"duration_ms", "elapsed", "duration", "duration_seconds"})


@attrs.frozen
class Step:
    name: str
    kind: str
    config: dict[str, Any]
    # (target, event name or None for an arc without `when`)
    next: tuple[tuple[str, str | None], ...] = ()


@attrs.frozen
class Scenario:
    name: str
    steps: tuple[Step, ...]
    workload: dict[str, Any] = attrs.field(factory=dict)

    def playbook(self) -> str:
        workflow: list[dict[str, Any]] = []
        for step in self.steps:
            entry: dict[str, Any] = {"step": step.name, "tool": {"kind": step.kind, **step.config}}
            if step.next:
                arcs = []
                for target, on in step.next:
                    arc: dict[str, Any] = {"step": target}
                    if on is not None:
                        arc["when"] = "{{ event.name == '" + on + "' }}"
                    arcs.append(arc)
                entry["next"] = {"arcs": arcs}
            workflow.append(entry)
        doc = {
            "apiVersion": "noetl.io/v2",
            "kind": "Playbook",
            "metadata": {"name": f"contract_{self.name}", "path": f"interop/contract_{self.name}"},
            "workload": self.workload,
            "workflow": workflow,
        }
        return yaml.safe_dump(doc, sort_keys=False)

    def stub_steps(self) -> list[Any]:
        return [
            WorkflowStep(s.name, s.kind, s.config, next=tuple(Arc(t, on=on) for t, on in s.next))
            for s in self.steps
        ]


SCENARIOS = (
    Scenario(
        "values",
        (
            Step(
                "start",
                "python",
                {"code": "def main():\n    return {'greeting': 'hi', 'n': 2, 'items': [1], 'd': {'k': 1}}\n"},
                next=(("echo", None),),
            ),
            Step(
                "echo", "shell", {"cmds": ["echo {{ start.greeting }}-{{ start.n }}"]}, next=(("end", None),)
            ),
            Step("end", "noop", {}),
        ),
    ),
    Scenario(
        "routed_error",
        (
            Step(
                "start",
                "shell",
                {"cmds": ["echo out; exit 7"]},
                next=(("handler", "call.error"), ("never", "call.done")),
            ),
            Step("handler", "python", {"code": "def main():\n    return {'handled': True}\n"}),
            Step("never", "noop", {}),
        ),
    ),
    Scenario(
        "failing_last_step",
        (
            Step("start", "python", {"code": "def main():\n    return {'ok': 1}\n"}, next=(("last", None),)),
            Step("last", "python", {"code": "def main():\n    raise ValueError('last step fails')\n"}),
        ),
    ),
)


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items() if k not in _TIMING_KEYS}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def real_stored(run: Run, steps: Iterable[str]) -> dict[str, Any]:
    """Per step, the result the real server stored (its ``context`` copy left out)."""
    out: dict[str, Any] = {}
    for step in steps:
        if step in run.variables:
            value = run.variables[step]
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "context"}
            out[step] = _normalise(value)
    return out


def real_worker_events(run: Run, steps: Iterable[str]) -> dict[str, list[str]]:
    types = run.step_types()
    return {s: sorted(set(types.get(s, [])) & WORKER_EVENTS) for s in steps}


@attrs.define
class StubRun:
    state: StubState
    execution_id: int

    def stored(self, steps: Iterable[str], only: Iterable[str]) -> dict[str, Any]:
        results = self.state.step_results.get(self.execution_id, {})
        keep = set(only)
        return {s: _normalise(results[s]) for s in steps if s in results and s in keep}

    def worker_events(self, steps: Iterable[str]) -> dict[str, list[str]]:
        out: dict[str, set[str]] = {s: set() for s in steps}
        for e in self.state.events:
            if e.execution_id == str(self.execution_id) and e.step in out:
                out[e.step].add(e.event_type)
        return {s: sorted(v & WORKER_EVENTS) for s, v in out.items()}

    @property
    def terminal(self) -> str | None:
        terminal: str | None = self.state.playbook_terminal(self.execution_id)
        return terminal


async def run_on_stub(scenario: Scenario, nats: NatsServer) -> StubRun:
    state = StubState(flavor="python")
    send, receive = trio.open_memory_channel[StubCommand](64)
    state.on_issue = send.send_nowait  # type: ignore[attr-defined]
    async with open_stub_server(state) as stub, open_publisher(nats.url) as publisher:
        settings = Settings.from_env(
            {
                "NATS_URL": nats.url,
                "NOETL_SERVER_URL": stub.url,
                "WORKER_METRICS_BIND": "127.0.0.1:0",
                "NOETL_LOG_FORMAT": "text",
                "WORKER_MAX_CONCURRENT": "4",
            }
        )
        async with open_worker(settings), trio.open_nursery() as nursery:

            async def publish_issued() -> None:
                async for command in receive:
                    await publisher.publish_command(command.notification(stub.url))

            nursery.start_soon(publish_issued)
            row = state.run_workflow(
                scenario.stub_steps(), workload=scenario.workload, path=f"interop/contract_{scenario.name}"
            )
            await state.wait_for(lambda: state.playbook_terminal(row.execution_id) is not None, timeout=60)
            nursery.cancel_scope.cancel()
        return StubRun(state=state, execution_id=row.execution_id)


@pytest.fixture
async def contract_nats() -> AsyncIterator[NatsServer]:
    from noetl_worker.testing import open_nats_server

    async with open_nats_server() as server:
        yield server


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_stub_stores_what_the_real_server_stores(
    scenario: Scenario, interop_stacks: dict[str, Stack], contract_nats: NatsServer
) -> None:
    if _MISSING:
        pytest.fail(_MISSING, pytrace=False)
    real_stack = interop_stacks["ours"]
    with trio.fail_after(240):
        real = await trio.to_thread.run_sync(
            lambda: real_stack.run(scenario.playbook(), scenario.workload, timeout=90, worker="ours")
        )
        stub = await run_on_stub(scenario, contract_nats)
    steps = [s.name for s in scenario.steps]
    assert real.terminal is not None, f"the real server wrote no terminal event: {real.summary()}"
    assert stub.terminal == real.terminal, f"terminal: stub {stub.terminal}, real {real.terminal}"
    real_results = real_stored(real, steps)
    assert stub.stored(steps, real_results) == real_results
    # a step the real server stored nothing for (a failed one) must not get a result in the stub
    for step in steps:
        if step not in real.variables and real.count("call.error", step):
            assert step not in stub.state.step_results.get(stub.execution_id, {})
    assert stub.worker_events(steps) == real_worker_events(real, steps)
