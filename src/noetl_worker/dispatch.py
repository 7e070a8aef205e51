"""One command's lifecycle: claim → started → tool under a deadline → events → ack.

Which events go out, and what they carry, is the server's dialect (``dialect``): the Python
server gets noetl's own worker's events (a failed tool is ``call.error`` + ``command.failed``),
the Rust server the Rust worker's (any tool result is ``call.done`` + ``command.completed``).
This module only sequences them; it never looks at a payload.

Decisions (docs/architecture.md, "Design decisions"):
- The NATS message is acked only once the terminal event is accepted; an in-progress ack keeps
  it alive every ack_wait/3 meanwhile; cancellation at the drain deadline naks it.
- A tool that finishes within ``COALESCE_WINDOW`` has its start events sent together with
  the terminal events in one ``/api/events/batch`` call: one round trip instead of three.
- Terminal events are retried as long as the server is unreachable or busy (bounded by
  ``TERMINAL_PATIENCE``), so a command gets its terminal event if the server is reachable at all.
- Failure log lines carry the (scrubbed) error text.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol

import attrs
import trio

from . import logs, templating, tools
from .alarms import Alarms
from .bus import Message
from .config import Settings
from .control_plane import (
    EVENT_RETRY,
    AlreadyClaimed,
    Claimed,
    ControlPlane,
    InvalidAnswer,
    NotFound,
    Rejected,
    RetryLater,
    RetryPolicy,
)
from .dialect import Dialect, Dialects, Reported, dialect_for_command
from .errors import BusError, ControlPlaneError, HTTPStatusError, ToolConfigError, ToolError
from .event_stream import LifecycleSink, NoLifecycle
from .events import Event, EventFactory
from .metrics import Metrics
from .notification import Notification
from .retry import TERMINAL_RETRY
from .snowflake import SnowflakeGenerator
from .tools.base import ToolContext, ToolResources, ToolResult

log = logging.getLogger(__name__)

COALESCE_WINDOW = 0.05
WAITING_KINDS = frozenset({"playbook"})
WAITING_DEFAULT_TIMEOUT = 300.0  # the playbook tool's own default
WAITING_MARGIN = 5.0
TERMINAL_PATIENCE = 300.0
NAK_DELAY_SHUTDOWN = 0.0
HEARTBEAT_RETRY = RetryPolicy(attempts=2)


class Hooks(Protocol):
    """Extension points filled by the results / credentials / templating modules."""

    async def prepare(self, command: Command, ctx: ToolContext) -> tuple[dict[str, Any], ToolContext]:
        """Resolve references and credentials; return the final tool config and context."""
        ...

    async def call_done_result(
        self, command: Command, ctx: ToolContext, value: Any, status: str, *, stage_shared_memory: bool
    ) -> dict[str, Any]:
        """``{status, context?, reference?}`` for the value the server stores (scrubbed; inline
        or a reference)."""
        ...

    async def after_result(
        self, command: Command, ctx: ToolContext, result: ToolResult, events: EventFactory
    ) -> CaseEffect:
        """Cases: extra events and whether the command fails instead of completing."""
        ...

    def scrub_text(self, text: str, ctx: ToolContext | None = None) -> str: ...

    def scrub_payload(self, payload: Any, ctx: ToolContext | None = None) -> Any:
        """An event payload with the command's secrets (and secret-shaped values) replaced."""
        ...


@attrs.frozen
class CaseEffect:
    events: tuple[Event, ...] = ()
    # Reported in command.completed/failed (e.g. a case that could not be parsed), never dropped.
    warnings: tuple[str, ...] = ()
    fail_message: str | None = None


