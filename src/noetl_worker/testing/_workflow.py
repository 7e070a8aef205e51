"""What the stub's server does with the events it accepts: store step results, route, end.

The real servers differ (docs/compatibility.md), and the stub follows its flavour:

- **python** (noetl 4.12.1): ``call.done`` stores the step result — the payload's ``response``,
  or the data behind ``result.reference.ref`` — and routes; ``call.error`` routes too (arcs may
  match on the event name) but stores nothing; ``call.error`` or ``command.failed`` marks the
  execution failed, and a handled error does not rescue it.
- **rust**: ``call.done`` stores the first of ``result.context.data``, ``data``, the payload;
  routing happens on ``command.completed``; only ``command.failed`` fails the execution, and
  there is no routing on errors.

Routing needs a workflow: :meth:`StubState.run_workflow` gives an execution small steps with
arcs. Without one, commands are the test's own and only results and the failure are recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ._state import StubState


@attrs.frozen
class Arc:
    """An arc of ``next``: ``on`` is the event name it needs (None: any, like an arc without
    ``when``)."""

    step: str
    on: str | None = None


@attrs.frozen
class WorkflowStep:
    name: str
    tool_kind: str
    tool_config: Mapping[str, Any] = attrs.field(factory=dict)
    input: Mapping[str, Any] = attrs.field(factory=dict)
    next: tuple[Arc, ...] = ()


@attrs.define
class Workflow:
    steps: dict[str, WorkflowStep]
    workload: dict[str, Any]
    finished: bool = False


def _response_value(state: StubState, payload: Mapping[str, Any]) -> Any:
    if "response" in payload:
        return payload["response"]
    result = payload.get("result")
    if isinstance(result, Mapping):
        reference = result.get("reference")
        if isinstance(reference, Mapping):
            ref = reference.get("locator") or reference.get("ref")
            stored = state.results.get(str(ref))
            if stored is not None:
                return stored.data
        return dict(result)
    return dict(payload)


def _rust_value(payload: Mapping[str, Any]) -> Any:
    result = payload.get("result")
    if isinstance(result, Mapping):
        context = result.get("context")
        if isinstance(context, Mapping) and "data" in context:
            return context["data"]
    if "data" in payload:
        return payload["data"]
    return dict(payload)


def on_event(state: StubState, execution_id: str, name: str, step: str | None, payload: Any) -> None:
    """Apply one accepted worker event to its execution (after the command row is updated)."""
    try:
        eid = int(execution_id)
    except ValueError:
        return
    row = state.executions.get(eid)
    if row is None or step is None or not isinstance(payload, Mapping):
        return
    results = state.step_results.setdefault(eid, {})
    python = state.flavor == "python"
    if name == "call.done":
        results[step] = _response_value(state, payload) if python else _rust_value(payload)
    fails = ("call.error", "command.failed") if python else ("command.failed",)
    if name in fails and row.failure is None:
        error = payload.get("error")
        row.failure = str(error) if error else name
        row.failed_step = step
    if name == "step.exit" and python and payload.get("status") == "FAILED" and row.failure is None:
        row.failure = str(payload.get("error") or "step.exit FAILED")
        row.failed_step = step
    workflow = state.workflows.get(eid)
    if workflow is None or workflow.finished:
        return
    routes_on = ("call.done", "call.error") if python else ("command.completed",)
    if name in routes_on:
        _route(state, eid, workflow, step, "call.done" if name == "command.completed" else name)
    if not any(not c.terminal for c in state.commands.values() if c.execution_id == eid):
        _finish(state, eid, workflow, step)


def _route(state: StubState, eid: int, workflow: Workflow, step: str, event_name: str) -> None:
    current = workflow.steps.get(step)
    if current is None:
        return
    if state.flavor == "rust" and event_name != "call.done":
        return
    for arc in current.next:  # exclusive mode: the first arc that matches
        if arc.on is None or arc.on == event_name:
            state._issue_workflow_step(eid, workflow, workflow.steps[arc.step], event_name)
            return


def _finish(state: StubState, eid: int, workflow: Workflow, step: str) -> None:
    import time

    row = state.executions[eid]
    workflow.finished = True
    failed = row.failure is not None
    row.status = "FAILED" if failed else "COMPLETED"
    row.current_step = step
    row.result = state.step_results.get(eid, {}).get(step)
    row.end_time = time.time()
    outcome = "failed" if failed else "completed"
    for event_type, event_step in ((f"workflow.{outcome}", "workflow"), (f"playbook.{outcome}", row.path)):
        state._record_event(
            execution_id=str(eid),
            event_type=event_type,
            step=event_step,
            payload={"status": outcome.upper(), "final_step": step, "error": row.failure},
            meta={},
            worker_id=None,
            actionable=False,
            informative=True,
            via="server",
        )
