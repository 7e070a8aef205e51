"""mcp tool against a real MCP server (the ``mcp`` package, streamable HTTP) in a subprocess."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from noetl_worker.errors import ToolConfigError
from noetl_worker.testing import free_port
from noetl_worker.tools import mcp
from noetl_worker.tools.base import ToolResources, ToolResult

from ..tool_support import make_ctx
from .mcp_support import open_mcp_server


@pytest.fixture(params=["sse", "json"])
async def endpoint(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with open_mcp_server(request.param) as url:
        yield url


@pytest.fixture
async def resources() -> AsyncIterator[ToolResources]:
    res = ToolResources()
    try:
        yield res
    finally:
        await res.aclose()


async def call(resources: ToolResources, **config: Any) -> ToolResult:
    with trio.fail_after(30):
        return await mcp.run(config, make_ctx(resources))


async def test_lists_and_calls_tools_with_one_initialize(endpoint: str, resources: ToolResources) -> None:
    listed = await call(resources, endpoint=endpoint, method="tools/list")
    assert listed.status == "success"
    assert {t["name"] for t in listed.data["result"]["tools"]} == {"add", "greet", "explode"}
    assert listed.data["initialize"]["serverInfo"]["name"] == "noetl-test"

    summed = await call(resources, url=endpoint, tool="add", arguments={"a": 2, "b": 40})
    assert summed.status == "success" and summed.data["text"] == "42"
    assert summed.data["tool"] == "add" and summed.data["arguments"] == {"a": 2, "b": 40}
    sessions = await resources.get_or_create("mcp.sessions", mcp._new_sessions)
    first = sessions.get(endpoint).initialize
    greeted = await call(resources, server=endpoint, tool="greet", arguments={"name": "ada"})
    assert greeted.data["text"] == "hello ada"
    assert sessions.get(endpoint).initialize is first


async def test_a_failing_tool_is_an_error_result(endpoint: str, resources: ToolResources) -> None:
    result = await call(resources, endpoint=endpoint, tool="explode")
    assert result.status == "error" and "Error executing tool explode" in (result.error or "")
    assert result.data["result"]["isError"] is True


async def test_health_and_unknown_methods(endpoint: str, resources: ToolResources) -> None:
    health = await call(resources, endpoint=endpoint, method="health")
    assert health.status == "success" and health.data["result"]["healthy"] is True
    unknown = await call(resources, endpoint=endpoint, method="no/such/method")
    assert unknown.status == "error" and "JSON-RPC error" in (unknown.error or "")


async def test_a_forgotten_session_is_initialized_again(resources: ToolResources) -> None:
    async with open_mcp_server("sse") as url:
        first = await call(resources, endpoint=url, tool="add", arguments={"a": 1, "b": 1})
        assert first.data["text"] == "2"
        sessions = await resources.get_or_create("mcp.sessions", mcp._new_sessions)
        sessions.get(url).session_id = "0" * 32  # what a restarted server would not know
        again = await call(resources, endpoint=url, tool="add", arguments={"a": 1, "b": 2})
        assert again.status == "success" and again.data["text"] == "3"


async def test_no_server_is_an_error_result(resources: ToolResources) -> None:
    result = await call(resources, endpoint=f"http://127.0.0.1:{free_port()}/mcp", method="tools/list")
    assert result.status == "error" and "ConnectError" in (result.error or "")


def test_endpoint_from_the_environment() -> None:
    env = {"NOETL_MCP_KB_SEARCH_ENDPOINT": "http://kb:1/mcp", "NOETL_MCP_URL": "http://default:2/mcp"}
    assert mcp.resolve_endpoint({"server": "kb-search"}, env) == ("kb-search", "http://kb:1/mcp")
    assert mcp.resolve_endpoint({"server": "other"}, env) == ("other", "http://default:2/mcp")
    with pytest.raises(ToolConfigError) as info:
        mcp.resolve_endpoint({"server": "other"}, {})
    assert info.value.field == "endpoint" and "NOETL_MCP_OTHER_ENDPOINT" in str(info.value)


def test_server_sent_events_are_split_by_blank_lines() -> None:
    body = 'event: message\ndata: {"a":\ndata: 1}\n\n: comment\ndata: two\n'
    assert mcp.sse_data(body) == ['{"a":\n1}', "two"]


async def test_config_errors_name_the_field(resources: ToolResources) -> None:
    with pytest.raises(ToolConfigError) as info:
        await call(resources, endpoint="http://x/mcp", method="tools/call")
    assert info.value.field == "tool"
    with pytest.raises(ToolConfigError) as info:
        await call(resources, endpoint="ftp://x", method="tools/list")
    assert info.value.field == "endpoint"
