"""The task tree: startup and shutdown order.

    serve(settings)                 trio_asyncio loop at the root; signals
    └── root nursery
        ├── http server             /metrics /healthz /readyz (stopped last)
        └── background nursery      heartbeat, lag poller (supervised)
            └── execution nursery   one task per command, bounded by the slots limiter
                └── intake          connect/bind (supervised), fetch ≤ free slots, start commands

SIGTERM/SIGINT: /readyz → 503; intake cancelled (fetched-but-unstarted messages nak'd); the
execution nursery gets a deadline of now + grace (commands still running then are cancelled and
nak'd); background tasks stop; deregister; NATS drained; the http server stops; exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import attrs
import trio
import trio_asyncio

from . import __version__, memory, procs
from .bus import Bus, Message, install_exception_handler
from .config import Settings
from .control_plane import ControlPlane
from .dialect import HEALTH_PATH, PROBE_TIMEOUT, Dialects
from .dispatch import Hooks, Runtime, handle_message, pool_mismatch
from .errors import BusError, ControlPlaneError, HTTPStatusError, NotificationError
from .event_stream import EventHub, Lifecycle
from .http_server import BindError, make_app, serve_http
from .metrics import Metrics
from .notification import parse_notification
from .origins import ServerURLError, check_allowed
from .retry import Backoff
from .snowflake import SnowflakeGenerator
from .tools.base import ToolResources

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 5.0  # long poll when idle; short so outages are noticed and the loop re-checks
MAX_BURST = 64  # messages asked for at once, at most
# /readyz turns 503 when the intake loop has not gone round for this long. It goes round at least
# every FETCH_TIMEOUT (plus the pull request's send watchdog) when idle, and while every slot is
# busy with a running command it counts as alive; only a stuck loop or slots held by nothing
# trips it.
INTAKE_STALL_BOUND = 60.0
SLOT_WAIT_TICK = 5.0
HEALTH_MAX_BYTES = 64 * 1024  # a health answer is a few hundred bytes; the probe reads no more


@attrs.define(eq=False)
class WorkerState:
    """What /readyz reports, and the moving parts the tests look at."""

    heartbeat_interval: float
    draining: bool = False
    registered: bool = False
    last_heartbeat: float | None = None  # trio time of the last accepted heartbeat/registration
    bus: Bus | None = None
    urls: list[str] = attrs.field(factory=list)
    runtime: Runtime | None = None
    events: EventHub | None = None  # GET /events, when WORKER_EVENTS_STREAM is on
    stop: trio.Event = attrs.field(factory=trio.Event)
    started: trio.Event = attrs.field(factory=trio.Event)
    ready: trio.Event = attrs.field(factory=trio.Event)  # set the first time /readyz turns 200
    intake_beat: float | None = None  # trio time the intake last went round its loop
    intake_stall_bound: float = INTAKE_STALL_BOUND

    def intake_alive(self) -> None:
        self.intake_beat = trio.current_time()

    def readiness(self) -> tuple[bool, str]:
        if self.draining or self.stop.is_set():
            return False, "draining"
        if self.bus is None or not self.bus.connected:
            return False, "nats not connected"
        if not self.bus.bound:
            return False, "consumer not bound"
        if self.last_heartbeat is None:
            return False, "not registered with the server"
        if trio.current_time() - self.last_heartbeat > max(3 * self.heartbeat_interval, 30.0):
            return False, "no heartbeat accepted recently"
        if self.intake_beat is not None and trio.current_time() - self.intake_beat > self.intake_stall_bound:
            return False, f"intake has not run for over {self.intake_stall_bound:g}s"
        return True, "ready"


async def supervise(name: str, fn: Callable[[], Awaitable[None]], metrics: Metrics) -> None:
    """Restart a long-lived child after an error (never after cancellation)."""
    backoff = Backoff(0.5, 30.0)
    while True:
        try:
            await fn()
            return
        except Exception:
            metrics.restarts.labels(name).inc()
            delay = backoff.next()
            log.exception("%s failed; restarting in %.1fs", name, delay)
            await trio.sleep(delay)


async def _health(plane: Any, server_url: str) -> tuple[int, bytes]:
    """``GET /api/health`` for the dialect probe (one attempt; the probe decides what a failure means)."""
    response = await plane.request(
        "GET", server_url, HEALTH_PATH, timeout=PROBE_TIMEOUT, hot=True, max_body=HEALTH_MAX_BYTES
    )
    return response.status, response.body


async def serve(
    settings: Settings,
    *,
    state: WorkerState | None = None,
    hooks: Hooks | None = None,
    handle_signals: bool = True,
    bus: Any = None,
    plane: Any = None,
    http: bool = True,
    settle: bool = False,
) -> int:
    """Run the worker until SIGTERM/SIGINT (or ``state.stop``); returns the exit code.

    ``bus`` and ``plane`` replace the NATS and HTTP adapters (tests run the whole tree against
    in-memory fakes under a MockClock, with ``http=False`` since a MockClock must never meet a
    real socket). ``settle``: freeze the start-up heap once ready (``memory.settle``; the worker
    process does, an embedding host decides for its own heap).
    """
    state = state or WorkerState(settings.heartbeat_interval)
    async with AsyncExitStack() as stack:
        metrics = Metrics()
        metrics.concurrency_limit.labels(settings.pool_name).set(settings.max_concurrent)
        if bus is None:
            loop = await stack.enter_async_context(trio_asyncio.open_loop())
            install_exception_handler(loop)
            bus = Bus(settings, on_state_change=lambda: _update_ready(state, metrics), metrics=metrics)
        if plane is None:
            plane = await stack.enter_async_context(ControlPlane.open(settings, metrics))
        state.bus = bus
        if hooks is None:
            # Imported here: the pipeline pulls in the results/credentials modules (and, lazily,
            # pyarrow), which tests with their own hooks do not need.
            from .pipeline import Pipeline

            hooks = Pipeline.create(settings, metrics)
        rt = Runtime(
            settings=settings,
            plane=plane,
            metrics=metrics,
            ids=SnowflakeGenerator(settings.snowflake_node_id, settings.snowflake_epoch_ms),
            resources=ToolResources(metrics=metrics),
            hooks=hooks,
            slots=trio.CapacityLimiter(settings.max_concurrent),
            waiting=trio.CapacityLimiter(settings.max_waiting),
            ack_wait=lambda: float(bus.ack_wait),
            dialects=Dialects(settings.server_dialect, fetch=partial(_health, plane)),
        )
        if settings.events_stream:
            state.events = EventHub(metrics)
            rt.lifecycle = Lifecycle(state.events, settings.worker_id)
        state.runtime = rt
        log.info(
            "noetl-worker %s starting",
            __version__,
            extra={
                "version": __version__,
                "pool": settings.pool_name,
                "server_url": settings.server_url,
                "nats_url": settings.nats.url,
                "stream": settings.stream,
                "consumer": settings.consumer,
                "filter": ",".join(settings.filter_subjects),
                "max_concurrent": settings.max_concurrent,
                "snowflake_node_id": settings.snowflake_node_id,
                "keychain_env_vars": ",".join(settings.keychain_env_vars),
            },
        )
        try:
            await _run_tree(settings, state, rt, bus, metrics, handle_signals, http, settle)
        finally:
            with trio.CancelScope(shield=True):
                await rt.resources.aclose()
                await bus.close()
                if hasattr(hooks, "aclose"):
                    await hooks.aclose()
    log.info("noetl-worker stopped")
    return 0


def _update_ready(state: WorkerState, metrics: Metrics) -> None:
    ready = state.readiness()[0]
    metrics.ready.set(1 if ready else 0)
    if ready:
        state.ready.set()


async def _run_tree(
    settings: Settings,
    state: WorkerState,
    rt: Runtime,
    bus: Bus,
    metrics: Metrics,
    handle_signals: bool,
    http: bool,
    settle: bool,
) -> None:
    app = make_app(metrics, state.readiness, state.events)
    http_stop = trio.Event()
    async with trio.open_nursery() as root:
        if http:
            state.urls = await root.start(serve_http, app, settings.metrics_bind, http_stop)
            log.info("metrics and probes on %s", ", ".join(state.urls))
        signals = trio.CancelScope()
        if handle_signals:
            root.start_soon(_watch_signals, state, signals)
        async with trio.open_nursery() as background:
            background.start_soon(supervise, "heartbeat", lambda: _heartbeat(rt, state), metrics)
            background.start_soon(supervise, "lag-poller", lambda: _lag_poller(rt, bus), metrics)
            background.start_soon(_ready_gauge, state, metrics)
            if settle:
                background.start_soon(memory.settle_when_ready, state.ready)
            # Outlives the execution nursery: commands draining still have their timers.
            background.start_soon(supervise, "alarms", rt.alarms.run, metrics)
            procs.launcher()  # started now, so the first shell step does not wait for it
            background.start_soon(
                supervise,
                "memory-trim",
                lambda: memory.trim_when_quiet(lambda: rt.started, lambda: len(rt.running)),
                metrics,
            )
            if procs.is_reaper():  # PID 1 or a subreaper: adopted orphans' zombies are ours
                background.start_soon(supervise, "reaper", procs.reap_adopted, metrics)
            maintain = getattr(rt.hooks, "maintain", None)
            if maintain is not None:
                background.start_soon(supervise, "maintenance", maintain, metrics)
            async with trio.open_nursery() as execution:
                async with trio.open_nursery() as intake:
                    intake.start_soon(
                        supervise, "intake", lambda: _intake(rt, bus, execution, state), metrics
                    )
                    state.started.set()
                    await state.stop.wait()
                    state.draining = True
                    _update_ready(state, metrics)
                    log.info(
                        "shutting down: intake stopped, draining %d running command(s) for up to %gs",
                        len(rt.running),
                        settings.shutdown_grace,
                    )
                    intake.cancel_scope.cancel()
                execution.cancel_scope.deadline = trio.current_time() + settings.shutdown_grace
            if execution.cancel_scope.cancelled_caught:
                log.warning("drain deadline reached: running commands were cancelled and nak'd")
            background.cancel_scope.cancel()
        with trio.move_on_after(5) as scope:
            try:
                await rt.plane.deregister()
                log.info("deregistered from %s", settings.server_url)
            except ControlPlaneError as exc:
                log.warning("deregistration failed: %s", exc)
        if scope.cancelled_caught:
            log.warning("deregistration timed out")
        await bus.close()
        http_stop.set()
        # The signal watcher loops forever; once drained, a further signal has nothing to stop.
        signals.cancel()


async def _watch_signals(state: WorkerState, scope: trio.CancelScope) -> None:
    with scope, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if state.stop.is_set():
                log.warning("second %s: already draining", signal.Signals(signum).name)
                continue
            log.info("received %s", signal.Signals(signum).name)
            state.stop.set()


async def _ready_gauge(state: WorkerState, metrics: Metrics) -> None:
    while True:
        _update_ready(state, metrics)
        await trio.sleep(1.0)


async def _heartbeat(rt: Runtime, state: WorkerState) -> None:
    """Register (retrying while the server is down), then beat; re-register on 404."""
    backoff = Backoff(0.5, 15.0)
    while True:
        try:
            if not state.registered:
                await rt.plane.register(getattr(rt.hooks, "public_key_b64", None))
                state.registered = True
                log.info("registered with %s as %s", rt.settings.server_url, rt.settings.worker_id)
            else:
                await rt.plane.heartbeat()
            state.last_heartbeat = trio.current_time()
            _update_ready(state, rt.metrics)
            backoff.reset()
            delay = rt.settings.heartbeat_interval
        except HTTPStatusError as exc:
            if exc.status == 404:
                log.warning("server does not know this worker (404 on heartbeat); registering again")
                state.registered = False
                delay = 0.0
            else:
                delay = min(backoff.next(), rt.settings.heartbeat_interval)
                log.warning("heartbeat/registration failed: %s; retrying in %.1fs", exc, delay)
        except ControlPlaneError as exc:
            delay = min(backoff.next(), rt.settings.heartbeat_interval)
            log.warning("heartbeat/registration failed: %s; retrying in %.1fs", exc, delay)
        await trio.sleep(delay)


async def _lag_poller(rt: Runtime, bus: Bus) -> None:
    # The gauges exist only while a poll has answered: absent (not 0) before the first answer and
    # after a failed one, so "no data" never reads as "no backlog".
    s = rt.settings
    gauges = (rt.metrics.consumer_pending, rt.metrics.consumer_ack_pending)
    while True:
        known = False
        # Not while NATS is unreachable: the reconnect lines already say so, one per backoff step.
        if bus.bound and bus.connected:
            try:
                lag = await bus.consumer_lag()
                rt.metrics.consumer_pending.labels(s.stream, s.consumer).set(lag.pending)
                rt.metrics.consumer_ack_pending.labels(s.stream, s.consumer).set(lag.ack_pending)
                known = True
            except BusError as exc:
                # a poll that started just before an outage fails with it: the outage is logged
                (log.warning if bus.connected else log.debug)("consumer lag poll failed: %s", exc)
        if not known:
            for gauge in gauges:
                with contextlib.suppress(KeyError):
                    gauge.remove(s.stream, s.consumer)
        await trio.sleep(s.lag_poll_interval)


async def _intake(rt: Runtime, bus: Bus, execution: trio.Nursery, state: WorkerState) -> None:
    """Connect and bind (retrying with backoff), then fetch and start commands."""
    backoff = Backoff(0.25, 10.0)
    while True:
        state.intake_alive()
        try:
            if bus.needs_connect:
                await bus.connect()
                log.info("connected to NATS %s", rt.settings.nats.url)
            if not bus.bound:
                await bus.ensure_stream()
                await bus.bind_consumer()
                _update_ready(state, rt.metrics)
                log.info(
                    "consumer %s bound on stream %s (ack_wait %gs)",
                    rt.settings.consumer,
                    rt.settings.stream,
                    bus.ack_wait,
                )
            backoff.reset()
            await _fetch_loop(rt, bus, execution, state)
        except BusError as exc:
            delay = backoff.next()
            log.warning("NATS: %s; retrying in %.1fs", exc, delay)
            bus.bound = bus.bound and bus.connected
            await trio.sleep(delay)


async def _take_slot(rt: Runtime, state: WorkerState, token: object) -> None:
    """Wait for a free execution slot. While every taken slot belongs to a running command the
    wait is healthy back-pressure and the intake counts as alive; slots held by nothing (a leak)
    let /readyz turn not-ready instead of hiding behind it."""
    while True:
        with trio.move_on_after(SLOT_WAIT_TICK):
            await rt.slots.acquire_on_behalf_of(token)
            return
        if rt.slots.borrowed_tokens <= len(rt.running):
            state.intake_alive()


async def _fetch_loop(rt: Runtime, bus: Bus, execution: trio.Nursery, state: WorkerState) -> None:
    # Ask for as many messages as can start now (the bus keeps pull requests open for that
    # many, so a paced stream needs no request per message), start each as it arrives.
    # Slot tokens in ``tokens`` belong to this loop and are given back in ``finally``; a token
    # passes to a command task only once ``_start`` has started it.
    while bus.bound:
        state.intake_alive()
        first = object()
        await _take_slot(rt, state, first)
        tokens = [first]
        messages: list[Message] = []
        try:
            free = min(int(rt.slots.available_tokens) + 1, MAX_BURST)
            messages = await bus.fetch(free, timeout=FETCH_TIMEOUT)
            received_at = trio.current_time()
            state.intake_alive()
            while messages:
                msg = messages[0]
                if not tokens:
                    token = object()
                    await _take_slot(rt, state, token)
                    tokens.append(token)
                token = tokens.pop()
                try:
                    started = await _start(rt, msg, token, execution, received_at)
                except BaseException:
                    tokens.append(token)
                    raise
                messages.pop(0)
                if not started:
                    tokens.append(token)
        finally:
            for token in tokens:
                rt.slots.release_on_behalf_of(token)
            if messages:
                # Fetched but not started (intake stopping, or an error): let another worker have them.
                with trio.CancelScope(shield=True):
                    for msg in messages:
                        await _settle_quietly(msg, "nak")


async def _settle_quietly(msg: Message, how: str) -> None:
    """ack/nak/term that never raises: the message's fate is then JetStream's redelivery."""
    try:
        with trio.move_on_after(10):
            await getattr(msg, how)()
    except Exception as exc:
        log.debug("could not %s a message: %s: %s", how, type(exc).__name__, exc)


async def _start(
    rt: Runtime, msg: Message, token: object, execution: trio.Nursery, received_at: float
) -> bool:
    """Start a command task for ``msg`` (it then owns ``token``); False when settled here.

    Never raises (but cancellation): whatever goes wrong while looking at one message terms that
    message and leaves the intake running — one bad message must not stop the worker.
    """
    try:
        return await _admit(rt, msg, token, execution, received_at)
    except Exception as exc:
        rt.metrics.poison.inc()
        log.warning(
            "terminating a message on %s that could not be started: %s: %s",
            getattr(msg, "subject", "?"),
            type(exc).__name__,
            str(exc)[:300],
        )
        await _settle_quietly(msg, "term")
        return False


async def _admit(
    rt: Runtime, msg: Message, token: object, execution: trio.Nursery, received_at: float
) -> bool:
    try:
        note = parse_notification(msg.data)
    except NotificationError as exc:
        rt.metrics.poison.inc()
        log.warning(
            "terminating a malformed notification on %s (delivery %d): %s; payload: %r",
            msg.subject,
            msg.num_delivered,
            exc,
            msg.data[:300],
        )
        await _settle_quietly(msg, "term")
        return False
    fields = {"execution_id": note.execution_id, "command_id": note.command_id}
    try:
        check_allowed(note.server_url or rt.settings.server_url, rt.settings.server_url_allowlist)
    except ServerURLError as exc:
        rt.metrics.server_url_rejected.inc()
        log.warning(
            "terminating a notification whose server_url is refused (%s); no request goes there",
            exc,
            extra=fields,
        )
        await _settle_quietly(msg, "term")
        return False
    if pool_mismatch(rt.settings, note):
        rt.metrics.skipped.labels("other_pool").inc()
        log.info(
            "skipping a command for pool %s (this worker serves %s)",
            note.execution_pool,
            rt.settings.pool_segment,
            extra=fields,
        )
        await _settle_quietly(msg, "ack")
        return False
    if note.event_id in rt.running:
        rt.metrics.skipped.labels("duplicate").inc()
        log.info(
            "second delivery of a command already running here; acked without running it again",
            extra=fields,
        )
        await _settle_quietly(msg, "ack")
        return False

    async def task() -> None:
        try:
            await handle_message(rt, msg, note, token, received_at)
        except Exception:
            # handle_message settles on every path it knows; this keeps a bug in it from
            # taking the execution nursery (and so the whole worker) down.
            log.exception("command task failed; JetStream redelivers the message after ack_wait")
        finally:
            rt.running.discard(note.event_id)
            rt.slots.release_on_behalf_of(token)

    # No await between these two lines: the task owns the token from here on.
    rt.running.add(note.event_id)
    rt.started += 1
    execution.start_soon(task)
    return True


def run(settings: Settings, **kwargs: Any) -> int:
    """Run the worker; exit code 2 (one line, no traceback) when the metrics port is taken."""
    try:
        return trio.run(lambda: serve(settings, settle=True, **kwargs))
    except BaseExceptionGroup as group:
        bind_errors = group.split(BindError)[0]
        if bind_errors is None:
            raise
        error = bind_errors.exceptions[0]
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        log.error("%s", error)
        return 2
    except BindError as exc:
        log.error("%s", exc)
        return 2
