"""The only module that speaks the NoETL server's HTTP API.

- The requests every worker makes all the time — claims, event batches, registration,
  heartbeats — take the lean keep-alive HTTP/1.1 path of ``_wire``; the rest (credentials,
  result storage, anything with query parameters) goes through one ``httpx.AsyncClient`` for
  the process, opened on first use, keep-alive sized to the concurrency. JSON is encoded once
  by us and sent as bytes.
- Every request has a *total* trio deadline (httpx timeouts are per I/O operation).
- Retries only where they can help: transport errors, 408, 425, 429, 5xx — honouring
  ``Retry-After`` (seconds or an HTTP date) — on the schedule of ``retry.RetryPolicy`` (capped
  exponential, equal jitter). Other 4xx are final.
- httpx exceptions never leave this module: ``TransportError`` / ``HTTPStatusError``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import orjson
import trio

from ._wire import BodyTooLarge, Wire, WireError
from .config import Settings, normalize_server_url
from .dialect import conflict_details  # the two servers' 409 bodies
from .errors import ControlPlaneError, HTTPStatusError, TransportError
from .events import Event
from .jsonlimits import JSONLimitError, loads_bounded
from .metrics import Metrics
from .origins import ServerURLError, check_allowed

# Re-exported: callers name the policies where they call the control plane.
from .retry import CLAIM_RETRY as CLAIM_RETRY
from .retry import EVENT_RETRY as EVENT_RETRY
from .retry import ONCE as ONCE
from .retry import RetryPolicy as RetryPolicy
from .retry import parse_retry_after

__all__ = ["BodyTooLarge", "ControlPlane"]  # BodyTooLarge: ``request(max_body=…)`` past the limit

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0  # total, per attempt


@attrs.frozen
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


def dumps(value: Any) -> bytes:
    # orjson: ~6 µs for a three-event batch where json takes ~37 µs; json for what it refuses.
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


# ---- claim outcomes -------------------------------------------------------------------------


@attrs.frozen
class Claimed:
    command: dict[str, Any]


@attrs.frozen
class AlreadyClaimed:
    """409: another worker holds it, or it is terminal / cancelled."""

    code: str
    message: str
    holder: str | None = None  # the worker holding the claim, when the server says
    retry_after: float | None = None


@attrs.frozen
class InvalidAnswer:
    """A 2xx claim answer that is not a command (not UTF-8 / JSON / an object, too deep, too
    large). Redelivery would get the same answer: report command.failed and terminate."""

    reason: str


@attrs.frozen
class NotFound:
    """404: the server does not know the command. Report it and terminate the message."""

    message: str


@attrs.frozen
class Rejected:
    """Another 4xx: final. Report command.failed and ack."""

    status: int
    message: str


@attrs.frozen
class RetryLater:
    """Server busy or unreachable after in-process retries: nak with a delay."""

    reason: str
    delay: float


ClaimOutcome = Claimed | AlreadyClaimed | NotFound | Rejected | RetryLater | InvalidAnswer

CLAIM_MAX_DEPTH = 256  # deeper answers are refused before parsing (RecursionError otherwise)


def parse_claim_answer(body: bytes, max_bytes: int) -> dict[str, Any]:
    """The claim answer as a JSON object; raises JSONLimitError naming what is wrong."""
    command = loads_bounded(body, max_bytes=max_bytes, max_depth=CLAIM_MAX_DEPTH, what="claim answer")
    if not isinstance(command, dict):
        raise JSONLimitError(f"claim answer is not a JSON object (got {type(command).__name__})")
    return command


def holder_of(body: bytes) -> str | None:
    """The worker id a Python-server 409 names (``detail.worker_id``), if any."""
    try:
        payload = json.loads(body[:4096]) if body and len(body) <= 4096 else None
    except (ValueError, RecursionError):
        return None
    detail = payload.get("detail") if isinstance(payload, dict) else None
    holder = detail.get("worker_id") if isinstance(detail, dict) else None
    return holder if isinstance(holder, str) and holder else None


class ServerNotAllowed(ControlPlaneError):
    """The URL's origin is not in NOETL_SERVER_URL_ALLOWLIST: no request was sent."""


# ---- the client -----------------------------------------------------------------------------