@attrs.frozen
class Command:
    """The claimed command (claim response), normalised."""

    notification: Notification
    server_url: str
    execution_id: int
    step: str
    tool_kind: str
    context: dict[str, Any]
    meta: dict[str, Any]
    command_id: str
    attempts: int

    @classmethod
    def from_claim(cls, note: Notification, server_url: str, body: Mapping[str, Any]) -> Command:
        context = body.get("context")
        meta = body.get("meta")
        context = dict(context) if isinstance(context, Mapping) else {}
        meta = dict(meta) if isinstance(meta, Mapping) else {}
        step = str(body.get("node_name") or body.get("node_id") or note.step)
        try:
            execution_id = int(body.get("execution_id", note.execution_id))
        except (TypeError, ValueError, OverflowError):
            execution_id = note.execution_id
        command_id = meta.get("command_id")
        if command_id is None or isinstance(command_id, bool):
            command_id = note.command_id
        # The Rust server writes meta.attempt, the Python side meta.attempts: take either.
        attempts = meta.get("attempts", meta.get("attempt", 0))
        try:
            attempts = max(0, int(attempts))
        except (TypeError, ValueError, OverflowError):
            attempts = 0
        tool_config = context.get("tool_config")
        kind = body.get("action") or (tool_config.get("kind") if isinstance(tool_config, Mapping) else None)
        return cls(
            note,
            server_url,
            execution_id,
            step,
            str(kind or ""),
            context,
            meta,
            str(command_id),
            attempts,
        )

    @property
    def cursor(self) -> tuple[int, int]:
        cursor = self.meta.get("cursor")
        if isinstance(cursor, Mapping):
            try:
                return int(cursor.get("frame") or 0), int(cursor.get("row") or 0)
            except (TypeError, ValueError, OverflowError):
                pass
        return 0, 0

    def tool_config(self) -> dict[str, Any]:
        """The tool config as the Rust worker assembles it, plus the Python server's ``input`` block."""
        raw = self.context.get("tool_config")
        if isinstance(raw, Mapping):
            config = dict(raw)
        elif isinstance(raw, list):
            config = {"tool_config": raw}
        else:
            config = {}
        config.setdefault("kind", self.tool_kind)
        if "args" not in config and "args" in self.context:
            config["args"] = self.context["args"]
        outer = self.context.get("input")
        if isinstance(outer, Mapping) and outer:
            inner = config.get("input")
            config["input"] = {**inner, **outer} if isinstance(inner, Mapping) else dict(outer)
        return config

    def deadline_seconds(self, config: Mapping[str, Any], cap: float) -> float:
        """The tool's own timeout or the worker cap, whichever is smaller.

        Tools that mostly wait on the server (``playbook``) give their slot back while they wait,
        so the cap — which exists to bound held resources — does not shorten their own timeout;
        a small margin lets the tool report its own timeout result first.
        """
        own = self._own_timeout(config)
        if self.tool_kind in WAITING_KINDS:
            return (own if own is not None else WAITING_DEFAULT_TIMEOUT) + WAITING_MARGIN
        return min(own, cap) if own is not None else cap

    @staticmethod
    def _own_timeout(config: Mapping[str, Any]) -> float | None:
        for key in ("timeout", "timeout_seconds"):
            value = config.get(key)
            if isinstance(value, bool):
                continue
            try:
                seconds = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError, OverflowError):
                continue
            if seconds > 0 and math.isfinite(seconds):
                return seconds
        return None


@attrs.define(eq=False)
class Runtime:
    """Process-wide state shared by every command task."""

    settings: Settings
    plane: ControlPlane
    metrics: Metrics
    ids: SnowflakeGenerator
    resources: ToolResources
    hooks: Hooks
    slots: trio.CapacityLimiter
    waiting: trio.CapacityLimiter
    ack_wait: Callable[[], float] = lambda: 30.0
    dialects: Dialects = attrs.field(factory=lambda: Dialects("python"))
    running: set[int] = attrs.field(factory=set)  # event ids of commands running in this process
    started: int = 0  # commands started in this process so far
    # The operator event stream (GET /events); a no-op unless WORKER_EVENTS_STREAM is on.
    lifecycle: LifecycleSink = attrs.field(factory=NoLifecycle)
    # Every command's in-progress acks, heartbeats and start-event window (service runs it).
    alarms: Alarms = attrs.field(factory=Alarms)


def _variables(command: Command, settings: Settings) -> dict[str, Any]:
    render_context = command.context.get("render_context")
    cursor = command.meta.get("cursor")
    return templating.build_variables(
        render_context if isinstance(render_context, Mapping) else {},
        execution_id=str(command.execution_id),
        step=command.step,
        command_id=command.command_id,
        worker_id=settings.worker_id,
        server_url=command.server_url,
        tool_kind=command.tool_kind,
        cursor=cursor if isinstance(cursor, Mapping) else None,
    )


