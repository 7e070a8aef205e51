"""Command and event routes: claim arbitration, ``/api/events``, ``/api/events/batch``."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import attrs

from ._asgi import BadRequest, Request, Response, Router
from ._common import error, json_object, optional, path_int, require_str
from ._state import StubCommand, StubState
from ._workflow import on_event

# Event types the Python server de-duplicates by (execution, type, step, command_id).
IDEMPOTENT_EVENT_TYPES = frozenset(
    {
        "call.done",
        "call.error",
        "step.exit",
        "command.started",
        "command.completed",
        "command.failed",
    }
)
_RESULT_KEYS = frozenset({"status", "reference", "context", "command_id"})
_ROW_STATUS_BY_EVENT = {
    "command.completed": "COMPLETED",
    "command.failed": "FAILED",
    "command.cancelled": "CANCELLED",
}


class ContractViolation(Exception):
    """The "reference-only" payload contract is broken: the real server answers HTTP 500."""


@attrs.frozen
class EventItem:
    execution_id: str
    name: str
    step: str | None
    payload: Any
    meta: Mapping[str, Any]
    worker_id: str | None
    actionable: bool
    informative: bool
    client_event_id: Any

    @property
    def command_id(self) -> str | None:
        if isinstance(self.payload, Mapping) and self.payload.get("command_id") is not None:
            return str(self.payload["command_id"])
        if self.meta.get("command_id") is not None:
            return str(self.meta["command_id"])
        return None


def parse_event(
    body: Mapping[str, Any],
    *,
    execution_id: str | None,
    worker_id: str | None,
    actionable_default: bool,
) -> EventItem:
    """Accept both naming styles: event_type|name, context|payload, node_name|step."""
    if not isinstance(body, Mapping):
        raise BadRequest("each event must be a JSON object")
    eid = execution_id if execution_id is not None else require_str(body, "execution_id")
    name = require_str(body, "name", "event_type")
    step = optional(body, "step", "node_name")
    payload = optional(body, "payload", "context", default={})
    meta = optional(body, "meta", default={})
    if not isinstance(meta, Mapping):
        raise BadRequest(f"field 'meta' must be an object, got {type(meta).__name__}")
    return EventItem(
        execution_id=eid,
        name=name,
        step=None if step is None else str(step),
        payload=payload,
        meta=dict(meta),
        worker_id=optional(body, "worker_id", default=worker_id),
        actionable=bool(optional(body, "actionable", default=actionable_default)),
        informative=bool(optional(body, "informative", default=True)),
        client_event_id=body.get("event_id"),
    )


def validate_payload(payload: Any) -> None:
    """The Python server's reference-only contract (violations are HTTP 500 there)."""
    if not isinstance(payload, Mapping):
        return
    if "_internal_data" in payload:
        raise ContractViolation("payload._internal_data is forbidden")
    if "result" not in payload or payload["result"] is None:
        return
    result = payload["result"]
    if not isinstance(result, Mapping):
        raise ContractViolation(f"payload.result must be an object, got {type(result).__name__}")
    extra = sorted(set(result) - _RESULT_KEYS)
    if extra:
        raise ContractViolation(f"payload.result has keys {extra}; allowed: {sorted(_RESULT_KEYS)}")
    for key in ("reference", "context"):
        if key in result and result[key] is not None and not isinstance(result[key], Mapping):
            raise ContractViolation(f"payload.result.{key} must be an object")
    if _contains_key(result.get("context"), "_internal_data"):
        raise ContractViolation("payload.result.context must not contain _internal_data")


def _contains_key(value: Any, key: str) -> bool:
    if isinstance(value, Mapping):
        return key in value or any(_contains_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_contains_key(v, key) for v in value)
    return False


def _command_body(row: StubCommand) -> dict[str, Any]:
    return {
        "execution_id": row.execution_id,
        "node_id": row.step,
        "node_name": row.step,
        "action": row.tool_kind,
        "context": row.context,
        "meta": row.meta,
    }


