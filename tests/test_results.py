from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from noetl_worker.errors import HTTPStatusError, TransportError
from noetl_worker.ipc_cache import IpcCache, read_hint
from noetl_worker.results import (
    build_call_done_result,
    extract_summary,
    resolve_envelopes,
    resolve_render_references,
    summary_satisfies,
    template_accessors,
)
from noetl_worker.scrub import REDACTED, Scrubber

from .fake_server_api import FakeServer

ALLOWED_RESULT_KEYS = {"status", "reference", "context", "command_id"}
PUT_ANSWER = {
    "ref": "noetl://execution/7/result/load/ab12",
    "store": "kv",
    "scope": "execution",
    "expires_at": "2026-12-01T00:00:00Z",
    "bytes": 999,
    "sha256": "f00d",
}


class Metrics:
    def __init__(self) -> None:
        self.ok: list[tuple[float, int]] = []
        self.failed = 0

    def put_ok(self, seconds: float, nbytes: int) -> None:
        self.ok.append((seconds, nbytes))

    def put_failed(self) -> None:
        self.failed += 1


@pytest.fixture
def cache() -> Iterator[IpcCache]:
    cache = IpcCache(1 << 20, "node-a", "w1", namespace=f"r{os.getpid() % 100000}")
    yield cache
    cache.close()


def big_result() -> dict[str, Any]:
    rows = [{"id": i, "name": f"row {i}", "password": "p"} for i in range(200)]
    return {"status": "success", "data": {"rows": rows, "columns": ["id", "name", "password"]}}


async def build(
    tool_result: dict[str, Any], server: FakeServer, cache: IpcCache | None, **kw: Any
) -> dict[str, Any]:
    with trio.fail_after(10):
        result = await build_call_done_result(
            tool_result,
            execution_id=7,
            step="load",
            server=server,
            scrubber=Scrubber.create(["s3cret-value"]),
            inline_max_bytes=kw.pop("inline_max_bytes", 1000),
            ipc_cache=cache,
            **kw,
        )
    assert set(result) <= ALLOWED_RESULT_KEYS
    for key in ("reference", "context"):
        assert key not in result or isinstance(result[key], dict)
    return result


async def test_small_result_inline_and_scrubbed(cache: IpcCache) -> None:
    server = FakeServer()
    tool_result = {"status": "error", "data": {"token": "abc", "msg": "x s3cret-value"}}
    result = await build(tool_result, server, cache)
    assert result == {
        "status": "error",
        "context": {"status": "error", "data": {"token": REDACTED, "msg": f"x {REDACTED}"}},
    }
    assert server.calls == [] and cache.names() == []


async def test_large_result_durable_and_shared_memory(cache: IpcCache) -> None:
    server = FakeServer({("PUT", "/api/result/7"): PUT_ANSWER})
    metrics = Metrics()
    result = await build(big_result(), server, cache, cursor=(2, 4), metrics=metrics)
    (put,) = server.calls
    assert put.body["name"] == put.body["source_step"] == "load"
    assert put.body["scope"] == "execution"
    assert put.body["data"]["data"]["rows"][0]["password"] == REDACTED
    assert result["status"] == "success"
    assert result["context"] == {"data": {"_ref": PUT_ANSWER["ref"]}}
    reference = result["reference"]
    assert reference["kind"] == "result_ref" and reference["ref"] == PUT_ANSWER["ref"]
    assert (reference["store"], reference["scope"]) == ("kv", "execution")
    assert reference["expires_at"] == "2026-12-01T00:00:00Z"
    assert reference["meta"] == {
        "bytes": 999,
        "sha256": "f00d",
        "media_type": "application/json",
        "content_type": "application/json",
    }
    assert reference["uri"] == "noetl://default/default/results/7/load/2/4/1"
    assert reference["extracted"]["data"]["rows"] == [{"id": 0, "name": "row 0", "password": REDACTED}]
    ipc = reference["ipc"]
    assert (ipc["schema_digest"], ipc["row_count"]) == ("arrow", 200)
    staged = await trio.to_thread.run_sync(lambda: read_hint(ipc, node_id="node-a"))
    import pyarrow as pa

    table = pa.ipc.open_stream(staged).read_all()
    assert table.num_rows == 200 and set(table.column("password").to_pylist()) == {REDACTED}
    assert metrics.failed == 0 and metrics.ok[0][1] == len(
        json.dumps(put.body["data"], separators=(",", ":")).encode()
    )


async def test_durable_ok_without_shared_memory() -> None:
    server = FakeServer({("PUT", "/api/result/7"): {"ref": "noetl://x", "store": "disk"}})
    result = await build(big_result(), server, None)
    reference = result["reference"]
    assert "ipc" not in reference and "expires_at" not in reference
    assert reference["meta"]["sha256"] is None and reference["meta"]["bytes"] > 1000


@pytest.mark.parametrize(
    "failure",
    [HTTPStatusError(503, "down"), TransportError("refused"), {"no": "ref"}],
    ids=["5xx", "transport", "malformed"],
)
async def test_durable_failed_shared_memory_ok(cache: IpcCache, failure: Any) -> None:
    metrics = Metrics()
    server = FakeServer({("PUT", "/api/result/7"): failure})
    result = await build(big_result(), server, cache, metrics=metrics)
    assert list(result) == ["status", "reference"]
    assert result["reference"]["kind"] == "arrow_ipc"
    assert result["reference"]["node_id"] == "node-a"
    assert metrics.failed == 1 and metrics.ok == []