def rebuild_context(command: Command, ctx: ToolContext) -> ToolContext:
    """The tool context for a command whose claim context changed (references resolved)."""
    variables = _variables(command, ctx.settings)
    return attrs.evolve(ctx, variables=variables, render=partial(templating.render, variables=variables))


class Settle:
    """How the NATS message ends."""

    ACK = "ack"
    NAK = "nak"
    TERM = "term"


async def handle_message(
    rt: Runtime, msg: Message, note: Notification, token: object, received_at: float
) -> None:
    """Claim and run one notification; always settles the message. Holds the slot ``token``."""
    fields = {"execution_id": note.execution_id, "command_id": note.command_id, "step": note.step}
    logs.command_fields.set(fields)
    outcome: tuple[str, float] | None = None
    try:
        async with trio.open_nursery() as nursery:
            progress = rt.alarms.after(_progress_interval(rt), nursery, partial(_progress, msg, rt))
            try:
                outcome = await _claim_and_run(
                    rt, note, token, received_at, int(getattr(msg, "num_delivered", 1) or 1)
                )
            finally:
                progress.cancel()
                nursery.cancel_scope.cancel()
    except Exception:
        log.exception("unexpected error while handling a command; nak for redelivery")
        outcome = (Settle.NAK, 5.0)
    finally:
        if outcome is None:
            # Cancelled (drain deadline) before the outcome was reported: hand it back now
            # rather than after ack_wait; the server arbitrates the re-claim.
            log.warning("command cancelled before its outcome was reported; nak for redelivery")
            with trio.CancelScope(shield=True):
                await _settle(msg, Settle.NAK, NAK_DELAY_SHUTDOWN)
    await _settle(msg, *outcome)


async def _settle(msg: Message, settle: str, delay: float) -> None:
    try:
        with trio.move_on_after(10):
            if settle == Settle.ACK:
                await msg.ack()
            elif settle == Settle.TERM:
                await msg.term()
            else:
                await msg.nak(delay or None)
    except BusError as exc:
        # JetStream redelivers after ack_wait; the claim endpoint arbitrates a second claim.
        log.warning("could not %s the message: %s", settle, exc)


def _progress_interval(rt: Runtime) -> float:
    return max(0.2, rt.ack_wait() / 3)


async def _progress(msg: Message, rt: Runtime) -> None:
    """In-progress acks while the command runs, so ack_wait never expires mid-command. Started
    by an alarm one interval after the command began."""
    while True:
        try:
            await msg.in_progress()
        except BusError as exc:
            log.debug("in-progress ack failed: %s", exc)
        await trio.sleep(_progress_interval(rt))


async def _claim_and_run(
    rt: Runtime, note: Notification, token: object, received_at: float, delivered: int = 1
) -> tuple[str, float]:
    server_url = rt.plane.base(note.server_url)
    outcome = await rt.plane.claim(server_url, note.event_id)
    rt.metrics.pull_duration.observe(trio.current_time() - received_at)
    if isinstance(outcome, AlreadyClaimed):
        settle, delay = held_claim_settle(outcome, delivered)
        if settle == Settle.NAK:
            log.info(
                "claim held by %s (%s); asking again in %.0fs (delivery %d), so the command is "
                "not lost if that worker went away",
                outcome.holder or "another worker",
                outcome.code,
                delay,
                delivered,
            )
            rt.metrics.skipped.labels("claim_held").inc()
        else:
            log.debug("already claimed (%s): %s; skipping", outcome.code, outcome.message)
            rt.metrics.skipped.labels("already_claimed").inc()
        return settle, delay
    if isinstance(outcome, InvalidAnswer):
        return await _claim_and_run_invalid(rt, note, server_url, outcome.reason)
    if isinstance(outcome, RetryLater):
        log.warning("claim must be retried later (%s); nak with %.1fs delay", outcome.reason, outcome.delay)
        return Settle.NAK, outcome.delay
    if isinstance(outcome, NotFound | Rejected):
        status = 404 if isinstance(outcome, NotFound) else outcome.status
        message = f"claim_failed status={status} message={outcome.message}"
        log.error("claim refused (HTTP %s): %s", status, outcome.message)
        events = EventFactory(
            rt.ids.next_id, note.execution_id, note.step, note.command_id, rt.settings.worker_id
        )
        try:
            await rt.plane.emit(server_url, [events.failed(message)], policy=RetryPolicy(attempts=2))
        except ControlPlaneError as exc:
            log.warning("could not report the refused claim: %s", exc)
        # A command the server does not know will never be claimable: stop redelivering it.
        return (Settle.TERM if isinstance(outcome, NotFound) else Settle.ACK), 0.0
    assert isinstance(outcome, Claimed)
    try:
        command = Command.from_claim(note, server_url, outcome.command)
    except Exception as exc:  # an answer of the right shape with values no command has
        return await _claim_and_run_invalid(rt, note, server_url, f"{type(exc).__name__}: {exc}")
    rt.lifecycle.claimed(command)
    rt.metrics.concurrent.inc()
    start = trio.current_time()
    _outcome_counted.set(False)
    try:
        return await run_command(rt, command, token)
    except BaseException as exc:
        if _is_cancellation(exc) and not _outcome_counted.get():
            rt.metrics.command_finished(rt.metrics.kind_label(command.tool_kind), "cancelled")
        raise
    finally:
        rt.metrics.concurrent.dec()
        rt.metrics.dispatch_duration.labels(rt.metrics.kind_label(command.tool_kind)).observe(
            trio.current_time() - start
        )


