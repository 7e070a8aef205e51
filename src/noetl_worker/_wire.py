"""A lean HTTP/1.1 client for the control plane's hot requests (claim, event delivery).

httpx costs ~2 ms of CPU per request on small machines, most of it in request building, the
pool's assignment pass (a readability check of every pooled connection per request) and cookie
handling — none of which the worker needs for two JSON POSTs per command. This is h11 over trio
streams with keep-alive:

- one idle stack of connections per origin, the most recently used reused first; a connection
  idle longer than ``KEEPALIVE_EXPIRY`` is dropped instead of reused (servers close idle
  keep-alive connections after ~5 s);
- a reused connection that turns out closed before any answer byte arrived is retried once on a
  fresh one (the server closed it while idle: nothing was processed);
- the caller owns the total deadline (a trio cancel scope); a connection cut by cancellation or
  an error is closed, never reused;
- a response body past ``max_body`` bytes stops being read (``BodyTooLarge``) and the
  connection is closed, so an oversized answer costs at most the limit.

Transport failures raise ``WireError``; the caller maps them to its own error type.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import attrs
import h11
import trio

__all__ = ["BodyTooLarge", "Origin", "Wire", "WireError", "WireResponse"]

KEEPALIVE_EXPIRY = 4.0  # seconds idle before a pooled connection is dropped
CONNECT_TIMEOUT = 5.0
_READ_SIZE = 65536


class WireError(Exception):
    """No (complete) HTTP answer: connect failure, reset, EOF, protocol error."""


class BodyTooLarge(Exception):
    """The answer's body is larger than the caller's limit; reading stopped there."""

    def __init__(self, limit: int, announced: int | None) -> None:
        self.limit = limit
        self.announced = announced
        size = f"{announced} bytes" if announced is not None else "more"
        super().__init__(f"response body of {size} is over the limit of {limit} bytes")


@attrs.frozen
class WireResponse:
    status: int
    body: bytes
    headers: Mapping[str, str]


@attrs.frozen
class Origin:
    """Where to connect for one base URL, parsed once."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    prefix: str  # the base URL's path, prepended to request paths

    @classmethod
    def parse(cls, base: str) -> Origin:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WireError(f"not an http(s) URL: {base!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise WireError(f"bad port in {base!r}: {exc}") from None
        return cls(parts.scheme, parts.hostname, port, parts.netloc.encode("idna"), parts.path.rstrip("/"))


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    h11: h11.Connection
    idle_since: float = 0.0

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


@attrs.define(eq=False)
class Wire:
    """Keep-alive HTTP/1.1 connections per origin; one request at a time per connection."""

    headers: Sequence[tuple[bytes, bytes]] = ()  # sent on every request (token, user-agent)
    max_idle: int = 16  # idle connections kept per origin
    ssl_context: ssl.SSLContext | None = None
    _origins: dict[str, Origin] = attrs.field(factory=dict)
    _idle: dict[Origin, list[_Connection]] = attrs.field(factory=dict)

    def origin(self, base: str) -> Origin:
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = Origin.parse(base)
        return origin

    async def request(
        self,
        method: str,
        base: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        max_body: int | None = None,
    ) -> WireResponse:
        origin = self.origin(base)
        request = self._request(method, origin, path, body, headers)
        while True:
            conn, reused = self._take(origin)
            if conn is None:
                conn = await self._connect(origin)
            try:
                response = await self._exchange(conn, request, body, max_body)
            except _StaleConnection:
                await conn.aclose()
                if reused:
                    continue  # closed by the server while idle: nothing was processed
                raise WireError("connection closed before an answer") from None
            except BaseException:
                await conn.aclose()
                raise
            self._put_back(origin, conn)
            return response

    def _request(
        self, method: str, origin: Origin, path: str, body: bytes, extra: Mapping[str, str] | None
    ) -> h11.Request:
        headers: list[tuple[bytes, bytes]] = [(b"host", origin.host_header), *self.headers]
        if extra:
            headers.extend((k.encode(), v.encode()) for k, v in extra.items())
        headers.append((b"content-length", str(len(body)).encode()))
        return h11.Request(method=method, target=origin.prefix + path, headers=headers)

    def _take(self, origin: Origin) -> tuple[_Connection | None, bool]:
        stack = self._idle.get(origin)
        now = trio.current_time()
        while stack:
            conn = stack.pop()
            if now - conn.idle_since < KEEPALIVE_EXPIRY:
                return conn, True
            # Expired: closing a plain socket never blocks; forget it (no await on this path).
            _close_now(conn)
        return None, False

    def _put_back(self, origin: Origin, conn: _Connection) -> None:
        state = conn.h11
        if state.our_state is h11.DONE and state.their_state is h11.DONE:
            state.start_next_cycle()
            stack = self._idle.setdefault(origin, [])
            if len(stack) < self.max_idle:
                conn.idle_since = trio.current_time()
                stack.append(conn)
                return
        _close_now(conn)

    async def _connect(self, origin: Origin) -> _Connection:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream: trio.abc.Stream
                if origin.scheme == "https":
                    if self.ssl_context is None:
                        self.ssl_context = ssl.create_default_context()
                    stream = await trio.open_ssl_over_tcp_stream(
                        origin.host, origin.port, ssl_context=self.ssl_context, https_compatible=True
                    )
                else:
                    stream = await trio.open_tcp_stream(origin.host, origin.port)
        except trio.TooSlowError:
            where = f"{origin.host}:{origin.port}"
            raise WireError(f"connect to {where} timed out after {CONNECT_TIMEOUT:g}s") from None
        except OSError as exc:
            raise WireError(f"connect to {origin.host}:{origin.port}: {exc}") from exc
        return _Connection(stream, h11.Connection(h11.CLIENT))

    async def _exchange(
        self, conn: _Connection, request: h11.Request, body: bytes, max_body: int | None
    ) -> WireResponse:
        state = conn.h11
        try:
            data = state.send(request) or b""
            if body:
                data += state.send(h11.Data(data=body)) or b""
            data += state.send(h11.EndOfMessage()) or b""
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise _StaleConnection from None
        except h11.LocalProtocolError as exc:
            raise WireError(f"cannot send request: {exc}") from exc
        chunks: list[bytes] = []
        size = 0
        status = 0
        headers: dict[str, str] = {}
        got_any = False
        while True:
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as exc:
                raise WireError(f"bad HTTP answer: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    chunk = await conn.stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    if not got_any:
                        raise _StaleConnection from None
                    raise WireError(f"connection broken mid-answer: {exc}") from exc
                if not chunk and not got_any:
                    raise _StaleConnection
                got_any = True
                state.receive_data(bytes(chunk))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    headers[name.decode("latin-1")] = value.decode("latin-1")
                if max_body is not None:
                    announced = headers.get("content-length")
                    if announced is not None and announced.isdigit() and int(announced) > max_body:
                        raise BodyTooLarge(max_body, int(announced))
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if max_body is not None and size > max_body:
                    raise BodyTooLarge(max_body, None)
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return WireResponse(status, b"".join(chunks), headers)
            elif isinstance(event, h11.ConnectionClosed):
                raise WireError("connection closed mid-answer")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for stack in idle.values():
            for conn in stack:
                await conn.aclose()


class _StaleConnection(Exception):
    """The connection was closed before any byte of the answer (a keep-alive race)."""


def _close_now(conn: _Connection) -> None:
    stream = conn.stream
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
    else:  # TLS: closing needs I/O; drop the reference, the socket closes with it
        transport = getattr(stream, "transport_stream", None)
        if isinstance(transport, trio.SocketStream):
            transport.socket.close()
