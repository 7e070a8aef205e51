"""The two NoETL servers' dialects: every wire difference between them lives here.

The worker talks to two servers that read the same routes differently (docs/compatibility.md):

- **python** — the FastAPI server (PyPI ``noetl`` 4.12.1). It stores a step's result from the
  ``response`` of ``call.done`` (the tool's value itself) and routes on ``call.done`` /
  ``call.error``; a tool that failed must be reported as ``call.error`` + ``command.failed``,
  or the execution carries on as if it had succeeded. Events go as noetl's own worker sends
  them: ``command.started`` + ``step.enter`` first, then ``call.done`` + ``step.exit`` +
  ``command.completed`` (or ``call.error`` + ``step.exit`` FAILED + ``command.failed``), with
  only ``call.*`` actionable (its batch route acts on the last actionable item).
- **rust** — the Rust server (``noetl/server``). It unwraps ``result.context.data`` of
  ``call.done`` into the step result and reads the tool status from the result; the worker
  reports any tool result as ``call.done`` + ``command.completed`` as the Rust worker does.

``dispatch`` asks :class:`Dialects` which one a server speaks and lets it build the events;
tools never know. ``auto`` (the default) probes ``GET /api/health`` once per server URL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal, Protocol

import attrs
import trio

from .errors import TransportError
from .events import Event, EventFactory
from .tools.base import ToolResult

log = logging.getLogger(__name__)

DialectName = Literal["python", "rust"]
DIALECT_MODES: Final = ("auto", "python", "rust")
# What an undecidable probe falls back to: the server that is published and in use.
DEFAULT_DIALECT: Final[DialectName] = "python"
# A probe that failed in transport is tried again after this long (meanwhile: the default).
REPROBE_AFTER: Final = 30.0
PROBE_TIMEOUT: Final = 5.0
COMMAND_HEARTBEAT_INTERVAL: Final = 15.0
HEALTH_PATH: Final = "/api/health"
# Keys only the Rust server's /api/health answer has (the Python one is {"status": "ok"}).
_RUST_HEALTH_KEYS: Final = frozenset({"version", "nats", "database", "uptime_seconds"})
# Upstream's tool-error rule reads these statuses in a tool's value as a failure.
_ERROR_STATUSES: Final = frozenset({"error", "failed"})
# Command meta the Python server needs back to count loop iterations (and its state ref).
_LOOP_META: Final = ("loop_event_id", "__loop_epoch_id", "loop_iteration_index", "state_ref")


# ---- what the dispatcher hands a dialect ------------------------------------------------


@attrs.frozen
class Reported:
    """The result object built by the results module: ``{status, context?, reference?}``.

    ``context`` is the scrubbed value inline, or ``{"data": {"_ref": …}}`` next to a durable
    ``reference``; a result that could be neither inlined nor stored carries only a status.
    """

    body: Mapping[str, Any]

    @property
    def inline(self) -> bool:
        return "reference" not in self.body and "context" in self.body

    @property
    def value(self) -> Any:
        return self.body.get("context")

    @property
    def reference(self) -> Any:
        return self.body.get("reference")


class Dialect(Protocol):
    @property
    def name(self) -> DialectName: ...

    @property
    def stages_shared_memory(self) -> bool:
        """Whether a large result is also staged in same-node shared memory (only Rust
        workers next to us can read it; the Python server cannot)."""
        ...

    @property
    def heartbeat_interval(self) -> float | None:
        """Seconds between ``command.heartbeat`` events while the tool runs (None: none)."""
        ...

    def start_events(self, events: EventFactory) -> list[Event]:
        """What goes out when the command starts."""
        ...

    def heartbeat(self, events: EventFactory) -> Event:
        """One ``command.heartbeat`` (only asked for when ``heartbeat_interval`` is set)."""
        ...

    def tool_failed(self, result: ToolResult, tool_kind: str) -> bool:
        """Whether this tool result must be reported as a failure."""
        ...

    def reported_value(self, result: ToolResult, failed: bool) -> Any:
        """The value the server stores for the step (before scrubbing / the reference path)."""
        ...

    def error_text(self, result: ToolResult) -> str:
        """The error message of a failed tool result."""
        ...

    def success_events(
        self,
        events: EventFactory,
        reported: Reported | None,
        result: ToolResult,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        """Terminal events of a tool result that is not a failure (``reported`` is None when
        the result arrives later through a callback)."""
        ...

    def tool_error_events(
        self,
        events: EventFactory,
        reported: Reported,
        result: ToolResult,
        error: str,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        """Terminal events of a tool result with status error/timeout (``tool_failed``)."""
        ...

    def exception_events(self, events: EventFactory, error: str, error_type: str | None) -> list[Event]:
        """Terminal events when the tool could not run (bad config, exception, credentials)."""
        ...

    def case_failed_events(
        self,
        events: EventFactory,
        reported: Reported | None,
        result: ToolResult,
        message: str,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        """Terminal events when a ``case`` with ``then: fail`` matched the result."""
        ...


def loop_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The command meta the Python server needs back on ``call.*`` (loop bookkeeping)."""
    return {key: meta[key] for key in _LOOP_META if meta.get(key) is not None}


