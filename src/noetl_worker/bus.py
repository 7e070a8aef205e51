"""NATS JetStream adapter: the only module that imports nats-py.

nats-py is asyncio code; every call crosses the trio-asyncio bridge here (``aio_as_trio``), so the
rest of the worker sees a small trio API and only ``BusError``. Must be used inside
``trio_asyncio.open_loop()`` (``service.serve`` opens it at the root).

Intake without a fetch per message: the consumer's messages arrive on one subscription of our
own (an inbox, one reply subject per pull request) whose callback hands them to a trio channel,
and pull requests stay open at the server for as many messages as there are free slots
(``pull_credit.py`` keeps the count). A paced stream of commands then costs one pull request per
slot-full of messages, not a pull request, an asyncio future and a bridge crossing per message.
Pull requests expire after ``PULL_EXPIRES`` and are renewed, so an outage or a lost request is
noticed within seconds; the connection is drained in a shielded scope.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import attrs
import nats
import nats.errors
import nats.js.errors
import trio
import trio_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from .config import Settings
from .errors import BusError, describe
from .metrics import Metrics
from .pull_credit import PullCredit
from .retry import NATS_RECONNECT_WAIT, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

PULL_EXPIRES = 5.0  # a pull request waits at the server this long, then is renewed
PULL_BACKOFF = 0.5  # after the server refused a request (409, 503): wait before asking again
PUBLISH_WATCHDOG = 5.0
_MAX_BATCH = re.compile(r"MaxRequestBatch of (\d+)", re.IGNORECASE)

_NATS_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    asyncio.TimeoutError,
    TimeoutError,
    OSError,
    ConnectionError,
)


async def _call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run one nats-py coroutine from trio and translate its errors to BusError."""
    try:
        return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)  # type: ignore[no-any-return]
    except trio.Cancelled:
        raise
    except _NATS_ERRORS as exc:
        # publish_async can turn a cancellation into TooManyStalledMsgsError: re-check.
        await trio.lowlevel.checkpoint_if_cancelled()
        raise BusError(describe(exc)) from exc


