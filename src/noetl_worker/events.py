"""Event envelope and catalogue (what each server expects of them: ``dialect``).

One envelope both servers accept: the Rust worker's ``ExecutorEvent`` names (``event_type``,
``context``), which the Python server reads as aliases of its own (``name``, ``payload``). Each
value is sent once: a duplicate alias would double every body and its JSON encoding.
``context.result`` only ever holds ``status``/``reference``/``context``/``command_id`` — the
Python server answers 500 otherwise.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Final

import attrs

COMMAND_STARTED: Final = "command.started"
CALL_DONE: Final = "call.done"
CALL_ERROR: Final = "call.error"
COMMAND_COMPLETED: Final = "command.completed"
COMMAND_FAILED: Final = "command.failed"
STEP_EXIT: Final = "step.exit"

# Events the Python server's workflow engine acts on (it routes on the last actionable one of a
# batch); lifecycle bookkeeping events are not actionable.
ACTIONABLE: Final = frozenset({CALL_DONE, CALL_ERROR, STEP_EXIT})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@attrs.frozen
class Event:
    event_id: int
    execution_id: int
    event_type: str
    step: str
    status: str
    context: dict[str, Any]
    worker_id: str
    attempts: int = 0
    command_id: str | None = None
    created_at: str = attrs.field(factory=_now)
    # None: derived from the event type (ACTIONABLE); a dialect may decide otherwise.
    actionable: bool | None = None
    extra_meta: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def is_actionable(self) -> bool:
        return self.event_type in ACTIONABLE if self.actionable is None else self.actionable

    def to_json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"attempts": self.attempts, "worker_id": self.worker_id}
        if self.command_id is not None:
            meta["command_id"] = self.command_id
        meta.update(self.extra_meta)
        return {
            "event_id": self.event_id,
            "execution_id": self.execution_id,
            "event_type": self.event_type,
            "step": self.step,
            "status": self.status,
            "created_at": self.created_at,
            "context": self.context,
            "worker_id": self.worker_id,
            "meta": meta,
            "actionable": self.is_actionable,
            "informative": True,
        }

    def to_batch_item(self) -> dict[str, Any]:
        """An item of ``POST /api/events/batch`` (the batch carries execution_id/worker_id)."""
        item = self.to_json()
        for key in ("execution_id", "worker_id"):
            item.pop(key)
        return item


@attrs.define(eq=False)
class EventFactory:
    """Builds one command's events; ids come from the process-wide snowflake generator."""

    next_id: Any  # Callable[[], int]
    execution_id: int
    step: str
    command_id: str
    worker_id: str
    attempts: int = 0

    def make(
        self,
        event_type: str,
        status: str,
        context: dict[str, Any],
        *,
        actionable: bool | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Event:
        """Any event of this command (the dialects shape theirs with it)."""
        return attrs.evolve(
            self._make(event_type, status, context), actionable=actionable, extra_meta=dict(meta or {})
        )

    def _make(self, event_type: str, status: str, context: dict[str, Any]) -> Event:
        return Event(
            event_id=self.next_id(),
            execution_id=self.execution_id,
            event_type=event_type,
            step=self.step,
            status=status,
            context=context,
            worker_id=self.worker_id,
            attempts=self.attempts,
            command_id=self.command_id,
        )

    def started(self) -> Event:
        return self._make(
            COMMAND_STARTED, "STARTED", {"command_id": self.command_id, "worker_id": self.worker_id}
        )

    def call_done(self, result: dict[str, Any]) -> Event:
        return self._make(
            CALL_DONE,
            "COMPLETED",
            {"command_id": self.command_id, "call_index": 0, "result": result},
        )

    def call_error(self, error: str) -> Event:
        return self._make(
            CALL_ERROR,
            "FAILED",
            {
                "command_id": self.command_id,
                "call_index": 0,
                "error": error,
                "result": {"status": "FAILED", "command_id": self.command_id},
            },
        )

    def completed(self, tool_status: str, warnings: tuple[str, ...] = ()) -> Event:
        context: dict[str, Any] = {
            "command_id": self.command_id,
            "status": tool_status,
            "result": {"status": tool_status, "command_id": self.command_id},
        }
        if warnings:
            context["warnings"] = list(warnings)
        return self._make(COMMAND_COMPLETED, tool_status, context)

    def failed(self, error: str, warnings: tuple[str, ...] = ()) -> Event:
        context: dict[str, Any] = {
            "command_id": self.command_id,
            "error": error,
            "result": {"status": "FAILED", "command_id": self.command_id},
        }
        if warnings:
            context["warnings"] = list(warnings)
        return self._make(COMMAND_FAILED, "FAILED", context)

    def step_exit(self, status: str, data: Any) -> Event:
        return self._make(STEP_EXIT, status, {"status": status, "data": data, "command_id": self.command_id})
