"""nats tool against a real nats-server: KV, object store, JetStream, the server's result store."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio_asyncio

from noetl_worker.config import Settings
from noetl_worker.errors import ToolConfigError
from noetl_worker.metrics import Metrics
from noetl_worker.testing import NatsServer
from noetl_worker.tools import nats as nats_tool
from noetl_worker.tools.base import ToolContext, ToolResources, ToolResult

from ..tool_support import make_ctx


@pytest.fixture
async def loop() -> AsyncIterator[None]:
    async with trio_asyncio.open_loop():
        yield


@pytest.fixture
async def resources(loop: None) -> AsyncIterator[ToolResources]:
    res = ToolResources(metrics=Metrics())
    try:
        yield res
    finally:
        await res.aclose()


def ctx_for(nats: NatsServer, resources: ToolResources) -> ToolContext:
    ctx = make_ctx(resources)
    import attrs

    return attrs.evolve(ctx, settings=Settings.from_env({"NATS_URL": nats.url}))


async def call(ctx: ToolContext, **config: Any) -> ToolResult:
    with trio.fail_after(20):
        return await nats_tool.run(config, ctx)


async def test_kv_round_trip_creates_the_bucket_on_request(
    nats: NatsServer, resources: ToolResources
) -> None:
    ctx = ctx_for(nats, resources)
    missing = await call(ctx, operation="kv_put", bucket="b1", key="k", value={"a": 1})
    assert missing.status == "error" and "b1" in (missing.error or "")

    put = await call(ctx, operation="kv_put", bucket="b1", key="k", value={"a": 1}, create_bucket=True)
    assert put.status == "success" and put.data == {
        "status": "success",
        "bucket": "b1",
        "key": "k",
        "revision": 1,
    }
    got = await call(ctx, operation="kv_get", bucket="b1", key="k")
    # noetl's own worker's fields
    assert sorted(got.data) == ["bucket", "created", "key", "revision", "status", "value"]
    assert got.data["status"] == "success" and got.data["value"] == {"a": 1}

    await call(ctx, operation="kv_put", bucket="b1", key="other", value="plain text")
    text = await call(ctx, operation="kv_get", bucket="b1", key="other")
    assert text.data["value"] == "plain text"

    keys = await call(ctx, operation="kv_keys", bucket="b1")
    assert keys.data["keys"] == ["k", "other"] and keys.data["count"] == 2
    matched = await call(ctx, operation="kv_keys", bucket="b1", pattern="o*")
    assert matched.data["keys"] == ["other"]

    assert (await call(ctx, operation="kv_delete", bucket="b1", key="k")).data["deleted"] is True
    gone = await call(ctx, operation="kv_get", bucket="b1", key="k")
    assert gone.status == "success" and gone.data["status"] == "not_found" and gone.data["value"] is None
    await call(ctx, operation="kv_purge", bucket="b1", key="other")
    assert (await call(ctx, operation="kv_keys", bucket="b1")).data["keys"] == []


async def test_binary_values_come_back_as_base64_with_their_size(
    nats: NatsServer, resources: ToolResources
) -> None:
    ctx = ctx_for(nats, resources)
    blob = bytes(range(256))
    encoded = base64.b64encode(blob).decode()
    await call(ctx, operation="kv_put", bucket="bin", key="x", value_base64=encoded, create=True)
    got = await call(ctx, operation="kv_get", bucket="bin", key="x")
    assert got.data["value"] == {"base64": encoded, "size": 256}


async def test_the_servers_result_store_reads_as_json(nats: NatsServer, resources: ToolResources) -> None:
    ctx = ctx_for(nats, resources)
    stored = gzip.compress(json.dumps({"rows": [1, 2, 3]}).encode())
    await call(
        ctx,
        operation="kv_put",
        bucket=nats_tool.RESULT_STORE_BUCKET,
        key="exec.1.step",
        value_base64=base64.b64encode(stored).decode(),
        create=True,
    )
    got = await call(ctx, operation="kv_get", bucket=nats_tool.RESULT_STORE_BUCKET, key="exec.1.step")
    assert got.data["value"] == {"rows": [1, 2, 3]} and got.data["compressed"] == "gzip"
    with trio.fail_after(20):
        assert await nats_tool.read_result_store(ctx, "exec.1.step") == {"rows": [1, 2, 3]}


async def test_object_store_operations(nats: NatsServer, resources: ToolResources) -> None:
    ctx = ctx_for(nats, resources)
    put = await call(ctx, operation="object_put", bucket="files", name="a.txt", value="hello", create=True)
    assert put.status == "success" and put.data["size"] == 5
    info = await call(ctx, operation="object_info", bucket="files", name="a.txt")
    assert info.data["status"] == "success" and info.data["size"] == 5
    got = await call(ctx, operation="object_get", bucket="files", name="a.txt")
    assert got.data["value"] == "hello" and got.data["data"] == "hello"
    listed = await call(ctx, operation="object_list", bucket="files")
    assert [o["name"] for o in listed.data["objects"]] == ["a.txt"]
    await call(ctx, operation="object_delete", bucket="files", name="a.txt")
    assert (await call(ctx, operation="object_get", bucket="files", name="a.txt")).data[
        "status"
    ] == "not_found"


async def _stream(nats: NatsServer, resources: ToolResources, name: str, subject: str) -> None:
    js = await nats_tool.jetstream(
        ctx_for(nats, resources), nats_tool.read_target({}, ctx_for(nats, resources)), 5
    )
    await trio_asyncio.aio_as_trio(js.add_stream)(name=name, subjects=[subject])


async def test_publish_dedupes_by_message_id_and_messages_read_back(
    nats: NatsServer, resources: ToolResources
) -> None:
    ctx = ctx_for(nats, resources)
    with trio.fail_after(20):
        await _stream(nats, resources, "ORDERS", "orders.>")
    first = await call(
        ctx, operation="js_publish", subject="orders.new", data={"id": 7}, msg_id="m-7", headers={"x-a": "1"}
    )
    again = await call(ctx, operation="js_publish", subject="orders.new", data={"id": 7}, msg_id="m-7")
    assert first.data["seq"] == 1 and first.data["duplicate"] is False
    assert again.data["seq"] == 1 and again.data["duplicate"] is True

    msg = await call(ctx, operation="js_get_msg", stream="ORDERS", seq=1)
    assert msg.data["value"] == {"id": 7} and msg.data["headers"]["x-a"] == "1"
    info = await call(ctx, operation="js_stream_info", stream="ORDERS")
    assert info.data["messages"] == 1 and info.data["subjects"] == ["orders.>"]


async def test_consume_is_bounded_by_batch_and_acks(nats: NatsServer, resources: ToolResources) -> None:
    ctx = ctx_for(nats, resources)
    with trio.fail_after(20):
        await _stream(nats, resources, "JOBS", "jobs.*")
    for n in range(5):
        await call(ctx, operation="js_publish", subject="jobs.a", data={"n": n})
    got = await call(ctx, operation="js_consume", subject="jobs.a", durable="c1", batch=3, wait_seconds=1)
    assert [m["value"]["n"] for m in got.data["messages"]] == [0, 1, 2]
    rest = await call(ctx, operation="js_consume", subject="jobs.a", durable="c1", batch=10, wait_seconds=0.5)
    assert [m["value"]["n"] for m in rest.data["messages"]] == [3, 4]
    empty = await call(
        ctx, operation="js_consume", subject="jobs.a", durable="c1", batch=10, wait_seconds=0.3
    )
    assert empty.status == "success" and empty.data["count"] == 0


async def test_connections_are_pooled_per_target_and_closed_at_shutdown(nats: NatsServer, loop: None) -> None:
    resources = ToolResources()
    ctx = ctx_for(nats, resources)
    await call(ctx, operation="kv_put", bucket="p", key="k", value=1, create=True)
    await call(ctx, operation="kv_get", bucket="p", key="k")
    pool = await resources.get_or_create("nats.pool", nats_tool._new_pool)
    clients = list(pool._clients.values())
    assert len(clients) == 1 and clients[0].is_connected
    await resources.aclose()
    assert clients[0].is_closed


async def test_an_unreachable_server_is_an_error_result(loop: None) -> None:
    from noetl_worker.testing import free_port

    resources = ToolResources()
    try:
        ctx = make_ctx(resources)
        result = await call(
            ctx, operation="kv_get", url=f"nats://127.0.0.1:{free_port()}", bucket="b", key="k", timeout=3
        )
    finally:
        await resources.aclose()
    assert result.status in ("error", "timeout") and "kv_get" in (result.error or "")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({}, "operation"),
        ({"operation": "kv_fly"}, "operation"),
        ({"operation": "kv_get", "url": "http://x"}, "url"),
        ({"operation": "js_consume", "subject": "s", "batch": 0}, "batch"),
    ],
)
async def test_config_errors_name_the_field(
    config: dict[str, Any], field: str, nats: NatsServer, resources: ToolResources
) -> None:
    with pytest.raises(ToolConfigError) as info:
        await call(ctx_for(nats, resources), **config)
    assert info.value.field == field


async def test_operations_are_counted_by_kind(nats: NatsServer, resources: ToolResources) -> None:
    ctx = ctx_for(nats, resources)
    await call(ctx, operation="kv_get", bucket="nope", key="k")
    assert resources.metrics is not None
    value = resources.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
        "noetl_worker_tool_operations_total", {"tool_kind": "nats", "operation": "kv_get", "status": "error"}
    )
    assert value == 1