async def _claim_and_run_invalid(
    rt: Runtime, note: Notification, server_url: str, reason: str
) -> tuple[str, float]:
    """A claim answer that is no command: report command.failed, and terminate the message —
    the same answer would come back on every redelivery."""
    reason = reason[:500]
    log.error("claim answer refused: %s", reason)
    events = EventFactory(
        rt.ids.next_id, note.execution_id, note.step, note.command_id, rt.settings.worker_id
    )
    try:
        await rt.plane.emit(
            server_url, [events.failed(f"claim_failed: {reason}")], policy=RetryPolicy(attempts=2)
        )
    except ControlPlaneError as exc:
        log.warning("could not report the refused claim answer: %s", exc)
    return Settle.TERM, 0.0


async def run_command(rt: Runtime, command: Command, token: object) -> tuple[str, float]:
    """Run a claimed command and report it. Returns how to settle the NATS message."""
    dialect = dialect_for_command(await rt.dialects.for_server(command.server_url), command.meta)
    events = EventFactory(
        rt.ids.next_id,
        command.execution_id,
        command.step,
        command.command_id,
        rt.settings.worker_id,
        command.attempts,
    )
    sender = _StartedSender(rt, command.server_url, dialect.start_events(events))
    variables = _variables(command, rt.settings)
    ctx = ToolContext(
        execution_id=command.execution_id,
        step=command.step,
        command_id=command.command_id,
        worker_id=rt.settings.worker_id,
        server_url=command.server_url,
        variables=variables,
        render=partial(templating.render, variables=variables),
        # One map for the whole command: the pipeline adds each secret it resolves, so the
        # result, error and event paths below (which hold this ctx) all scrub them.
        secrets={},
        server=rt.plane.server_api(command.server_url),
        resources=rt.resources,
        settings=rt.settings,
        attempts=command.attempts,
        release_slot=lambda: _released_slot(rt, token),
    )
    kind = rt.metrics.kind_label(command.tool_kind)  # a metric label: bounded values only
    async with trio.open_nursery() as nursery:
        alarms = [rt.alarms.after(COALESCE_WINDOW, nursery, sender.send)]
        if dialect.heartbeat_interval is not None:
            interval = dialect.heartbeat_interval
            beats = partial(_heartbeats, rt, command.server_url, dialect, events, interval)
            alarms.append(rt.alarms.after(interval, nursery, beats))
        try:
            outcome = await _execute(rt, command, ctx)
        finally:
            for alarm in alarms:
                alarm.cancel()
        await sender.stop()
        nursery.cancel_scope.cancel()

    if isinstance(outcome, _Failure):
        _finished(rt, kind, "failed")
        error = rt.hooks.scrub_text(outcome.message, ctx)
        log.warning("command failed: %s", error, extra={"tool_kind": kind, "status": "failed"})
        batch = [*sender.pending(), *dialect.exception_events(events, error, outcome.error_type)]
        return await _report(rt, command, _scrubbed(rt, ctx, batch))
    return await _report_result(rt, command, ctx, dialect, events, sender, outcome)


