"""The nats, result_fetch, artifact, transfer, websocket and mcp kinds end to end: NATS
notification → claim → tool → events on the stub server, with the real worker tree (both
dialects). The websocket peer is a trio-websocket echo server in this process; the MCP server is
the real one of ``tests/tools/mcp_server.py`` (the ``mcp`` package, streamable HTTP) in its own
process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import duckdb
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from noetl_worker.config import Settings
from noetl_worker.testing import Publisher, StubServer, StubState

from ..tools.mcp_support import open_mcp_server
from .support import FLAVORS, failure, make_stub_state, run_commands, tool_error, value

MakeSettings = Callable[..., Settings]


@pytest.fixture
def stub_state(request: pytest.FixtureRequest) -> StubState:
    return make_stub_state(request)


async def _echo(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message("echo:" + str(await ws.get_message()))
    except ConnectionClosed:
        pass


@pytest.fixture
async def ws_url() -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, _echo, "127.0.0.1", 0, None)
        yield f"ws://127.0.0.1:{server.port}/"
        nursery.cancel_scope.cancel()


@pytest.fixture
async def mcp_url() -> AsyncIterator[str]:
    async with open_mcp_server("sse") as url:
        yield url


@pytest.mark.parametrize("stub_state", FLAVORS, indirect=True)
async def test_new_kinds_through_the_worker(
    stub: StubServer,
    publisher: Publisher,
    make_settings: MakeSettings,
    ws_url: str,
    mcp_url: str,
    tmp_path: Path,
) -> None:
    state = stub.state
    db = str(tmp_path / "e2e.duckdb")
    with duckdb.connect(db) as conn:
        conn.execute("CREATE TABLE src AS SELECT range AS id, 'n' || range AS name FROM range(25)")
        conn.execute("CREATE TABLE dst (id BIGINT, name VARCHAR)")
    stored = state.store_result(execution_id="5", name="big", data={"rows": [1, 2, 3]})
    put = state.enqueue_command(
        step="put",
        tool_kind="nats",
        tool_config={"operation": "kv_put", "bucket": "e2e", "key": "k", "value": {"v": 1}, "create": True},
    )
    fetch = state.enqueue_command(step="fetch", tool_kind="result_fetch", tool_config={"ref": stored.ref})
    refused = state.enqueue_command(
        step="refused",
        tool_kind="artifact",
        tool_config={"action": "put", "input": {"result_ref": stored.ref}},
    )
    move = state.enqueue_command(
        step="move",
        tool_kind="transfer",
        tool_config={
            "source": {"type": "duckdb", "db_path": db, "query": "SELECT id, name FROM src"},
            "target": {"type": "duckdb", "db_path": db, "table": "dst"},
            "chunk_size": 10,
        },
    )
    talk = state.enqueue_command(
        step="talk",
        tool_kind="websocket",
        tool_config={"url": ws_url, "send": ["a", "b"], "receive": 2},
    )
    ask = state.enqueue_command(
        step="ask",
        tool_kind="mcp",
        tool_config={"endpoint": mcp_url, "tool": "greet", "arguments": {"name": "ada"}},
    )
    unknown = state.enqueue_command(
        step="unknown",
        tool_kind="mcp",
        tool_config={"endpoint": mcp_url, "tool": "no_such_tool", "arguments": {}},
    )
    commands = [put, fetch, refused, move, talk, ask, unknown]
    with trio.fail_after(60):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="1"), commands)

    assert value(state, put)["revision"] == 1
    assert value(state, fetch) == {"ref": stored.ref, "source": "http", "data": {"rows": [1, 2, 3]}}
    assert "artifact.action" in failure(state, refused)
    moved = value(state, move)
    assert (moved["rows_read"], moved["rows_written"], moved["chunks"]) == (25, 25, 3)
    assert value(state, talk)["messages"] == ["echo:a", "echo:b"]
    asked = value(state, ask)
    assert (asked["method"], asked["tool"], asked["text"]) == ("tools/call", "greet", "hello ada")
    assert asked["initialize"]["serverInfo"]["name"] == "noetl-test"
    # the server's answer (a tool result with isError) is the step's failure, in its words
    status, envelope = tool_error(state, unknown)
    assert status == "error"
    assert envelope["error"] == "mcp tools/call no_such_tool: Unknown tool: no_such_tool"
    assert envelope["data"]["result"]["isError"] is True
    with duckdb.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM dst").fetchone() == (25,)
