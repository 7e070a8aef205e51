"""The stub control plane's in-memory state, and the helpers tests drive it with.

Everything the HTTP handlers change goes through ``StubState._changed()``, which wakes every
``wait_for`` waiter, so tests wait on conditions instead of sleeping.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import attrs
import trio

from ._workflow import Workflow, WorkflowStep

Flavor = Literal["python", "rust"]
Sealer = Callable[[str, bytes], dict[str, Any]]

TERMINAL_COMMAND_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})

# Large, snowflake-sized ids on purpose: they exceed 2**53, so a client that round-trips them
# through a float (or a JavaScript-style JSON parser) is caught by the tests.
_ID_BASE = 614_025_361_772_412_928


@attrs.define
class StubCommand:
    """One command row (``noetl.command``) plus the ids of its ``command.issued`` event."""

    event_id: int
    execution_id: int
    command_id: int | str
    step: str
    tool_kind: str
    context: dict[str, Any]
    meta: dict[str, Any]
    server_url: str | None = None
    status: str = "PENDING"
    worker_id: str | None = None
    claimed_at: float | None = None
    claims_granted: int = 0

    def notification(self, server_url: str | None = None) -> dict[str, Any]:
        """The NATS notification the server would publish for this command."""
        url = server_url if server_url is not None else self.server_url
        if url is None:
            raise ValueError("server_url is unknown: serve the stub first or pass server_url")
        return {
            "execution_id": self.execution_id,
            "event_id": self.event_id,
            "command_id": self.command_id,
            "step": self.step,
            "server_url": url,
        }

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_COMMAND_STATUSES


@attrs.frozen
class StubEvent:
    """One persisted event (from /api/events, /api/events/batch, or written by the server)."""

    event_id: int
    execution_id: str
    event_type: str
    step: str | None
    payload: Any
    meta: Mapping[str, Any]
    worker_id: str | None
    actionable: bool
    informative: bool
    status: str
    command_id: str | None
    client_event_id: Any = None
    via: str = "events"
    received_at: float = attrs.field(factory=time.monotonic)


@attrs.define
class PoolRow:
    """A ``noetl.runtime`` row of kind worker_pool (or any other kind registered)."""

    runtime_id: int
    name: str
    kind: str
    runtime: dict[str, Any]
    status: str
    uri: str | None
    capacity: int | None
    labels: dict[str, Any]
    hostname: str | None
    pid: int | None
    meta: dict[str, Any]
    created_at: float
    updated_at: float
    heartbeat_at: float  # wall clock, for the JSON answers
    seen_at: float  # monotonic, for the reclaim policy's staleness check


@attrs.define
class ExecutionRow:
    execution_id: int
    path: str | None = None
    catalog_id: str | None = None
    version: Any = None
    payload: Any = None
    parent_execution_id: str | None = None
    status: str = "RUNNING"  # RUNNING | COMPLETED | FAILED | CANCELLED
    current_step: str | None = None
    result: Any = None
    polls: int = 0
    start_time: float = attrs.field(factory=time.time)
    end_time: float | None = None
    # The first failure the server saw (call.error / command.failed, per flavour): sticky, as a
    # handled error does not rescue the execution on the real server.
    failure: str | None = None
    failed_step: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status != "RUNNING"


@attrs.define
class StoredResult:
    ref: str
    execution_id: str
    name: str
    data: Any
    store: str
    scope: str
    expires_at: str | None
    bytes: int
    sha256: str
    source_step: str | None = None
    correlation: Any = None
    extracted: Any = None


@attrs.define
class Fault:
    """An injected answer for the next ``remaining`` requests matching method + path regex."""

    method: str
    path_regex: re.Pattern[str]
    status: int | None
    remaining: int
    retry_after: float | None = None
    delay: float = 0.0
    body: Any = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        return self.method in ("*", method) and self.path_regex.search(path) is not None


@attrs.define
class RecordedRequest:
    """One request the stub received; ``status`` is filled in once it has been answered."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: Any
    received_at: float
    status: int | None = None


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=False).encode()