async def _report_result(
    rt: Runtime,
    command: Command,
    ctx: ToolContext,
    dialect: Dialect,
    events: EventFactory,
    sender: _StartedSender,
    result: ToolResult,
) -> tuple[str, float]:
    kind = command.tool_kind
    failed = dialect.tool_failed(result, kind)
    reported: Reported | None = None
    if result.pending_callback:
        rt.metrics.skipped_pending_callback.labels(kind).inc()
    else:
        body = await rt.hooks.call_done_result(
            command,
            ctx,
            dialect.reported_value(result, failed),
            result.status,
            stage_shared_memory=dialect.stages_shared_memory,
        )
        reported = Reported(body)
    effect = await rt.hooks.after_result(command, ctx, result, events)
    pending = sender.pending()
    if effect.fail_message is not None:
        _finished(rt, kind, "failed")
        message = rt.hooks.scrub_text(effect.fail_message, ctx)
        log.warning("command failed: %s", message, extra={"tool_kind": kind, "status": "failed"})
        batch = dialect.case_failed_events(events, reported, result, message, effect.events, effect.warnings)
        # Single posts, not a batch: the Python server's batch route acts on one event only.
        return await _report(rt, command, _scrubbed(rt, ctx, [*pending, *batch]), batch_ok=False)
    _finished(rt, kind, result.status)
    if result.status != "success" or failed:
        error = rt.hooks.scrub_text(dialect.error_text(result), ctx)
        log.warning(
            "command finished: %s: %s",
            result.status,
            error,
            extra={"tool_kind": kind, "status": result.status},
        )
    else:
        log.info("command finished: %s", result.status, extra={"tool_kind": kind, "status": result.status})
    if failed:
        assert reported is not None  # a pending callback is never a failure
        batch = dialect.tool_error_events(events, reported, result, error, effect.events, effect.warnings)
    else:
        batch = dialect.success_events(events, reported, result, effect.events, effect.warnings)
    return await _report(rt, command, _scrubbed(rt, ctx, [*pending, *batch]))


def _scrubbed(rt: Runtime, ctx: ToolContext, batch: list[Event]) -> list[Event]:
    """Every terminal event scrubbed of the command's secrets, whichever path produced it."""
    scrub = getattr(rt.hooks, "scrub_payload", None)
    if scrub is None:
        return batch
    return [attrs.evolve(e, context=scrub(e.context, ctx)) for e in batch]


@attrs.frozen
class _Failure:
    message: str
    error_type: str | None = None


# Whether this command task has counted its outcome: a drain cancellation counts `cancelled` only
# for a command that had none yet (one cancelled while delivering its events already counted).
_outcome_counted: contextvars.ContextVar[bool] = contextvars.ContextVar("outcome_counted", default=False)


def _finished(rt: Runtime, kind: str, status: str) -> None:
    _outcome_counted.set(True)
    rt.metrics.command_finished(kind, status)


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    # A nursery inside the command wraps Cancelled in a group.
    return isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None


async def _execute(rt: Runtime, command: Command, ctx: ToolContext) -> ToolResult | _Failure:
    kind = command.tool_kind
    try:
        if not kind:
            raise ToolConfigError("command", "action", "missing: the claim answer names no tool kind")
        function = tools.resolve(kind)
        config, ctx = await rt.hooks.prepare(command, ctx)
        seconds = command.deadline_seconds(config, rt.settings.command_timeout)
        began = trio.current_time()
        with trio.move_on_after(seconds) as scope:
            result = await function(config, ctx)
        if scope.cancelled_caught:
            log.warning("command timed out after %.3gs", seconds)
            return ToolResult(
                "timeout",
                error=f"timed out after {seconds:g}s",
                duration_ms=int((trio.current_time() - began) * 1000),
            )
        if result.duration_ms is None:
            result = attrs.evolve(result, duration_ms=int((trio.current_time() - began) * 1000))
        return result
    except ToolError as exc:
        return _Failure(str(exc))
    except Exception as exc:  # a bug in a tool must not take the worker down
        log.exception("tool %s raised", kind)
        return _Failure(f"{type(exc).__name__}: {exc}", type(exc).__name__)