@attrs.define
class CommandRoutes:
    state: StubState

    def install(self, router: Router) -> None:
        router.add("POST", "/api/commands/{event_id}/claim", self.claim)
        router.add("GET", "/api/commands/{event_id}", self.get_command)
        router.add("POST", "/api/events", self.post_event)
        router.add("POST", "/api/events/batch", self.post_batch)
        router.add("GET", "/api/events/batch/{request_id}/status", self.batch_status)

    # ---------------------------------------------------------------- claim

    async def get_command(self, request: Request) -> Response:
        event_id = path_int(request, "event_id")
        row = self.state.commands.get(event_id)
        if row is None:
            return error(self.state, 404, f"command not found: {event_id}")
        return Response(200, _command_body(row))

    async def claim(self, request: Request) -> Response:
        state = self.state
        event_id = path_int(request, "event_id")
        body = json_object(request)
        worker_id = require_str(body, "worker_id")
        row = state.commands.get(event_id)
        if row is None:
            return error(state, 404, f"command not found: {event_id}")
        if state.flavor == "rust":
            return self._claim_rust(row, worker_id)
        return self._claim_python(row, worker_id, body.get("locality"))

    def _claim_rust(self, row: StubCommand, worker_id: str) -> Response:
        state = self.state
        execution = state.executions.get(row.execution_id)
        if row.terminal:
            return error(state, 409, f"Command {row.event_id} already reached terminal state")
        if execution is not None and execution.status == "CANCELLED":
            return error(state, 409, f"Execution {row.execution_id} has been cancelled")
        if row.worker_id is not None and row.worker_id != worker_id:
            return error(state, 409, f"Command {row.event_id} already claimed by {row.worker_id}")
        if row.worker_id == worker_id:
            return self._claim_ok(row)
        return self._grant(row, worker_id, None, None)

    def _claim_python(self, row: StubCommand, worker_id: str, locality: Any) -> Response:
        state = self.state
        execution = state.executions.get(row.execution_id)
        if row.terminal or (execution is not None and execution.terminal):
            return error(
                state,
                409,
                f"Command {row.event_id} already in terminal state",
                code="already_terminal",
            )
        reclaim: tuple[str, str] | None = None
        holder = row.worker_id
        if holder is not None and row.status in ("CLAIMED", "RUNNING"):
            if holder != worker_id:
                reason = self._reclaim_reason(row, holder)
                if reason is None:
                    return error(
                        state,
                        409,
                        f"Command {row.event_id} is claimed by another worker",
                        code="active_claim",
                        retry_after=state.claim_retry_after,
                        worker_id=holder,
                    )
                reclaim = (holder, reason)
            elif row.status == "CLAIMED":
                return self._claim_ok(row)
            else:
                age = time.monotonic() - (row.claimed_at or 0.0)
                if age < state.claim_hard_timeout_seconds:
                    return error(
                        state,
                        409,
                        f"Command {row.event_id} is already running on this worker",
                        code="active_claim",
                        retry_after=state.claim_retry_after,
                        worker_id=holder,
                        worker_status="running",
                    )
                reclaim = (holder, "healthy_worker_hard_timeout")
        return self._grant(row, worker_id, locality, reclaim)

    def _reclaim_reason(self, row: StubCommand, holder: str) -> str | None:
        """The Python claim policy: None keeps the claim, else the reclaim reason."""
        state = self.state
        now = time.monotonic()
        age = now - (row.claimed_at or now)
        if age < state.claim_lease_seconds:
            return None
        pool = state.pools.get(holder)
        if pool is None:
            return "lease_expired"
        if pool.status != "ready":
            return "worker_inactive"
        if now - pool.seen_at > state.heartbeat_stale_seconds:
            return "worker_heartbeat_stale"
        if age < state.claim_hard_timeout_seconds:
            return None
        return "healthy_worker_hard_timeout"

    def _grant(
        self, row: StubCommand, worker_id: str, locality: Any, reclaim: tuple[str, str] | None
    ) -> Response:
        state = self.state
        row.status = "CLAIMED"
        row.worker_id = worker_id
        row.claimed_at = time.monotonic()
        meta: dict[str, Any] = {
            "command_id": row.command_id,
            "worker_id": worker_id,
            "actionable": False,
            "informative": True,
        }
        if locality is not None:
            meta["locality"] = locality
        if reclaim is not None:
            meta.update(reclaimed=True, reclaimed_from_worker=reclaim[0], reclaimed_reason=reclaim[1])
        state._record_event(
            execution_id=str(row.execution_id),
            event_type="command.claimed",
            step=row.step,
            payload={
                "command_id": row.command_id,
                "result": {"status": "RUNNING", "context": {"command_id": row.command_id}},
            },
            meta=meta,
            worker_id=worker_id,
            actionable=False,
            informative=True,
            via="server",
        )
        return self._claim_ok(row)

    def _claim_ok(self, row: StubCommand) -> Response:
        row.claims_granted += 1
        self.state._changed()
        return Response(200, {"status": "ok", "event_id": row.event_id, **_command_body(row)})

    # ---------------------------------------------------------------- events

    async def post_event(self, request: Request) -> Response:
        body = json_object(request)
        item = parse_event(body, execution_id=None, worker_id=None, actionable_default=True)
        try:
            validate_payload(item.payload)
        except ContractViolation as exc:
            return error(self.state, 500, str(exc))
        if item.name == "command.claimed" and self.state.flavor == "python":
            return self._legacy_claim_event(item)
        event_id = self._ingest(item, via="events")
        self.state._changed()
        return Response(200, {"status": "ok", "event_id": event_id, "commands_generated": 0})

    def _legacy_claim_event(self, item: EventItem) -> Response:
        state = self.state
        row = state.find_command_by_command_id(item.command_id)
        if row is not None and row.worker_id is not None:
            if row.worker_id != item.worker_id:
                return error(state, 409, "Command already claimed by another worker")
            return Response(200, {"status": "ok", "event_id": 0, "commands_generated": 0})
        if row is not None and item.worker_id is not None:
            row.status, row.worker_id, row.claimed_at = "CLAIMED", item.worker_id, time.monotonic()
        event_id = self._ingest(item, via="events")
        state._changed()
        return Response(200, {"status": "ok", "event_id": event_id, "commands_generated": 0})

    def _ingest(self, item: EventItem, *, via: str) -> int:
        """Persist one validated event (or find its duplicate); update the command row."""
        state = self.state
        existing = self._find_duplicate(item)
        if existing is not None:
            state.duplicate_events.append(
                {
                    "event_type": item.name,
                    "step": item.step,
                    "command_id": item.command_id,
                    "client_event_id": item.client_event_id,
                    "existing_event_id": existing,
                    "via": via,
                }
            )
            return existing
        meta = dict(item.meta)
        meta.update(actionable=item.actionable, informative=item.informative)
        if item.worker_id is not None:
            meta["worker_id"] = item.worker_id
        event = state._record_event(
            execution_id=item.execution_id,
            event_type=item.name,
            step=item.step,
            payload=item.payload,
            meta=meta,
            worker_id=item.worker_id,
            actionable=item.actionable,
            informative=item.informative,
            via=via,
            client_event_id=item.client_event_id,
        )
        self._update_row(item)
        on_event(state, item.execution_id, item.name, item.step, item.payload)
        return event.event_id

    def _find_duplicate(self, item: EventItem) -> int | None:
        state = self.state
        if item.client_event_id is not None:
            found = state.find_event(("client", item.execution_id, str(item.client_event_id)))
            if found is not None:
                return found
        if item.name in IDEMPOTENT_EVENT_TYPES and item.command_id is not None:
            key = ("cmd", item.execution_id, item.name, str(item.step), item.command_id)
            return state.find_event(key)
        return None

    def _update_row(self, item: EventItem) -> None:
        row = self.state.find_command_by_command_id(item.command_id)
        if row is None or row.terminal:
            return  # a completed row never downgrades
        if item.name == "command.started":
            row.status = "RUNNING"
            if row.worker_id is None:
                row.worker_id = item.worker_id
        elif item.name in _ROW_STATUS_BY_EVENT:
            row.status = _ROW_STATUS_BY_EVENT[item.name]

    # ---------------------------------------------------------------- batch

    async def post_batch(self, request: Request) -> Response:
        state = self.state
        body = json_object(request)
        execution_id = require_str(body, "execution_id")
        raw_events = body.get("events")
        if not isinstance(raw_events, list):
            raise BadRequest("field 'events' is required and must be a list")
        if len(raw_events) > state.batch_max_events:
            return error(
                state,
                422,
                f"batch has {len(raw_events)} events; at most {state.batch_max_events} allowed",
            )
        payload_bytes = sum(
            len(json.dumps(e.get("payload", e.get("context")), separators=(",", ":")))
            for e in raw_events
            if isinstance(e, Mapping)
        )
        if payload_bytes > state.batch_max_payload_bytes:
            return error(
                state,
                422,
                f"batch payloads are {payload_bytes} bytes; at most {state.batch_max_payload_bytes} allowed",
            )
        key = request.headers.get("idempotency-key") or request.headers.get("x-idempotency-key")
        if key is not None and key in state.batches:
            earlier = state.batches[key]
            return Response(202, {**earlier["response"], "duplicate": True})
        items = [
            parse_event(
                e,
                execution_id=execution_id,
                worker_id=body.get("worker_id"),
                actionable_default=False,
            )
            for e in raw_events
        ]
        try:
            for item in items:  # all-or-nothing, like the one transaction upstream
                validate_payload(item.payload)
        except ContractViolation as exc:
            return error(state, 500, str(exc))
        event_ids = [self._ingest(item, via="batch") for item in items]
        request_id = str(state.next_id())
        state._record_event(
            execution_id=execution_id,
            event_type="batch.accepted",
            step="events.batch",
            payload={"request_id": request_id, "event_count": len(items)},
            meta={},
            worker_id=body.get("worker_id"),
            actionable=False,
            informative=True,
            via="server",
        )
        response = {
            "status": "accepted",
            "request_id": request_id,
            "event_ids": event_ids,
            "commands_generated": 0,
            "queue_depth": 0,
            "duplicate": False,
            "idempotency_key": key,
        }
        record = {"response": response, "execution_id": execution_id, "updated_at": time.time()}
        state.batches[request_id] = record
        if key is not None:
            state.batches[key] = record
        state._changed()
        return Response(202, response)

    async def batch_status(self, request: Request) -> Response:
        record = self.state.batches.get(request.params["request_id"])
        if record is None:
            return error(self.state, 404, f"batch request not found: {request.params['request_id']}")
        response = record["response"]
        return Response(
            200,
            {
                "request_id": response["request_id"],
                "execution_id": record["execution_id"],
                "state": "completed",
                "status": "COMPLETED",
                "error_code": None,
                "message": None,
                "commands_generated": 0,
                "idempotency_key": response["idempotency_key"],
                "updated_at": record["updated_at"],
            },
        )