@attrs.define(kw_only=True)
class StubState:
    """In-memory control plane. Construct freely; all knobs are keyword arguments.

    ``flavor`` selects the error bodies and claim rules of the Python (FastAPI) or the Rust
    server. ``externalize_over`` (bytes) makes command context fields larger than that arrive
    as ``result_ref`` envelopes, as the real Python server does above 8 KiB.
    """

    flavor: Flavor = attrs.field(default="python")
    externalize_over: int | None = None
    sealer: Sealer | None = None
    claim_retry_after: int = 2
    heartbeat_retry_after: int = 2
    # Python reclaim policy (claim_policy.py); the Rust server never reclaims.
    claim_lease_seconds: float = 120.0
    heartbeat_stale_seconds: float = 30.0
    claim_hard_timeout_seconds: float = 1800.0
    auto_recreate_runtime: bool = False
    auto_complete_after_polls: int | None = None
    auto_complete_failed: bool = False
    batch_max_events: int = 256
    batch_max_payload_bytes: int = 2 * 1024 * 1024
    # Called with each execution POST /api/execute creates, e.g. to enqueue its commands.
    on_execute: Callable[[ExecutionRow], None] | None = None
    # Called with each command a workflow issues (the caller publishes its notification).
    on_issue: Callable[[StubCommand], None] | None = None

    server_url: str | None = None
    started_at: float = attrs.field(factory=time.monotonic)
    commands: dict[int, StubCommand] = attrs.field(factory=dict)
    events: list[StubEvent] = attrs.field(factory=list)
    duplicate_events: list[dict[str, Any]] = attrs.field(factory=list)
    pools: dict[str, PoolRow] = attrs.field(factory=dict)
    heartbeats: dict[str, list[float]] = attrs.field(factory=dict)
    registrations: list[dict[str, Any]] = attrs.field(factory=list)
    deregistrations: list[str] = attrs.field(factory=list)
    results: dict[str, StoredResult] = attrs.field(factory=dict)
    credentials: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    keychain: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    catalog: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # catalog_id → entry
    variables: dict[str, dict[str, dict[str, Any]]] = attrs.field(factory=dict)
    executions: dict[int, ExecutionRow] = attrs.field(factory=dict)
    # Stored step results per execution, as the server keeps them for templates (_workflow.py).
    step_results: dict[int, dict[str, Any]] = attrs.field(factory=dict)
    workflows: dict[int, Workflow] = attrs.field(factory=dict)
    batches: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    faults: list[Fault] = attrs.field(factory=list)
    request_log: list[RecordedRequest] = attrs.field(factory=list)
    server_errors: list[BaseException] = attrs.field(factory=list)

    # Indexes so a benchmark of thousands of commands does not scan lists per request.
    _by_command_id: dict[str, StubCommand] = attrs.field(init=False, factory=dict, repr=False)
    _event_index: dict[tuple[str, ...], int] = attrs.field(init=False, factory=dict, repr=False)
    _ids: Iterator[int] = attrs.field(init=False, factory=lambda: itertools.count(_ID_BASE), repr=False)
    _change: trio.Event = attrs.field(init=False, factory=trio.Event, repr=False)

    # ------------------------------------------------------------------ ids and change signal

    def next_id(self) -> int:
        return next(self._ids)

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Return once ``predicate()`` is true; ``trio.TooSlowError`` after ``timeout`` s.

        Re-checked on every state change (each request the stub handles is one), never polled.
        """
        with trio.fail_after(timeout):
            while not predicate():
                await self._change.wait()

    async def wait_terminal(
        self, commands: Iterable[StubCommand | int | str], timeout: float
    ) -> list[StubCommand]:
        """Wait until every given command (object, event id or command id) is terminal."""
        rows = [self._resolve_command(c) for c in commands]
        await self.wait_for(lambda: all(row.terminal for row in rows), timeout)
        return rows

    async def wait_heartbeats(self, name: str, count: int, timeout: float) -> list[float]:
        """Wait until ``name`` has sent ``count`` heartbeats; returns their monotonic times."""
        await self.wait_for(lambda: len(self.heartbeats.get(name, ())) >= count, timeout)
        return list(self.heartbeats[name])

    # ------------------------------------------------------------------ commands

    def enqueue_command(
        self,
        *,
        execution_id: int | None = None,
        step: str,
        tool_kind: str,
        tool_config: Mapping[str, Any],
        render_context: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        input: Mapping[str, Any] | None = None,
        cases: list[Any] | None = None,
    ) -> StubCommand:
        """Create a PENDING command as ``POST /api/execute`` or the engine would.

        Publishing the notification is the caller's job (``command.notification()``): the stub
        does not talk to NATS.
        """
        if execution_id is None:
            execution_id = self.next_id()
        self.executions.setdefault(execution_id, ExecutionRow(execution_id=execution_id))
        command_id_int = self.next_id()
        event_id = self.next_id()
        # The Rust server's command ids are strings of this shape; the Python server's are ints.
        command_id: int | str = (
            f"{execution_id}:{step}:{event_id}" if self.flavor == "rust" else command_id_int
        )
        context: dict[str, Any] = {
            "tool_config": dict(tool_config),
            "input": dict(input or {}),
            "render_context": dict(render_context or {}),
            "spec": {"next_mode": "exclusive"},
        }
        if cases is not None:
            context["cases"] = list(cases)
        full_meta: dict[str, Any] = {
            "command_id": command_id,
            "step": step,
            "tool_kind": tool_kind,
            "max_attempts": 3,
            "attempt": 1,
            "execution_id": str(execution_id),
            "catalog_id": "1",
            "actionable": True,
        }
        full_meta.update(meta or {})
        command = StubCommand(
            event_id=event_id,
            execution_id=execution_id,
            command_id=command_id,
            step=step,
            tool_kind=tool_kind,
            context=self._externalize(context, execution_id, step),
            meta=full_meta,
            server_url=self.server_url,
        )
        self.commands[event_id] = command
        self._by_command_id[str(command_id)] = command
        self._record_event(
            execution_id=str(execution_id),
            event_type="command.issued",
            step=step,
            payload={"command_id": command_id, "tool_kind": tool_kind},
            meta={"command_id": command_id},
            worker_id=None,
            actionable=False,
            informative=True,
            via="server",
            event_id=event_id,
        )
        self._changed()
        return command

    def command(self, key: StubCommand | int | str) -> StubCommand:
        """A command by object, ``event_id`` or ``command_id``."""
        return self._resolve_command(key)

    def _resolve_command(self, key: StubCommand | int | str) -> StubCommand:
        if isinstance(key, StubCommand):
            return key
        if isinstance(key, int) and key in self.commands:
            return self.commands[key]
        row = self._by_command_id.get(str(key))
        if row is None:
            raise KeyError(f"no command with event_id or command_id {key!r}")
        return row

    def find_command_by_command_id(self, command_id: Any) -> StubCommand | None:
        return None if command_id is None else self._by_command_id.get(str(command_id))

    def find_event(self, key: tuple[str, ...]) -> int | None:
        """An earlier event's id by dedupe key (see ``_index_event``)."""
        return self._event_index.get(key)

    def _externalize(self, context: dict[str, Any], execution_id: int, step: str) -> dict[str, Any]:
        if self.externalize_over is None:
            return context
        out: dict[str, Any] = {}
        for field, value in context.items():
            size = len(_compact_json(value))
            if size <= self.externalize_over:
                out[field] = value
                continue
            stored = self.store_result(
                execution_id=str(execution_id), name=f"{step}_{field}", data=value, store="kv"
            )
            out[field] = {
                "kind": "result_ref",
                "ref": stored.ref,
                "store": "kv",
                "scope": "execution",
                "meta": {"bytes": stored.bytes, "sha256": stored.sha256},
                "correlation": {"execution_id": str(execution_id), "step": step, "field": field},
            }
        return out

    # ------------------------------------------------------------------ events

    def events_for(self, command_id: StubCommand | int | str) -> list[StubEvent]:
        """Events whose payload or meta names ``command_id`` (server-written ones included)."""
        key = str(command_id.command_id if isinstance(command_id, StubCommand) else command_id)
        return [e for e in self.events if e.command_id == key]

    def event_types(self, command_id: StubCommand | int | str) -> list[str]:
        return [e.event_type for e in self.events_for(command_id)]

    def _record_event(
        self,
        *,
        execution_id: str,
        event_type: str,
        step: str | None,
        payload: Any,
        meta: Mapping[str, Any],
        worker_id: str | None,
        actionable: bool,
        informative: bool,
        via: str,
        client_event_id: Any = None,
        event_id: int | None = None,
    ) -> StubEvent:
        command_id = None
        if isinstance(payload, Mapping) and payload.get("command_id") is not None:
            command_id = str(payload["command_id"])
        elif meta.get("command_id") is not None:
            command_id = str(meta["command_id"])
        event = StubEvent(
            event_id=event_id if event_id is not None else self.next_id(),
            execution_id=execution_id,
            event_type=event_type,
            step=step,
            payload=payload,
            meta=dict(meta),
            worker_id=worker_id,
            actionable=actionable,
            informative=informative,
            status=event_status(event_type),
            command_id=command_id,
            client_event_id=client_event_id,
            via=via,
        )
        self.events.append(event)
        self._index_event(event)
        return event

    def _index_event(self, event: StubEvent) -> None:
        key: tuple[str, ...]
        if event.client_event_id is not None:
            key = ("client", event.execution_id, str(event.client_event_id))
            self._event_index.setdefault(key, event.event_id)
        if event.command_id is not None:
            key = ("cmd", event.execution_id, event.event_type, str(event.step), event.command_id)
            self._event_index.setdefault(key, event.event_id)

    # ------------------------------------------------------------------ results, credentials

    def store_result(
        self,
        *,
        execution_id: str,
        name: str,
        data: Any,
        store: str = "memory",
        scope: str = "execution",
        expires_at: str | None = None,
        source_step: str | None = None,
        correlation: Any = None,
        extracted: Any = None,
    ) -> StoredResult:
        import hashlib

        raw = _compact_json(data)
        ref = f"noetl://execution/{execution_id}/result/{name}/{self.next_id():x}"
        stored = StoredResult(
            ref=ref,
            execution_id=execution_id,
            name=name,
            data=data,
            store=store,
            scope=scope,
            expires_at=expires_at,
            bytes=len(raw),
            sha256=hashlib.sha256(raw).hexdigest(),
            source_step=source_step,
            correlation=correlation,
            extracted=extracted,
        )
        self.results[ref] = stored
        self._changed()
        return stored

    def add_credential(
        self,
        name: str,
        type: str,
        data: Mapping[str, Any],
        *,
        tags: list[str] | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        """Store a credential served by ``GET /api/credentials/{name or id}``."""
        record = {
            "id": str(self.next_id()),
            "name": name,
            "type": type,
            "data": dict(data),
            "tags": list(tags or []),
            "description": description,
        }
        self.credentials[name] = record
        return record

    def add_playbook(self, playbook: Mapping[str, Any], *, version: int | None = None) -> dict[str, Any]:
        """Register a parsed playbook, served by ``POST /api/catalog/resource`` as the real server
        answers it: ``{catalog_id, path, version, kind, content, payload, meta, created_at}``."""
        metadata = playbook.get("metadata")
        path = "playbook"
        if isinstance(metadata, Mapping):
            path = str(metadata.get("path") or metadata.get("name"))
        versions = [e["version"] for e in self.catalog.values() if e["path"] == path]
        catalog_id = str(self.next_id())
        entry: dict[str, Any] = {
            "catalog_id": catalog_id,
            "path": path,
            "version": version if version is not None else max(versions, default=0) + 1,
            "kind": "Playbook",
            "content": json.dumps(playbook),  # JSON is YAML, as the real server stores the text
            "payload": dict(playbook),
            "meta": {},
            "created_at": None,
        }
        self.catalog[catalog_id] = entry
        return entry

    def find_credential(self, alias: str) -> dict[str, Any] | None:
        if alias in self.credentials:
            return self.credentials[alias]
        for record in self.credentials.values():
            if record["id"] == alias:
                return record
        return None

    # ------------------------------------------------------------------ executions

    def complete_execution(
        self, execution_id: int | str, *, failed: bool = False, result: Any = None
    ) -> ExecutionRow:
        """Script a (child) execution's end, as the engine would on its last step."""
        row = self.executions[int(execution_id)]
        row.status = "FAILED" if failed else "COMPLETED"
        row.result = result
        row.end_time = time.time()
        self._changed()
        return row

    def cancel_execution(self, execution_id: int | str) -> ExecutionRow:
        row = self.executions[int(execution_id)]
        row.status = "CANCELLED"
        row.end_time = time.time()
        self._changed()
        return row

    def run_workflow(
        self,
        steps: Iterable[WorkflowStep],
        *,
        workload: Mapping[str, Any] | None = None,
        path: str = "stub/workflow",
    ) -> ExecutionRow:
        """Start an execution of ``steps`` (the first is the entry) as ``POST /api/execute``
        would; each issued command goes to ``on_issue``. The server side then routes on the
        worker's events (``_workflow.py``) until nothing is pending."""
        ordered = list(steps)
        if not ordered:
            raise ValueError("a workflow needs at least one step")
        row = ExecutionRow(execution_id=self.next_id(), path=path, payload=dict(workload or {}))
        self.executions[row.execution_id] = row
        workflow = Workflow({s.name: s for s in ordered}, dict(workload or {}))
        self.workflows[row.execution_id] = workflow
        self._issue_workflow_step(row.execution_id, workflow, ordered[0], None)
        return row

    def _issue_workflow_step(
        self, execution_id: int, workflow: Workflow, step: WorkflowStep, event_name: str | None
    ) -> StubCommand:
        render_context: dict[str, Any] = {
            **workflow.workload,
            "workload": dict(workflow.workload),
            "ctx": dict(workflow.workload),
            **self.step_results.get(execution_id, {}),
        }
        if event_name is not None:
            render_context["event"] = {"name": event_name}
        command = self.enqueue_command(
            execution_id=execution_id,
            step=step.name,
            tool_kind=step.tool_kind,
            tool_config={"kind": step.tool_kind, **step.tool_config},
            input=step.input,
            render_context=render_context,
        )
        self.executions[execution_id].current_step = step.name
        if self.on_issue is not None:
            self.on_issue(command)
        return command

    def execution_outcome(self, execution_id: int | str) -> str:
        """RUNNING, COMPLETED or FAILED as the server would end the execution so far: a
        workflow's own end; for commands a test enqueued, FAILED/COMPLETED once all are
        terminal."""
        row = self.executions[int(execution_id)]
        if row.terminal:
            return row.status
        commands = [c for c in self.commands.values() if c.execution_id == row.execution_id]
        if int(execution_id) in self.workflows or not commands or not all(c.terminal for c in commands):
            return "RUNNING"
        return "FAILED" if row.failure is not None else "COMPLETED"

    def playbook_terminal(self, execution_id: int | str) -> str | None:
        """``playbook.completed`` / ``playbook.failed`` once the server wrote it, else None."""
        for event in self.events:
            if event.execution_id == str(execution_id) and event.event_type in (
                "playbook.completed",
                "playbook.failed",
            ):
                return event.event_type
        return None

    # ------------------------------------------------------------------ faults and log

    def inject(
        self,
        method: str,
        path_regex: str,
        status: int | None,
        *,
        times: int = 1,
        retry_after: float | None = None,
        delay: float = 0.0,
        body: Any = None,
    ) -> Fault:
        """Answer the next ``times`` matching requests with ``status`` (after ``delay`` s).

        ``method`` is an HTTP method or ``"*"``; ``path_regex`` is searched in the path.
        ``status=None`` with a ``delay`` only slows the requests down and then serves them.
        """
        fault = Fault(
            method=method.upper() if method != "*" else "*",
            path_regex=re.compile(path_regex),
            status=status,
            remaining=times,
            retry_after=retry_after,
            delay=delay,
            body=body,
        )
        self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                fault.remaining -= 1
                fault.hits += 1
                return fault
        return None

    def requests_to(self, path_regex: str, method: str | None = None) -> list[RecordedRequest]:
        pattern = re.compile(path_regex)
        return [
            r
            for r in self.request_log
            if pattern.search(r.path) and (method is None or r.method == method.upper())
        ]

    @property
    def authorization_headers(self) -> list[str | None]:
        """The ``Authorization`` header of every request received, in order (None if absent)."""
        return [r.headers.get("authorization") for r in self.request_log]


def event_status(event_type: str) -> str:
    """The Python server's status derivation from the event name."""
    last = event_type.rsplit(".", 1)[-1].lower()
    if last in ("error", "failed"):
        return "FAILED"
    if last in ("done", "exit", "completed"):
        return "COMPLETED"
    return "RUNNING"