async def _report(
    rt: Runtime, command: Command, batch: list[Event], *, batch_ok: bool = True
) -> tuple[str, float]:
    """Deliver the terminal events; settle according to what the server said."""
    rt.lifecycle.reported(command, batch)
    with trio.move_on_after(TERMINAL_PATIENCE) as patience:
        try:
            if batch_ok:
                await rt.plane.emit(command.server_url, batch, policy=TERMINAL_RETRY)
            else:
                for event in batch:
                    await rt.plane.emit(command.server_url, [event], policy=TERMINAL_RETRY)
            return Settle.ACK, 0.0
        except HTTPStatusError as exc:
            # A final 4xx: the server will never take these events; redelivery cannot help.
            log.error("server refused the terminal events (HTTP %s): %s", exc.status, exc.body[:300])
            return Settle.ACK, 0.0
    assert patience.cancelled_caught
    log.error("terminal events not delivered within %.0fs; nak for redelivery", TERMINAL_PATIENCE)
    return Settle.NAK, 30.0


async def _heartbeats(
    rt: Runtime, server_url: str, dialect: Dialect, events: EventFactory, interval: float
) -> None:
    """``command.heartbeat`` every ``interval`` s while the tool runs (started by an alarm one
    interval in); a lost one is only logged (the server stores them, nothing depends on them)."""
    while True:
        try:
            await rt.plane.emit(server_url, [dialect.heartbeat(events)], policy=HEARTBEAT_RETRY)
        except ControlPlaneError as exc:
            log.debug("command heartbeat not delivered: %s", exc)
        await trio.sleep(interval)


@attrs.define(eq=False)
class _StartedSender:
    """Sends the start events on their own if the tool is still running after the window (an
    alarm calls :meth:`send` then)."""

    rt: Runtime
    server_url: str
    events: list[Event]
    state: str = "waiting"  # waiting | sending | sent | failed | stopped
    _done: trio.Event = attrs.field(factory=trio.Event)

    async def send(self) -> None:
        if self.state != "waiting":
            return  # the tool ended first: the events go with the terminal ones
        try:
            self.state = "sending"
            await self.rt.plane.emit(self.server_url, self.events, policy=EVENT_RETRY)
            self.state = "sent"
        except ControlPlaneError as exc:
            log.warning("start events not delivered (%s); they go with the terminal events", exc)
            self.state = "failed"
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Called when the tool is done: wait for a send in flight; one not begun never will."""
        if self.state == "waiting":
            self.state = "stopped"
        elif self.state == "sending":
            await self._done.wait()

    def pending(self) -> list[Event]:
        return [] if self.state == "sent" else list(self.events)


@asynccontextmanager
async def _released_slot(rt: Runtime, token: object) -> AsyncIterator[None]:
    """Give the execution slot back while a tool only waits on the server ("waiting is not
    working", docs/architecture.md)."""
    async with rt.waiting:
        rt.slots.release_on_behalf_of(token)
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await rt.slots.acquire_on_behalf_of(token)


HELD_CLAIM_FIRST_DELAY = 2.0
HELD_CLAIM_MAX_DELAY = 30.0
# ~35 minutes of asking: past the Python server's claim lease (120 s) and its healthy-worker hard
# timeout (1800 s), after which it hands a claim over; then the server's own reaper is the net.
HELD_CLAIM_MAX_DELIVERIES = 75


def held_claim_settle(outcome: AlreadyClaimed, delivered: int) -> tuple[str, float]:
    """How to settle a notification whose claim got 409.

    Terminal or cancelled: ack (stale notification; one request, no retry). Held by a live claim
    (``active_claim``): nak with a growing delay rather than ack. The holder may be a worker that
    was drained or killed mid-command — its claim is reclaimable once the server's lease has
    passed — and an ack here would drop the last notification of that command.
    """
    if outcome.code != "active_claim" or delivered >= HELD_CLAIM_MAX_DELIVERIES:
        return Settle.ACK, 0.0
    # The retry policy's schedule without jitter: JetStream spaces the redeliveries itself.
    backoff = RetryPolicy(initial=HELD_CLAIM_FIRST_DELAY, cap=HELD_CLAIM_MAX_DELAY).backoff(delivered)
    delay = max(backoff, min(outcome.retry_after or 0.0, HELD_CLAIM_MAX_DELAY))
    return Settle.NAK, min(delay, HELD_CLAIM_MAX_DELAY)


def pool_mismatch(settings: Settings, note: Notification) -> bool:
    return bool(
        settings.pool_segment and note.execution_pool and note.execution_pool != settings.pool_segment
    )
