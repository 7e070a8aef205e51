"""websocket tool against a local trio-websocket server on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from noetl_worker.errors import ToolConfigError
from noetl_worker.tools import websocket
from noetl_worker.tools.base import ToolResult

from ..tool_support import make_ctx

SEEN: dict[str, Any] = {}


async def handler(request: WebSocketRequest) -> None:
    path = request.path
    SEEN["headers"] = {k.decode().lower(): v.decode() for k, v in request.headers}
    SEEN["subprotocols"] = list(request.proposed_subprotocols)
    if path == "/private" and SEEN["headers"].get("authorization") != "Bearer s3cret":
        await request.reject(401, body=b"no")
        return
    subprotocol = "v2.proto" if "v2.proto" in request.proposed_subprotocols else None
    ws = await request.accept(subprotocol=subprotocol)
    try:
        if path in ("/echo", "/private"):
            while True:
                message = await ws.get_message()
                await ws.send_message(message)
        elif path == "/stream":
            for item in ("a", "b", "END", "c"):
                await ws.send_message(item)
            await trio.sleep_forever()
        elif path == "/bye":
            await ws.send_message('{"n": 1}')
            await ws.send_message(b"\x00\x01")
            await ws.aclose(4000, "bye now")
        elif path == "/slow":
            await ws.send_message("one")
            await trio.sleep_forever()
    except ConnectionClosed:
        pass


@pytest.fixture
async def server_url() -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield f"ws://127.0.0.1:{server.port}"
        nursery.cancel_scope.cancel()


async def call(**config: Any) -> ToolResult:
    with trio.fail_after(15):
        return await websocket.run(config, make_ctx(secrets={"ws_cred": "s3cret"}))


async def test_sends_and_receives_n_messages(server_url: str) -> None:
    result = await call(url=f"{server_url}/echo", send=["hi", {"n": 2}], receive=2, subprotocols=["v2.proto"])
    assert result.status == "success"
    assert result.data == {"messages": ["hi", {"n": 2}], "count": 2, "close_code": None, "close_reason": None}
    assert SEEN["subprotocols"] == ["v2.proto"]


async def test_a_terminator_ends_the_exchange(server_url: str) -> None:
    result = await call(url=f"{server_url}/stream", until="END")
    assert result.status == "success" and result.data["messages"] == ["a", "b", "END"]


async def test_the_peers_close_code_and_reason_are_reported(server_url: str) -> None:
    result = await call(url=f"{server_url}/bye")
    assert result.status == "success"
    assert result.data["messages"] == [{"n": 1}, {"base64": "AAE=", "size": 2}]
    assert (result.data["close_code"], result.data["close_reason"]) == (4000, "bye now")


async def test_the_deadline_ends_receiving(server_url: str) -> None:
    short = await call(url=f"{server_url}/slow", receive=3, timeout=0.5)
    assert short.status == "timeout" and short.data["messages"] == ["one"] and "1 of 3" in (short.error or "")
    listen = await call(url=f"{server_url}/slow", timeout=0.5)
    assert listen.status == "success" and listen.data["messages"] == ["one"]


async def test_auth_from_a_credential_and_headers(server_url: str) -> None:
    ok = await call(
        url=f"{server_url}/private",
        auth={"type": "bearer", "credential": "ws_cred"},
        headers={"X-Trace": "t1"},
        send="ping",
        receive=1,
    )
    assert ok.status == "success" and ok.data["messages"] == ["ping"]
    assert SEEN["headers"]["x-trace"] == "t1"
    refused = await call(url=f"{server_url}/private", send="ping", receive=1)
    assert refused.status == "error" and "handshake" in (refused.error or "")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"url": "http://x"}, "url"),
        ({"url": "ws://x", "receive": -1}, "receive"),
        ({"url": "ws://x", "subprotocols": "a"}, "subprotocols"),
        ({"url": "ws://x", "auth": {"type": "bearer", "credential": "unknown"}}, "auth"),
    ],
)
async def test_config_errors_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        await call(**config)
    assert info.value.field == field
