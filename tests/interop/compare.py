"""How a run with our worker is compared with a run of the same playbook with noetl's own worker.

Three things must agree (the issue's "same outcome, same per-step event types, same stored result
fields"): the terminal event, the set of event types the server stored per workflow step, and the
top-level fields of each step's stored result. Bookkeeping rows the server writes for itself
(``events.batch``, ``workflow``, the playbook's own path) are not compared.
"""

from __future__ import annotations

from typing import Any

import attrs

from .harness import Run

# step names of server-side rows, not workflow steps
_SERVER_ROWS = ("events.batch", "workflow")
# fields the server adds to a stored step result itself
_SERVER_FIELDS = frozenset({"context"})


@attrs.frozen
class Diff:
    outcome: tuple[str | None, str | None] | None
    events: dict[str, tuple[list[str], list[str]]]
    fields: dict[str, tuple[list[str], list[str]]]

    @property
    def same(self) -> bool:
        return self.outcome is None and not self.events and not self.fields

    def describe(self) -> str:
        if self.same:
            return "same"
        parts: list[str] = []
        if self.outcome is not None:
            parts.append(f"outcome noetl={self.outcome[0]} ours={self.outcome[1]}")
        for step, (ref, got) in self.events.items():
            missing = sorted(set(ref) - set(got))
            extra = sorted(set(got) - set(ref))
            parts.append(f"events[{step}] missing={missing} extra={extra}")
        for step, (ref, got) in self.fields.items():
            missing = sorted(set(ref) - set(got))
            extra = sorted(set(got) - set(ref))
            parts.append(f"fields[{step}] missing={missing} extra={extra}")
        return "; ".join(parts)


def workflow_steps(run: Run) -> dict[str, list[str]]:
    return {
        step: types
        for step, types in run.step_types().items()
        if step not in _SERVER_ROWS and step != run.path and step
    }


def result_fields(run: Run) -> dict[str, list[str]]:
    """Per step that stored a result, its top-level field names."""
    out: dict[str, list[str]] = {}
    for step in workflow_steps(run):
        value: Any
        try:
            value = run.result(step)
        except KeyError:
            continue
        if isinstance(value, dict):
            out[step] = sorted(k for k in value if k not in _SERVER_FIELDS)
        else:
            out[step] = [f"<{type(value).__name__}>"]
    return out


def compare(reference: Run, ours: Run) -> Diff:
    outcome = None if reference.terminal == ours.terminal else (reference.terminal, ours.terminal)
    ref_steps, our_steps = workflow_steps(reference), workflow_steps(ours)
    events = {
        step: (ref_steps.get(step, []), our_steps.get(step, []))
        for step in sorted(set(ref_steps) | set(our_steps))
        if ref_steps.get(step, []) != our_steps.get(step, [])
    }
    ref_fields, our_fields = result_fields(reference), result_fields(ours)
    fields = {
        step: (ref_fields.get(step, []), our_fields.get(step, []))
        for step in sorted(set(ref_fields) | set(our_fields))
        if ref_fields.get(step, []) != our_fields.get(step, [])
    }
    return Diff(outcome=outcome, events=events, fields=fields)