# ---- rust -----------------------------------------------------------------------------


@attrs.frozen
class RustDialect:
    """As the Rust worker sends it (one ``/api/events`` each, or a batch when coalesced)."""

    name: DialectName = "rust"
    stages_shared_memory: bool = True
    heartbeat_interval: float | None = None  # the Rust worker sends none

    def start_events(self, events: EventFactory) -> list[Event]:
        return [events.started()]

    def heartbeat(self, events: EventFactory) -> Event:
        raise NotImplementedError("the Rust dialect sends no command heartbeats")

    def tool_failed(self, result: ToolResult, tool_kind: str) -> bool:
        # The Rust server reads the tool status from call.done; a failed result is still a result.
        return False

    def reported_value(self, result: ToolResult, failed: bool) -> Any:
        return result.to_json()

    def error_text(self, result: ToolResult) -> str:
        return _error_text(result)

    def success_events(
        self,
        events: EventFactory,
        reported: Reported | None,
        result: ToolResult,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        done = [] if reported is None else [events.call_done(dict(reported.body))]
        return [*done, *extra, events.completed(result.status, warnings)]

    def tool_error_events(
        self,
        events: EventFactory,
        reported: Reported,
        result: ToolResult,
        error: str,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        return self.success_events(events, reported, result, extra, warnings)

    def exception_events(self, events: EventFactory, error: str, error_type: str | None) -> list[Event]:
        return [events.call_error(error), events.failed(error)]

    def case_failed_events(
        self,
        events: EventFactory,
        reported: Reported | None,
        result: ToolResult,
        message: str,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        done = [] if reported is None else [events.call_done(dict(reported.body))]
        return [*done, *extra, events.failed(message, warnings)]


# ---- python ---------------------------------------------------------------------------


@attrs.frozen
class PythonDialect:
    """As noetl's own 4.12.1 worker sends it (see the module docstring)."""

    loop: Mapping[str, Any] = attrs.field(factory=dict)  # loop_fields() of the command
    name: DialectName = "python"
    stages_shared_memory: bool = False
    # noetl's own worker: one stored-only command.heartbeat per 15 s while the tool runs.
    heartbeat_interval: float | None = COMMAND_HEARTBEAT_INTERVAL

    def for_command(self, meta: Mapping[str, Any]) -> PythonDialect:
        return attrs.evolve(self, loop=loop_fields(meta))

    def start_events(self, events: EventFactory) -> list[Event]:
        return [
            events.started(),
            events.make("step.enter", "RUNNING", {"status": "started", "command_id": events.command_id}),
        ]

    def heartbeat(self, events: EventFactory) -> Event:
        payload = {"command_id": events.command_id, "worker_id": events.worker_id}
        return events.make("command.heartbeat", "RUNNING", payload, actionable=False)

    def tool_failed(self, result: ToolResult, tool_kind: str) -> bool:
        if result.status != "success":
            return True
        # Upstream's rule: a value that says it failed (or one of whose fields does) failed,
        # except for agent envelopes, which describe another framework's outcome.
        if tool_kind == "agent" or not isinstance(result.data, Mapping):
            return False
        if _says_error(result.data):
            return True
        return any(isinstance(v, Mapping) and _says_error(v) for v in result.data.values())

    def reported_value(self, result: ToolResult, failed: bool) -> Any:
        if not failed:
            return result.data
        if result.status == "success" and isinstance(result.data, Mapping):
            return result.data  # the value itself says it failed (tool_failed)
        # The tool's error envelope, e.g. shell {status, error, data: {returncode, stdout, …}}.
        return {"status": "error", "error": self.error_text(result), "data": result.data}

    def error_text(self, result: ToolResult) -> str:
        if result.status == "success" and isinstance(result.data, Mapping):
            return _value_error_text(result.data)
        return _error_text(result)

    def _payload(self, events: EventFactory, status: str, reported: Reported | None) -> dict[str, Any]:
        payload: dict[str, Any] = {"command_id": events.command_id}
        envelope: dict[str, Any] = {"status": status}
        if reported is not None:
            if reported.inline:
                payload["response"] = reported.value
                # The server logs ``result`` as the event's result; noetl's worker puts the
                # value's control fields there (``{status}`` alone left the log without them).
                context = control_context(reported.value)
                if context:
                    envelope["context"] = context
            elif reported.reference is not None:
                # The server resolves result.reference.ref into the step result.
                envelope["reference"] = reported.reference
        payload["result"] = envelope
        return payload

    def _meta(self) -> dict[str, Any]:
        return dict(self.loop)

    def _loop_payload(self) -> dict[str, Any]:
        return {k: v for k, v in self.loop.items() if k in ("loop_event_id", "loop_iteration_index")}

    def success_events(
        self,
        events: EventFactory,
        reported: Reported | None,
        result: ToolResult,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        done: list[Event] = []
        if reported is not None:
            payload = {**self._payload(events, "COMPLETED", reported), **self._loop_payload()}
            done.append(events.make("call.done", "COMPLETED", payload, actionable=True, meta=self._meta()))
        # A case's own step.exit stands in for ours (the server keeps one per command).
        exits = [] if _has_step_exit(extra) else [self._step_exit(events, "COMPLETED", None)]
        return [
            *done,
            *extra,
            *exits,
            self._terminal(events, "command.completed", "COMPLETED", None, warnings),
        ]

    def tool_error_events(
        self,
        events: EventFactory,
        reported: Reported,
        result: ToolResult,
        error: str,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        return self._failure(events, reported, error, extra, warnings)

    def exception_events(self, events: EventFactory, error: str, error_type: str | None) -> list[Event]:
        payload = {
            "command_id": events.command_id,
            "error": error,
            "result": {"status": "FAILED"},
            **self._loop_payload(),
        }
        failed = self._terminal(events, "command.failed", "FAILED", error, ())
        if error_type is not None:
            failed = attrs.evolve(failed, context={**failed.context, "error_type": error_type})
        return [
            events.make("call.error", "FAILED", payload, actionable=True, meta=self._meta()),
            self._step_exit(events, "FAILED", error),
            failed,
        ]

    def case_failed_events(
        self,
        events: EventFactory,
        reported: Reported | None,
        result: ToolResult,
        message: str,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        return self._failure(events, reported, message, extra, warnings)

    def _failure(
        self,
        events: EventFactory,
        reported: Reported | None,
        error: str,
        extra: tuple[Event, ...],
        warnings: tuple[str, ...],
    ) -> list[Event]:
        """call.error (the failure as the step's value) → case events → step.exit → command.failed."""
        payload = {**self._payload(events, "FAILED", reported), "error": error, **self._loop_payload()}
        return [
            events.make("call.error", "FAILED", payload, actionable=True, meta=self._meta()),
            *extra,
            *([] if _has_step_exit(extra) else [self._step_exit(events, "FAILED", error)]),
            self._terminal(events, "command.failed", "FAILED", error, warnings),
        ]

    def _step_exit(self, events: EventFactory, status: str, error: str | None) -> Event:
        payload = {
            "status": status,
            "result": {"status": status},
            "error": error,
            "command_id": events.command_id,
        }
        return events.make("step.exit", status, payload, actionable=False, meta=self._meta())

    def _terminal(
        self, events: EventFactory, name: str, status: str, error: str | None, warnings: tuple[str, ...]
    ) -> Event:
        payload: dict[str, Any] = {
            "command_id": events.command_id,
            "worker_id": events.worker_id,
            "result": {"status": status},
        }
        if error is not None:
            payload["error"] = error
        if warnings:
            payload["warnings"] = list(warnings)
        return events.make(name, status, payload, actionable=False)


def _has_step_exit(extra: tuple[Event, ...]) -> bool:
    return any(e.event_type == "step.exit" for e in extra)


def _says_error(value: Mapping[str, Any]) -> bool:
    status = value.get("status")
    return isinstance(status, str) and status.lower() in _ERROR_STATUSES


def _value_error_text(value: Mapping[str, Any]) -> str:
    error = value.get("error")
    if isinstance(error, Mapping) and error.get("message"):
        return str(error["message"])
    if error:
        return str(error)
    for item in value.values():
        if isinstance(item, Mapping) and _says_error(item) and item.get("error"):
            return str(item["error"])
    return "Tool returned error status"


def _error_text(result: ToolResult) -> str:
    if result.error:
        return result.error
    if result.status == "timeout":
        return "the tool timed out"
    detail = (result.stderr or "").strip()[-300:]
    code = f"exit code {result.exit_code}" if result.exit_code is not None else f"status {result.status}"
    return f"tool returned {code}" + (f": {detail}" if detail else "")


# ---- telling the servers apart ----------------------------------------------------------


# Data-plane fields noetl's worker keeps out of an event's ``result.context``.
_NOT_CONTROL = frozenset(
    {
        "_ref", "_preview", "_size_bytes", "_store", "_store_failed", "_store_error", "_inline",
        "_internal_data", "data", "response", "result", "payload", "rows", "columns",
    }
)  # fmt: skip


def _control_key(key: str) -> bool:
    return key not in _NOT_CONTROL and (not key.startswith("command_") or key == "command_id")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def control_context(value: Any) -> dict[str, Any] | None:
    """The bounded projection of a value noetl's worker sends as ``result.context``: its
    scalar fields, and of each object field its scalar fields (references whole), without the
    data-plane fields (``data``, ``rows``, ``columns``, ``command_<n>_*``, …). ``None`` when
    nothing is left or the value is not an object. (A ``context`` object inside the value is
    projected instead of the value.)"""
    if not isinstance(value, Mapping):
        return None
    inner = value.get("context")
    candidate: Mapping[str, Any] = inner if isinstance(inner, Mapping) else value
    out: dict[str, Any] = {}
    for raw_key, child in candidate.items():
        key = str(raw_key)
        if not _control_key(key):
            continue
        if _scalar(child):
            out[key] = child
        elif isinstance(child, Mapping) and child.get("kind") in ("temp_ref", "result_ref"):
            out[key] = dict(child)
        elif isinstance(child, Mapping):
            nested = {str(k): v for k, v in child.items() if _scalar(v) and _control_key(str(k))}
            if nested:
                out[key] = nested
    return out or None


def classify_health(status: int, body: bytes) -> DialectName | None:
    """Which server answered ``GET /api/health``; None when the answer does not tell.

    Rust: ``{"status", "database", "nats", "uptime_seconds", "version"}`` (200, or 503 when
    unhealthy). Python 4.12.1: ``{"status": "ok"}`` only — or 404 on a build without the route.
    """
    if status == 404:
        return "python"
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if _RUST_HEALTH_KEYS & payload.keys():
        return "rust"
    if 200 <= status < 300 and "status" in payload:
        return "python"
    return None


class HealthFetch(Protocol):
    def __call__(self, server_url: str) -> Awaitable[tuple[int, bytes]]: ...


@attrs.define(eq=False)
class Dialects:
    """Which dialect each server URL speaks: fixed by ``NOETL_SERVER_DIALECT`` or probed.

    A decided probe is cached for the life of the process. One that cannot decide falls back
    to :data:`DEFAULT_DIALECT` with one warning per URL: an odd answer is cached (asking again
    would get the same answer); a transport failure or a 5xx is asked again after
    :data:`REPROBE_AFTER` seconds, commands meanwhile use the default.
    """

    mode: str
    fetch: HealthFetch | None = None
    clock: Callable[[], float] = trio.current_time
    _decided: dict[str, DialectName] = attrs.field(factory=dict)
    _retry_at: dict[str, float] = attrs.field(factory=dict)
    _warned: set[str] = attrs.field(factory=set)
    _locks: dict[str, trio.Lock] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.mode not in DIALECT_MODES:
            raise ValueError(f"NOETL_SERVER_DIALECT must be one of {', '.join(DIALECT_MODES)}: {self.mode!r}")

    async def for_server(self, server_url: str) -> DialectName:
        if self.mode != "auto":
            return self.mode  # type: ignore[return-value]
        if server_url in self._decided:
            return self._decided[server_url]
        lock = self._locks.setdefault(server_url, trio.Lock())
        async with lock:  # concurrent first commands wait for one probe
            if server_url in self._decided:
                return self._decided[server_url]
            retry_at = self._retry_at.get(server_url)
            if retry_at is not None and self.clock() < retry_at:
                return DEFAULT_DIALECT
            return await self._probe(server_url)

    async def _probe(self, server_url: str) -> DialectName:
        if self.fetch is None:
            return self._fallback(server_url, "no way to probe", cache=True)
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                status, body = await self.fetch(server_url)
        except (TransportError, trio.TooSlowError) as exc:
            return self._fallback(server_url, f"no answer ({exc or 'timeout'})", cache=False)
        except Exception as exc:  # the probe must never take a command down with it
            return self._fallback(server_url, f"probe failed ({type(exc).__name__}: {exc})", cache=False)
        name = classify_health(status, body)
        if name is not None:
            self._decided[server_url] = name
            self._retry_at.pop(server_url, None)
            log.info(
                "server %s speaks the %s dialect (GET %s: HTTP %d)", server_url, name, HEALTH_PATH, status
            )
            return name
        snippet = body[:120].decode(errors="replace")
        return self._fallback(server_url, f"HTTP {status} {snippet!r}", cache=status < 500)

    def _fallback(self, server_url: str, why: str, *, cache: bool) -> DialectName:
        if cache:
            self._decided[server_url] = DEFAULT_DIALECT
        else:
            self._retry_at[server_url] = self.clock() + REPROBE_AFTER
        if server_url not in self._warned:
            self._warned.add(server_url)
            log.warning(
                "cannot tell which NoETL server %s is from GET %s: %s; speaking the %s dialect%s "
                "(set NOETL_SERVER_DIALECT=python|rust to decide)",
                server_url,
                HEALTH_PATH,
                why,
                DEFAULT_DIALECT,
                "" if cache else f", asking again in {REPROBE_AFTER:g}s",
            )
        return DEFAULT_DIALECT


def dialect_for_command(name: DialectName, meta: Mapping[str, Any]) -> Dialect:
    """The dialect object for one command (the Python one carries the command's loop meta)."""
    if name == "python":
        return PythonDialect().for_command(meta)
    return RustDialect()


# ---- 409 answers of the claim route ----------------------------------------------------


def conflict_details(body: bytes) -> tuple[str, str]:
    """(code, message) from a 409 body of either server.

    Python: ``{"detail": {"code": "active_claim", "message": …}}`` (or ``{"detail": "…"}``);
    Rust: ``{"error": "already claimed by …", "status": 409}`` — no code, so it is read from
    the message.
    """
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        return "unknown", body.decode(errors="replace")[:200]
    if not isinstance(payload, dict):
        return "unknown", str(payload)[:200]
    detail = payload.get("detail")
    if isinstance(detail, dict):
        return str(detail.get("code") or "unknown"), str(detail.get("message") or "")
    message = str(detail if detail is not None else payload.get("error", ""))
    lowered = message.lower()
    if "terminal" in lowered:
        code = "already_terminal"
    elif "cancel" in lowered:
        code = "execution_cancelled"
    elif "claim" in lowered or "another worker" in lowered:
        code = "active_claim"
    else:
        code = "unknown"
    return code, message