async def test_everything_failed_reports_status_only(cache: IpcCache) -> None:
    server = FakeServer({("PUT", "/api/result/7"): HTTPStatusError(500, "boom")})
    cache.budget_bytes = 10  # too small to stage anything
    result = await build({"status": "timeout", "stdout": "x" * 5000}, server, cache)
    assert result == {"status": "timeout"}


def test_extracted_summary_rules() -> None:
    deep: Any = "leaf"
    for _ in range(9):
        deep = {"k": deep}
    value = {
        "n": None, "b": True, "i": 3, "long": "y" * 513, "short": "y" * 512,
        "list": [{"a": 1}, {"a": 2}], "empty": [], "deep": deep,
    }  # fmt: skip
    summary = extract_summary(value)
    assert summary["long"] == {"_len": 513} and summary["short"] == "y" * 512
    assert summary["list"] == [{"a": 1}] and summary["empty"] == {"_count": 0}
    node = summary["deep"]
    for _ in range(7):
        node = node["k"]
    assert node == {"_count": 1, "_keys": ["k"]}  # depth 8
    many = {f"key{i}": i for i in range(1000)}
    truncated = extract_summary(many)
    assert truncated["_truncated"] is True and 100 < len(truncated) < 1000


def test_template_accessors() -> None:
    texts = ["{{ load.rows[0].id }} {{ load['x'] }}", "load is plain text", "{{ reload.y }}"]
    assert template_accessors(texts, "load") == [["rows", 0, "id"], ["x"]]
    assert template_accessors(["{% for r in load %}{{ steps.load.z }}{% endfor %}"], "load") == [[]]


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        (["_ref"], True),
        (["count"], True),
        (["absent"], True),
        (["rows", 0, "id"], True),
        (["rows", 1, "id"], False),
        (["rows"], False),
        (["text"], False),
        ([], False),
    ],
)
def test_summary_satisfies(path: list[Any], ok: bool) -> None:
    summary = {"_ref": "noetl://r", "count": 3, "rows": [{"id": 1}], "text": {"_len": 900}}
    assert summary_satisfies(summary, path) is ok


def step_with_ref() -> dict[str, Any]:
    return {"context": {"result": {"status": "success", "reference": {"ref": "noetl://r/1"}}}}


async def test_render_reference_resolved_only_when_needed() -> None:
    full = {"rows": [{"id": 1}, {"id": 2}], "count": 2}
    server = FakeServer({("GET", "/api/result/resolve"): full})
    context = {
        "steps": {"load": step_with_ref()},
        "load": {"_ref": "noetl://r/1", "count": 2, "rows": [{"id": 1}]},
    }
    with trio.fail_after(5):
        same = await resolve_render_references({"q": "{{ load.count }}"}, context, server)
        assert same == context and server.calls == []
        out = await resolve_render_references({"q": "{{ load.rows[1].id }}"}, context, server)
    assert server.calls[0].params == {"ref": "noetl://r/1"}
    assert out["load"] == {**full, "data": full, "_ref": "noetl://r/1"}
    assert out["steps"]["load"] == {"context": {"result": {"status": "success", "context": {"data": full}}}}
    assert context["steps"]["load"] == step_with_ref()  # input not mutated


async def test_render_reference_errors_keep_summary() -> None:
    context = {"steps": {"load": step_with_ref()}, "load": {"rows": [{"id": 1}]}}
    for error in (HTTPStatusError(404, "gone"), TransportError("down")):
        server = FakeServer({("GET", "/api/result/resolve"): error})
        with trio.fail_after(5):
            out = await resolve_render_references("{{ load.rows }}", context, server)
        assert out == context


async def test_resolve_envelopes() -> None:
    envelope = {"kind": "result_ref", "ref": "noetl://execution/1/result/tc/9", "store": "kv"}
    server = FakeServer({("GET", "/api/result/resolve"): lambda params, _: {"resolved": params["ref"]}})
    context = {"tool_config": envelope, "input": {"a": 1}, "spec": {"kind": "x"}}
    with trio.fail_after(5):
        out = await resolve_envelopes(context, server)
        whole = await resolve_envelopes({**envelope, "kind": "temp_ref"}, server)
    assert out == {**context, "tool_config": {"resolved": envelope["ref"]}}
    assert whole == {"resolved": envelope["ref"]}
    server.routes[("GET", "/api/result/resolve")] = HTTPStatusError(404, "unknown")
    with trio.fail_after(5), pytest.raises(HTTPStatusError):
        await resolve_envelopes(context, server)


class RawPutServer(FakeServer):
    async def put_json_bytes(self, path: str, body: bytes) -> Any:
        return self._answer("PUT", path, None, json.loads(body))


async def test_raw_put_sends_the_same_body_without_reserialising() -> None:
    plain, raw = (
        FakeServer({("PUT", "/api/result/7"): PUT_ANSWER}),
        RawPutServer({("PUT", "/api/result/7"): PUT_ANSWER}),
    )
    assert await build(big_result(), plain, None) == await build(big_result(), raw, None)
    assert raw.calls[0].body == plain.calls[0].body