async def _call_now(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Run a nats-py coroutine that normally finishes without ever suspending — ``publish`` and
    the acks built on it only append to the client's buffer and kick its flusher — right here in
    the trio task, instead of as an asyncio task across the bridge (a task, two futures and three
    trio scheduler passes per call, for every ack: docs/performance.md). One that does suspend
    (its outbound buffer over the limit, waiting for a flush) is finished as an asyncio task and
    awaited, as :func:`_call` would have from the start. Errors become BusError the same way."""
    coro = fn(*args)
    try:
        waiting_on = coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]  # StopIteration.value is Any
    except _NATS_ERRORS as exc:
        raise BusError(describe(exc)) from exc
    return await _call(_finish, coro, waiting_on)


async def _finish(coro: Any, waiting_on: Any) -> Any:
    """Drive a coroutine that suspended on its first step the way an asyncio task would: wait
    until what it yielded is done, resume it, repeat."""
    try:
        while True:
            if waiting_on is None:  # a bare yield (asyncio.sleep(0)): one turn of the loop
                await asyncio.sleep(0)
            else:
                await asyncio.wait([waiting_on])
            try:
                waiting_on = coro.send(None)
            except StopIteration as done:
                return done.value
    finally:
        coro.close()  # a no-op once it returned; cancelled while waiting: it is not resumed


@attrs.define(eq=False)
class Message:
    """One JetStream delivery. Settling (ack/nak/term) is idempotent: only the first counts."""

    _msg: Msg
    data: bytes
    subject: str
    num_delivered: int
    settled: bool = False

    async def ack(self) -> None:
        await self._settle(self._msg.ack)

    async def nak(self, delay: float | None = None) -> None:
        await self._settle(self._msg.nak, delay)

    async def term(self) -> None:
        await self._settle(self._msg.term)

    async def in_progress(self) -> None:
        if not self.settled:
            await _call_now(self._msg.in_progress)

    async def _settle(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self.settled:
            return
        self.settled = True
        await _call_now(fn, *args)


def _message(msg: Msg) -> Message:
    try:
        delivered = msg.metadata.num_delivered
    except Exception:  # not a JetStream delivery (no metadata in its reply subject)
        delivered = 1
    return Message(msg, msg.data, msg.subject, delivered)


def deliver_start(s: Settings) -> tuple[DeliverPolicy, datetime.datetime | None]:
    """Where a consumer the worker creates starts. By default ``NATS_DELIVER_WINDOW_SECONDS``
    back from now: a new durable next to a stream with hours of history would otherwise claim
    every stale notification in it, back to back (each a 409 ``already_terminal``)."""
    if s.deliver_policy == "by_start_time":
        now = datetime.datetime.now(datetime.UTC)
        return DeliverPolicy.BY_START_TIME, now - datetime.timedelta(seconds=s.deliver_window)
    return DeliverPolicy(s.deliver_policy), None


@attrs.frozen
class ConsumerLag:
    pending: int
    ack_pending: int


@attrs.define(eq=False)
class Bus:
    settings: Settings
    on_state_change: Callable[[], None] = lambda: None
    _nc: NatsClient | None = None
    _js: JetStreamContext | None = None
    _sub: Any = None  # nats-py Subscription on the pull inbox (``<inbox>.*``)
    _inbox: str = ""
    _pull_subject: str = ""
    _credit: PullCredit = attrs.field(factory=PullCredit)
    # Delivered messages (None: "credit changed, look again") from the subscription callback.
    _deliveries: Any = None  # trio.MemorySendChannel[Msg | None]
    _arrived: Any = None  # trio.MemoryReceiveChannel[Msg | None]
    _buffered: int = 0  # messages in the channel, not yet handed out
    _refused: str = ""  # the consumer is gone or unusable: the next fetch raises, the intake rebinds
    _pull_not_before: float = 0.0
    pulls_sent: int = 0  # pull requests sent since start (a paced stream sends few)
    ack_wait: float = 30.0
    bound: bool = False
    closing: bool = False
    metrics: Metrics | None = None
    # Reconnect backoff (nats-py's own is a fixed 0.5 s with one error line per attempt).
    _attempt: int = 0
    _last_error: str = ""
    reconnect_initial: float = 0.5
    reconnect_cap: float = 15.0

    @property
    def needs_connect(self) -> bool:
        """True before the first successful connect (later reconnects are nats-py's job)."""
        return self._nc is None

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self) -> None:
        """Connect (one attempt; the caller retries). Reconnects afterwards are automatic."""
        settings = self.settings

        async def error_cb(exc: Exception) -> None:
            text = describe(exc)
            if self._nc is not None and (self._nc.is_reconnecting or self._nc.is_connecting):
                # One line per reconnect step comes from reconnect_handler, naming this error.
                # (nats-py reports a failed attempt's error while the client is still
                # "connecting", before it goes back to "reconnecting".)
                self._last_error = text
                return
            log.warning("nats error: %s", text)

        async def disconnected_cb() -> None:
            self._connected_gauge(0)
            if not self.closing:
                log.warning("nats disconnected; reconnecting")
            self.on_state_change()

        async def reconnected_cb() -> None:
            log.info("nats reconnected after %d attempt(s)", self._attempt)
            self._attempt, self._last_error = 0, ""
            if self.metrics is not None:
                self.metrics.nats_reconnects.inc()
            self._connected_gauge(1)
            self.on_state_change()

        options: dict[str, Any] = {
            "servers": settings.nats.url.split(","),
            "name": f"noetl-worker {settings.worker_id}",
            "connect_timeout": 5,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": NATS_RECONNECT_WAIT,
            "ping_interval": 20,
            "max_outstanding_pings": 3,
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "reconnect_to_server_handler": self.reconnect_handler,
        }
        if settings.nats.user:
            options["user"] = settings.nats.user
            options["password"] = settings.nats.password
        self._nc = await _call(nats.connect, **options)
        self._js = self._nc.jetstream(timeout=5)
        self._connected_gauge(1)
        self.on_state_change()

    def reconnect_handler(self, servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        """nats-py asks before each reconnect attempt: which server, after how long. Capped
        exponential backoff with jitter, one log line per step naming the next delay."""
        self._attempt += 1
        if self._attempt == 1:
            delay = 0.0
        else:
            policy = RetryPolicy(initial=self.reconnect_initial, cap=self.reconnect_cap)
            delay = policy.delay(self._attempt - 1)
            log.warning(
                "NATS unreachable (%s); reconnect attempt %d in %.1fs",
                self._last_error or "connection lost",
                self._attempt,
                delay,
            )
        server = servers[(self._attempt - 1) % len(servers)] if servers else None
        return server, delay

    def _connected_gauge(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.nats_connected.set(value)

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusError("not connected")
        return self._js

    async def ensure_stream(self) -> None:
        """Create the stream when missing; an existing stream is used exactly as it is."""
        s = self.settings
        try:
            await _call(self.js.stream_info, s.stream)
            return
        except BusError as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                raise
        log.info("creating stream %s with subjects %s, %s.>", s.stream, s.subject, s.subject)
        config = StreamConfig(name=s.stream, subjects=[s.subject, f"{s.subject}.>"], storage=StorageType.FILE)
        try:
            await _call(self.js.add_stream, config)
        except BusError as exc:
            # Another worker or the server created it in between: fine, use theirs.
            if "already in use" not in str(exc):
                raise

    async def bind_consumer(self) -> None:
        """Bind the durable pull consumer, creating it (never modifying it) when missing."""
        s = self.settings
        self.bound = False
        try:
            info = await _call(self.js.consumer_info, s.stream, s.consumer)
        except BusError as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                raise
            filters = list(s.filter_subjects)
            policy, start = deliver_start(s)
            config = ConsumerConfig(
                durable_name=s.consumer,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=policy,
                opt_start_time=start,
                ack_wait=s.ack_wait,
                max_deliver=s.max_deliver,
                filter_subject=filters[0] if len(filters) == 1 else None,
                filter_subjects=filters if len(filters) > 1 else None,
                max_ack_pending=max(1000, s.max_concurrent * 4),
            )
            log.info(
                "creating consumer %s on %s filtering %s, delivering %s",
                s.consumer,
                s.stream,
                filters,
                f"from {start.isoformat()}" if start else s.deliver_policy,
            )
            info = await _call(self.js.add_consumer, s.stream, config)
        await self._stop_feed()
        await self._start_feed()
        self.ack_wait = float(info.config.ack_wait or 30.0)
        self.bound = True
        self.on_state_change()

    async def _start_feed(self) -> None:
        s = self.settings
        assert self._nc is not None
        self._deliveries, self._arrived = trio.open_memory_channel[Msg | None](math.inf)
        self._buffered, self._refused, self._pull_not_before = 0, "", 0.0
        self._credit.reset()
        self._credit.max_batch = None
        self._inbox = self._nc.new_inbox()
        # JetStream's pull API (the context has no domain or prefix of its own: ``$JS.API``).
        self._pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{s.stream}.{s.consumer}"
        self._sub = await _call(self._nc.subscribe, f"{self._inbox}.*", cb=self._on_delivery)

    async def _stop_feed(self) -> None:
        """End the pull inbox's subscription (the server drops requests nobody listens to any
        more) and hand back what was delivered and not taken: nak'd, so it is redelivered now
        rather than after ack_wait — messages already in the trio channel here, those still in
        nats-py's queue by the callback while the subscription drains."""
        sub, self._sub = self._sub, None
        arrived, self._arrived = self._arrived, None
        self._deliveries = None  # from here on the callback naks what it is given
        self._credit.reset()
        if sub is not None:
            with trio.move_on_after(5):
                try:
                    await _call(sub.drain)
                except BusError:
                    pass
        if arrived is not None:
            while True:
                try:
                    msg = arrived.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if msg is not None:
                    try:
                        await _call(msg.nak)
                    except BusError:
                        pass  # redelivered after ack_wait
        self._buffered = 0

    async def _on_delivery(self, msg: Msg) -> None:
        """nats-py's subscription callback (asyncio side, same thread): a data message goes to
        the trio channel; a status message ends the request it answers."""
        deliveries = self._deliveries
        status = msg.headers.get("Status") if msg.headers else None
        if deliveries is None:  # the feed is stopping: hand a message back, not to nobody
            if not status:
                try:
                    await msg.nak()
                except _NATS_ERRORS:
                    pass
            return
        if not status:
            self._credit.delivered()
            self._buffered += 1
            deliveries.send_nowait(msg)
            return
        if status == "100":  # idle heartbeat / flow control: not requested, nothing owed
            return
        seq = msg.subject.rsplit(".", 1)[-1]
        if seq.isdigit():
            self._credit.ended(int(seq))
        if status not in ("404", "408"):  # 404/408: the request ran out; anything else is news
            description = (msg.headers or {}).get("Description", "")
            self._refusal(status, description)
        deliveries.send_nowait(None)  # credit changed: a waiting fetch asks again

    def _refusal(self, status: str, description: str) -> None:
        text = f"pull request refused: {status} {description}".strip()
        lowered = description.lower()
        found = _MAX_BATCH.search(description)
        if found:
            self._credit.max_batch = max(1, int(found.group(1)))
        elif status == "503" or "deleted" in lowered or "push" in lowered:
            self._refused = text  # no consumer to pull from: rebind
        else:  # MaxWaiting, leadership change, …: ask again shortly
            log.debug("%s", text)
        self._pull_not_before = trio.current_time() + PULL_BACKOFF

    async def fetch(self, batch: int, timeout: float) -> list[Message]:
        """Up to ``batch`` messages, waiting up to ``timeout`` for the first; ``[]`` when none
        arrived. ``batch`` is what the caller can start now: pull requests are kept open for
        that many, less what is already owed or delivered."""
        if self._sub is None or self._arrived is None:
            raise BusError("consumer not bound")
        deadline = trio.current_time() + timeout
        out: list[Msg] = []
        while not out:
            self._check_refused()
            now = trio.current_time()
            if now >= deadline:
                return []
            await self._top_up(batch, now)
            wake = deadline
            credit_deadline = self._credit.next_deadline()
            if credit_deadline is not None:
                wake = min(wake, credit_deadline)
            if self._pull_not_before > now:
                wake = min(wake, self._pull_not_before)
            with trio.move_on_after(max(0.0, wake - now)):
                msg = await self._arrived.receive()
                if msg is not None:
                    self._buffered -= 1
                    out.append(msg)
        while len(out) < batch:
            try:
                msg = self._arrived.receive_nowait()
            except trio.WouldBlock:
                break
            if msg is not None:
                self._buffered -= 1
                out.append(msg)
        return [_message(m) for m in out]

    def _check_refused(self) -> None:
        if self._refused:
            text, self._refused = self._refused, ""
            self.bound = False  # the intake binds again (creating the consumer if it is gone)
            self.on_state_change()
            raise BusError(text)

    async def _top_up(self, free: int, now: float) -> None:
        assert self._nc is not None
        self._credit.expire(now)
        if now < self._pull_not_before:
            return
        want = self._credit.wanted(free, self._buffered)
        if want <= 0:
            return
        seq = self._credit.issue(want, now, PULL_EXPIRES)
        self.pulls_sent += 1
        request = json.dumps({"batch": want, "expires": int(PULL_EXPIRES * 1e9)}).encode()
        try:
            # A publish only appends to nats-py's buffer; the deadline is a watchdog, so a
            # stalled client cannot hold the intake past its own timeout.
            with trio.fail_after(PUBLISH_WATCHDOG):
                await _call_now(self._nc.publish, self._pull_subject, request, f"{self._inbox}.{seq}")
        except trio.TooSlowError:
            self._credit.ended(seq)
            raise BusError(f"a pull request could not be sent within {PUBLISH_WATCHDOG:g}s") from None
        except BusError:
            self._credit.ended(seq)
            raise

    async def consumer_lag(self) -> ConsumerLag:
        s = self.settings
        try:
            info = await _call(self.js.consumer_info, s.stream, s.consumer)
        except BusError as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                self.bound = False  # deleted under us: the intake rebinds
                self.on_state_change()
            raise
        return ConsumerLag(int(info.num_pending or 0), int(info.num_ack_pending or 0))

    async def publish(self, subject: str, data: bytes) -> None:
        """JetStream publish awaiting the stream's ack (demo, tests, benchmarks)."""
        await _call(self.js.publish, subject, data)

    async def close(self) -> None:
        """Drain and close; shielded so it completes during cancellation."""
        self.bound = False
        self.closing = True
        nc = self._nc
        if nc is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            # The pull inbox first: open requests die with it, and what was delivered but not
            # taken is nak'd for redelivery now.
            await self._stop_feed()
            self._nc, self._js = None, None
            try:
                await _call(nc.drain)
            except BusError as exc:
                log.debug("nats drain: %s", exc)
                try:
                    await _call(nc.close)
                except BusError:
                    pass
        self.on_state_change()


def install_exception_handler(loop: asyncio.AbstractEventLoop) -> None:
    """trio-asyncio's default handler re-raises into its nursery and kills the whole loop;
    a stray asyncio error (e.g. a never-retrieved future inside nats-py) must only log."""

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, asyncio.CancelledError):
            log.debug("asyncio: %s: cancelled", context.get("message", ""))
            return
        log.warning("asyncio: %s%s", context.get("message", ""), f": {exc!r}" if exc else "")

    loop.set_exception_handler(handler)
