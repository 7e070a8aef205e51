"""result_fetch / artifact: shared memory (Arrow IPC), the server's NATS KV store, HTTP resolve."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio

from noetl_worker.config import Settings
from noetl_worker.errors import HTTPStatusError, ToolConfigError
from noetl_worker.ipc_cache import IpcCache, encode_payload
from noetl_worker.testing import NatsServer
from noetl_worker.tools import artifact, result_fetch
from noetl_worker.tools import nats as nats_tool
from noetl_worker.tools.base import ToolContext, ToolResources, ToolResult

from ..tool_support import make_ctx

URI = "noetl://execution/77/result/load_rows/901"
STORED = {"status": "success", "data": {"rows": [{"id": 1}], "note": "durable"}}


class ResolvingServer:
    """The control plane's resolve endpoint, recording what was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        assert path == "/api/result/resolve" and params is not None
        self.asked.append(params["ref"])
        if params["ref"] == URI:
            return STORED
        raise HTTPStatusError(404, '{"detail": "not found"}')

    async def post_json(self, path: str, body: Any) -> Any:
        raise AssertionError(path)

    async def put_json(self, path: str, body: Any) -> Any:
        raise AssertionError(path)


@pytest.fixture
def server() -> ResolvingServer:
    return ResolvingServer()


@pytest.fixture
def cache() -> Iterator[IpcCache]:
    ipc = IpcCache(1 << 20, node_id="node-a", producer="test", namespace="noetltest")
    try:
        yield ipc
    finally:
        ipc.close()


def ctx_with(server: Any, node: str = "node-a", **env: str) -> ToolContext:
    ctx = make_ctx(server=server)
    return attrs.evolve(ctx, settings=Settings.from_env({"NOETL_NODE_ID": node, **env}))


async def call(module: Any, ctx: ToolContext, **config: Any) -> ToolResult:
    with trio.fail_after(20):
        result: ToolResult = await module.run(config, ctx)
        return result


async def test_resolves_over_http(server: ResolvingServer) -> None:
    result = await call(result_fetch, ctx_with(server), ref=URI)
    assert result.status == "success"
    assert result.data == {"ref": URI, "source": "http", "data": STORED}
    reference = {"kind": "result_ref", "ref": URI, "store": "disk"}
    again = await call(result_fetch, ctx_with(server), ref={"status": "success", "reference": reference})
    assert again.data["data"] == STORED and server.asked == [URI, URI]


async def test_an_unknown_ref_is_an_error_result(server: ResolvingServer) -> None:
    result = await call(result_fetch, ctx_with(server), ref="noetl://execution/1/result/x/2")
    assert result.status == "error" and "HTTP 404" in (result.error or "")


async def test_a_same_node_hint_is_read_from_shared_memory(server: ResolvingServer, cache: IpcCache) -> None:
    payload = encode_payload({"data": {"columns": ["id", "name"], "rows": [[1, "a"], [2, "b"]]}})
    hint = cache.put(payload)
    assert hint is not None
    reference = {"kind": "result_ref", "ref": URI, "store": "disk", "ipc": hint.to_json()}
    result = await call(result_fetch, ctx_with(server), ref=reference)
    assert result.data["source"] == "shm" and server.asked == []
    assert result.data["data"] == {
        "columns": ["id", "name"],
        "rows": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "row_count": 2,
    }
    bare = await call(result_fetch, ctx_with(server), ref=hint.to_json())
    assert bare.data["data"]["row_count"] == 2


async def test_another_nodes_hint_falls_back_to_the_durable_copy(
    server: ResolvingServer, cache: IpcCache
) -> None:
    hint = cache.put(encode_payload({"data": {"rows": [{"id": 1}]}}))
    assert hint is not None
    reference = {"kind": "result_ref", "ref": URI, "ipc": hint.to_json()}
    result = await call(result_fetch, ctx_with(server, node="node-b"), ref=reference)
    assert result.data["source"] == "http" and result.data["data"] == STORED
    alone = await call(result_fetch, ctx_with(server, node="node-b"), ref=hint.to_json())
    assert alone.status == "error" and "node-a" in (alone.error or "")


@pytest.fixture
async def loop() -> AsyncIterator[None]:
    async with trio_asyncio.open_loop():
        yield


async def test_kv_references_are_read_from_the_servers_nats_store(
    nats: NatsServer, loop: None, server: ResolvingServer
) -> None:
    resources = ToolResources()
    ctx = attrs.evolve(ctx_with(server, NATS_URL=nats.url), resources=resources)
    try:
        value = {"big": "x" * 100, "n": 3}
        put = await call(
            nats_tool,
            ctx,
            operation="kv_put",
            bucket=nats_tool.RESULT_STORE_BUCKET,
            key="execution_77_result_load_rows_901",
            value_base64=base64.b64encode(gzip.compress(json.dumps(value).encode())).decode(),
            create=True,
        )
        assert put.status == "success"
        result = await call(result_fetch, ctx, ref={"kind": "result_ref", "ref": URI, "store": "kv"})
        assert result.data == {"ref": URI, "source": "kv", "data": value} and server.asked == []
        missing = "noetl://execution/77/result/other/902"
        fallback = await call(result_fetch, ctx, ref={"kind": "temp_ref", "ref": missing, "store": "kv"})
        assert fallback.status == "error" and server.asked == [missing]
    finally:
        await resources.aclose()


def test_kv_key_is_the_servers_spelling() -> None:
    assert result_fetch.kv_key(URI) == "execution_77_result_load_rows_901"


async def test_artifact_get_and_put(server: ResolvingServer) -> None:
    got = await call(artifact, ctx_with(server), action="get", input={"result_ref": URI})
    assert got.status == "success" and got.data["data"] == STORED
    with pytest.raises(ToolConfigError) as info:
        await call(artifact, ctx_with(server), action="put", input={"result_ref": URI})
    assert info.value.field == "action" and "get" in str(info.value)


@pytest.mark.parametrize("module", [result_fetch, artifact])
async def test_flight_is_refused_as_out_of_scope(module: Any, server: ResolvingServer) -> None:
    with pytest.raises(ToolConfigError) as info:
        await call(module, ctx_with(server), ref=URI, prefer="flight")
    assert info.value.field == "prefer" and "Flight is out of scope" in str(info.value)


@pytest.mark.parametrize("ref", [None, "https://x", {"ref": "nope"}, 7])
async def test_bad_refs_name_the_field(ref: Any, server: ResolvingServer) -> None:
    with pytest.raises(ToolConfigError) as info:
        await call(result_fetch, ctx_with(server), ref=ref)
    assert info.value.field in ("ref", "result_ref")
