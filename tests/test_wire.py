"""The control plane's lean HTTP/1.1 path against a real TCP server that misbehaves on purpose."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from noetl_worker._wire import BodyTooLarge, Wire, WireError

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


async def read_request(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """One request (headers + Content-Length body) from ``buf``/``stream``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    total = len(head) + 4 + length
    while len(buf) < total:
        buf += await stream.receive_some(65536)
    request = bytes(buf[:total])
    del buf[:total]
    return request


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP server; ``handler(stream, connection_number)``; yields (base URL, requests seen)."""
    seen: list[bytes] = []
    count = 0

    async def on_connection(stream: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        await handler(stream, count)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", seen
        nursery.cancel_scope.cancel()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_requests_reuse_one_keep_alive_connection_and_carry_the_headers() -> None:
    connections: list[int] = []
    requests: list[bytes] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        connections.append(n)
        buf = bytearray()
        while (request := await read_request(stream, buf)) is not None:
            requests.append(request)
            await stream.send_all(ok(b'{"n": %d}' % len(requests)))

    wire = Wire(headers=[(b"authorization", b"Bearer t0ken")])
    async with serve(handler) as (base, _):
        with trio.fail_after(10):
            first = await wire.request("POST", base, "/api/x", body=b'{"a":1}')
            second = await wire.request("POST", base, "/api/y", body=b"{}", headers={"idempotency-key": "k"})
        await wire.aclose()
    assert (first.status, first.body, second.body) == (200, b'{"n": 1}', b'{"n": 2}')
    assert connections == [1]
    assert requests[0].startswith(b"POST /api/x HTTP/1.1\r\n")
    assert (
        b"authorization: Bearer t0ken\r\n" in requests[0]
        and b"authorization: Bearer t0ken\r\n" in requests[1]
    )
    assert b"idempotency-key: k\r\n" in requests[1]
    assert requests[0].endswith(b'\r\n\r\n{"a":1}')


async def test_a_connection_the_server_closed_while_idle_is_replaced_transparently() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        buf = bytearray()
        if await read_request(stream, buf) is not None:
            await stream.send_all(ok(b"conn %d" % n))  # keep-alive announced, then closed
        await stream.aclose()

    wire = Wire()
    async with serve(handler) as (base, _):
        with trio.fail_after(10):
            assert (await wire.request("POST", base, "/a")).body == b"conn 1"
            await trio.testing.wait_all_tasks_blocked()
            assert (await wire.request("POST", base, "/a")).body == b"conn 2"
        await wire.aclose()


async def test_chunked_answers_and_answer_headers_are_read() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        buf = bytearray()
        await read_request(stream, buf)
        await stream.send_all(
            b"HTTP/1.1 503 Busy\r\ntransfer-encoding: chunked\r\nretry-after: 3\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )

    wire = Wire()
    async with serve(handler) as (base, _):
        with trio.fail_after(10):
            response = await wire.request("POST", base, "/a")
        await wire.aclose()
    assert (response.status, response.body, response.headers["retry-after"]) == (503, b"hello world", "3")


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_limit_stops_being_read(chunked: bool) -> None:
    sent = 0
    body_size = 64 * 1024 * 1024

    async def handler(stream: trio.SocketStream, n: int) -> None:
        nonlocal sent
        buf = bytearray()
        await read_request(stream, buf)
        framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % body_size
        await stream.send_all(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n")
        piece = b"x" * 65536
        try:
            while sent < body_size:
                await stream.send_all(b"10000\r\n" + piece + b"\r\n" if chunked else piece)
                sent += len(piece)
        except trio.BrokenResourceError:
            pass

    wire = Wire()
    async with serve(handler) as (base, _):
        with trio.fail_after(20), pytest.raises(BodyTooLarge) as caught:
            await wire.request("POST", base, "/claim", max_body=100_000)
        await wire.aclose()
    assert caught.value.limit == 100_000
    assert caught.value.announced == (None if chunked else body_size)
    assert sent < body_size  # the connection was dropped long before the whole body arrived


async def test_a_cancelled_request_leaves_no_half_read_connection_behind() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        buf = bytearray()
        while (await read_request(stream, buf)) is not None:
            if n == 1:
                await trio.sleep_forever()  # the first connection never answers
            await stream.send_all(ok(b"fresh"))

    wire = Wire()
    async with serve(handler) as (base, _):
        with trio.move_on_after(0.3) as scope:
            await wire.request("POST", base, "/slow")
        assert scope.cancelled_caught
        with trio.fail_after(10):
            assert (await wire.request("POST", base, "/again")).body == b"fresh"
        await wire.aclose()


async def test_connection_refused_and_garbage_answers_are_wire_errors() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    wire = Wire()
    with trio.fail_after(10), pytest.raises(WireError, match="connect"):
        await wire.request("POST", f"http://127.0.0.1:{port}", "/a")

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buf = bytearray()
        await read_request(stream, buf)
        await stream.send_all(b"SMTP ready\r\n\r\n")

    async with serve(handler) as (base, _):
        with trio.fail_after(10), pytest.raises(WireError, match="bad HTTP answer"):
            await wire.request("POST", base, "/a")
    await wire.aclose()