@attrs.define(eq=False)
class ControlPlane:
    settings: Settings
    metrics: Metrics
    # The lean keep-alive path for the requests a worker makes all the time: claims, events,
    # registration and heartbeats. An idle worker makes only those.
    wire: Wire = attrs.field(factory=Wire)
    headers: dict[str, str] = attrs.field(factory=dict)
    pool_size: int = 8
    # httpx for everything else (credentials, results, parameters), opened on first use: its
    # TLS context alone (the CA bundle) is ~2.4 MiB of resident memory an idle worker never uses.
    _client: httpx.AsyncClient | None = None
    # Servers that answered 404/405 to /api/events/batch: single events from then on.
    _no_batch: set[str] = attrs.field(factory=set)
    _allowed_bases: set[str] = attrs.field(factory=set)

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, metrics: Metrics) -> AsyncIterator[ControlPlane]:
        size = max(4, settings.max_concurrent * 2 + 2)
        headers = {"user-agent": "noetl-worker-py", "content-type": "application/json"}
        if settings.internal_api_token:
            headers["authorization"] = f"Bearer {settings.internal_api_token}"
        wire = Wire(headers=[(k.encode(), v.encode()) for k, v in headers.items()], max_idle=size)
        plane = cls(settings, metrics, wire, headers, size)
        try:
            yield plane
        finally:
            with trio.CancelScope(shield=True):
                await wire.aclose()
                if plane._client is not None:
                    await plane._client.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            size = self.pool_size
            self._client = httpx.AsyncClient(
                headers=self.headers,
                timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=5.0),
                limits=httpx.Limits(
                    max_connections=size, max_keepalive_connections=size, keepalive_expiry=30
                ),
                follow_redirects=False,
            )
        return self._client

    def base(self, server_url: str | None) -> str:
        return normalize_server_url(server_url) if server_url else self.settings.server_url

    async def request(
        self,
        method: str,
        server_url: str | None,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
        hot: bool = False,
        max_body: int | None = None,
    ) -> Response:
        """One attempt. Raises TransportError (or ``BodyTooLarge`` past ``max_body`` bytes on
        the ``hot`` path); returns any HTTP status. ``hot`` requests (claim, events) take the
        lean keep-alive path; everything else goes through httpx."""
        base = self.checked_base(server_url)
        url = base + path
        content = raw if raw is not None else dumps(body) if body is not None else None
        try:
            with trio.fail_after(timeout):
                if hot and params is None:
                    w = await self.wire.request(
                        method, base, path, body=content or b"", headers=headers, max_body=max_body
                    )
                    return Response(w.status, w.body, w.headers)
                r = await self.client.request(method, url, content=content, params=params, headers=headers)
        except trio.TooSlowError:
            raise TransportError(f"{method} {url}: no answer within {timeout:g}s") from None
        except WireError as exc:
            raise TransportError(f"{method} {url}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        return Response(r.status_code, r.content, r.headers)

    def checked_base(self, server_url: str | None) -> str:
        """The base URL, refused (ServerNotAllowed) outside the allowlist. The intake already
        terms such notifications; this keeps the token from going there by any other path."""
        base = self.base(server_url)
        if base not in self._allowed_bases:
            try:
                check_allowed(base, self.settings.server_url_allowlist)
            except ServerURLError as exc:
                raise ServerNotAllowed(f"{base}: {exc}") from None
            if len(self._allowed_bases) < 1024:
                self._allowed_bases.add(base)
        return base

    async def call(
        self,
        method: str,
        server_url: str | None,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        policy: RetryPolicy = ONCE,
        on_retry: Any = None,
        hot: bool = False,
    ) -> Response:
        """Request with retries for retryable failures; a non-2xx final answer raises."""
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                response = await self.request(
                    method, server_url, path, body=body, raw=raw, params=params, headers=headers, hot=hot
                )
            except TransportError:
                if attempt >= policy.attempts:
                    raise
                error: Exception | None = None
            else:
                if 200 <= response.status < 300:
                    return response
                error = HTTPStatusError(
                    response.status,
                    response.body.decode(errors="replace"),
                    retry_after=response.retry_after,
                )
                if not error.retryable or attempt >= policy.attempts:
                    raise error
                retry_after = response.retry_after
            if on_retry is not None:
                on_retry()
            delay = policy.delay(attempt, retry_after)
            log.debug("retrying %s %s in %.2fs (attempt %d): %s", method, path, delay, attempt, error)
            await trio.sleep(delay)

    # ---- commands ----

    async def claim(self, server_url: str | None, event_id: int) -> ClaimOutcome:
        path = f"/api/commands/{event_id}/claim"
        body = {"worker_id": self.settings.worker_id}
        attempt = 0
        while True:
            attempt += 1
            try:
                r = await self.request(
                    "POST", server_url, path, body=body, hot=True, max_body=self.settings.claim_max_bytes
                )
            except BodyTooLarge as exc:
                self.metrics.pulls.labels("failed").inc()
                return InvalidAnswer(f"claim answer: {exc}")
            except TransportError as exc:
                reason, retry_after = str(exc), None
            else:
                if r.status in (200, 201):
                    try:
                        command = parse_claim_answer(r.body, self.settings.claim_max_bytes)
                    except JSONLimitError as exc:
                        self.metrics.pulls.labels("failed").inc()
                        return InvalidAnswer(str(exc))
                    self.metrics.pulls.labels("claimed").inc()
                    return Claimed(command)
                if r.status == 409:
                    self.metrics.pulls.labels("already_claimed").inc()
                    code, message = conflict_details(r.body)
                    return AlreadyClaimed(code, message, holder_of(r.body), r.retry_after)
                if r.status == 404:
                    self.metrics.pulls.labels("failed").inc()
                    return NotFound(r.body.decode(errors="replace")[:500])
                if not HTTPStatusError(r.status, "").retryable:
                    self.metrics.pulls.labels("failed").inc()
                    return Rejected(r.status, r.body.decode(errors="replace")[:500])
                self.metrics.pulls.labels("retry_later").inc()
                reason, retry_after = f"HTTP {r.status}", r.retry_after
            if attempt >= CLAIM_RETRY.attempts:
                # Let JetStream redeliver later (to us or another worker) rather than spin here.
                return RetryLater(reason, min(30.0, max(retry_after or 0.0, 1.0 * attempt)))
            await trio.sleep(CLAIM_RETRY.delay(attempt, retry_after))

    # ---- events ----

    async def emit(
        self, server_url: str | None, events: Sequence[Event], *, policy: RetryPolicy = EVENT_RETRY
    ) -> None:
        """Deliver events in order: one ``/api/events/batch`` call when there are several and the
        server supports it, else one ``/api/events`` call each. Event ids (and the batch's
        Idempotency-Key) stay the same on every retry."""
        if not events:
            return
        base = self.base(server_url)
        if len(events) > 1 and base not in self._no_batch:
            with self._timed(events[-1].event_type):
                try:
                    await self._emit_batch(base, events, policy)
                    return
                except HTTPStatusError as exc:
                    if exc.status not in (404, 405):
                        raise
                    log.info("server %s has no /api/events/batch; sending events one by one", base)
                    self._no_batch.add(base)
        for event in events:
            with self._timed(event.event_type):
                await self.call(
                    "POST",
                    base,
                    "/api/events",
                    body=event.to_json(),
                    policy=policy,
                    on_retry=self.metrics.emit_retries.labels(event.event_type).inc,
                    hot=True,
                )

    async def _emit_batch(self, base: str, events: Sequence[Event], policy: RetryPolicy) -> None:
        first = events[0]
        body = {
            "execution_id": str(first.execution_id),
            "worker_id": first.worker_id,
            "events": [e.to_batch_item() for e in events],
        }
        key = f"{first.worker_id}:{first.execution_id}:{uuid.uuid4().hex}"
        await self.call(
            "POST",
            base,
            "/api/events/batch",
            body=body,
            headers={"idempotency-key": key},
            policy=policy,
            on_retry=self.metrics.emit_retries.labels(events[-1].event_type).inc,
            hot=True,
        )

    @attrs.define
    class _Timer:
        histogram: Any
        start: float = 0.0

        def __enter__(self) -> None:
            self.start = trio.current_time()

        def __exit__(self, *exc: object) -> None:
            self.histogram.observe(trio.current_time() - self.start)

    def _timed(self, event_type: str) -> ControlPlane._Timer:
        return ControlPlane._Timer(self.metrics.emit_duration.labels(event_type))

    # ---- runtime registry (always against NOETL_SERVER_URL) ----

    def registration(self, public_key_b64: str | None = None) -> dict[str, Any]:
        s = self.settings
        runtime: dict[str, Any] = {
            "kind": "python",
            "implementation": "noetl-worker-py",
            "capacity": s.max_concurrent,
        }
        if public_key_b64:
            runtime["worker_public_key"] = public_key_b64
        return {
            "name": s.worker_id,
            "component_type": "worker_pool",
            "runtime": runtime,
            "status": "ready",
            "capacity": s.max_concurrent,
            "hostname": s.hostname,
            "labels": {"pool_name": s.pool_name, "nats_consumer": s.consumer},
        }

    async def register(self, public_key_b64: str | None = None) -> None:
        await self.call(
            "POST", None, "/api/worker/pool/register", body=self.registration(public_key_b64), hot=True
        )

    async def heartbeat(self) -> None:
        await self.call(
            "POST", None, "/api/worker/pool/heartbeat", body={"name": self.settings.worker_id}, hot=True
        )

    async def deregister(self) -> None:
        body = {"name": self.settings.worker_id, "component_type": "worker_pool"}
        try:
            await self.call("POST", None, "/api/worker/pool/deregister", body=body, hot=True)
        except HTTPStatusError as exc:
            if exc.status != 405:
                raise
            # The Rust server only routes DELETE.
            await self.call("DELETE", None, "/api/worker/pool/deregister", body=body, hot=True)

    def server_api(self, server_url: str | None) -> BoundServer:
        return BoundServer(self, self.base(server_url))


@attrs.frozen
class BoundServer:
    """``tools.base.ServerAPI`` bound to one command's server_url (retries retryable failures)."""

    plane: ControlPlane
    server_url: str

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        return (
            await self.plane.call("GET", self.server_url, path, params=params, policy=RetryPolicy(attempts=3))
        ).json()

    async def post_json(self, path: str, body: Any) -> Any:
        # One attempt: a POST may not be idempotent (e.g. /api/execute); the tool decides.
        return (await self.plane.call("POST", self.server_url, path, body=body)).json()

    async def put_json_bytes(self, path: str, body: bytes) -> Any:
        """PUT an already-encoded JSON body (large results: encoded once, off the trio thread)."""
        return (
            await self.plane.call("PUT", self.server_url, path, raw=body, policy=RetryPolicy(attempts=3))
        ).json()

    async def put_json(self, path: str, body: Any) -> Any:
        return (
            await self.plane.call("PUT", self.server_url, path, body=body, policy=RetryPolicy(attempts=3))
        ).json()
