"""Bench: a ~50 MB tabular tool result through build_call_done_result.

In-process fake server whose PUT serialises the body as an HTTP client would; a real IpcCache
in /dev/shm. Prints wall times per phase and peak RSS. Run from the repository root:

    .venv/bin/python bench/result_reference.py [--mb 50] [--raw]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Mapping
from typing import Any

import trio

from noetl_worker.ipc_cache import IpcCache, compact_json, encode_payload
from noetl_worker.results import build_call_done_result
from noetl_worker.scrub import Scrubber


class FakeServer:
    def __init__(self) -> None:
        self.put_bytes = 0
        self.put_seconds = 0.0

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        raise NotImplementedError

    async def post_json(self, path: str, body: Any) -> Any:
        raise NotImplementedError

    async def put_json(self, path: str, body: Any) -> Any:
        # What an HTTP client does with the body (on the trio thread, like httpx's json=).
        started = time.perf_counter()
        self.put_bytes = len(json.dumps(body).encode())
        self.put_seconds = time.perf_counter() - started
        return {"ref": "noetl://execution/1/result/load/x", "store": "disk", "scope": "execution"}


class RawPutServer(FakeServer):
    """A client offering ``put_json_bytes``: the already serialised body is sent as is."""

    async def put_json_bytes(self, path: str, body: bytes) -> Any:
        started = time.perf_counter()
        self.put_bytes = len(body)
        self.put_seconds = time.perf_counter() - started
        return {"ref": "noetl://execution/1/result/load/x", "store": "disk", "scope": "execution"}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_rows(target_mb: int) -> dict[str, Any]:
    rows = []
    size = 0
    i = 0
    while size < target_mb * 1_000_000:
        row = {
            "id": i,
            "name": f"customer-{i}",
            "city": "Springfield",
            "amount": i * 0.25,
            "note": "ordinary text without secrets",
            "active": i % 2 == 0,
        }
        rows.append(row)
        size += 130
        i += 1
    return {"status": "success", "data": {"columns": list(rows[0]), "rows": rows}}


async def main(target_mb: int, raw: bool) -> None:
    tool_result = make_rows(target_mb)
    body = compact_json(tool_result)
    print(f"rows={len(tool_result['data']['rows'])} json_bytes={len(body):,}")
    baseline = rss_mb()
    print(f"peak RSS after building the input: {baseline:.0f} MiB")

    scrubber = Scrubber.create(["hunter2-secret"])
    started = time.perf_counter()
    scrubbed = scrubber.scrub(tool_result)
    print(f"scrub alone: {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    encoded = encode_payload(scrubbed, json_bytes=body)
    print(
        f"arrow encode alone: {time.perf_counter() - started:.2f} s "
        f"({len(encoded.data):,} bytes, {encoded.media_type})"
    )
    del scrubbed, encoded

    cache = IpcCache(268_435_456, "bench-node", "bench", namespace=f"bench{os.getpid() % 10000}")
    server = RawPutServer() if raw else FakeServer()
    print(f"server client: {'put_json_bytes (pre-serialised body)' if raw else 'put_json'}")
    try:
        started = time.perf_counter()
        result = await build_call_done_result(
            tool_result,
            execution_id=1,
            step="load",
            server=server,
            scrubber=scrubber,
            inline_max_bytes=102_400,
            ipc_cache=cache,
        )
        wall = time.perf_counter() - started
    finally:
        cache.close()
    ipc = result["reference"].get("ipc", {})
    print(
        f"build_call_done_result: {wall:.2f} s (PUT body {server.put_bytes:,} bytes, "
        f"shm {ipc.get('byte_length', 0):,} bytes {ipc.get('media_type')})"
    )
    blocked = server.put_seconds
    print(f"  of which the PUT client blocked the trio thread: {blocked:.2f} s")
    print(f"peak RSS overall: {rss_mb():.0f} MiB (+{rss_mb() - baseline:.0f} MiB over the input)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--raw", action="store_true", help="client with put_json_bytes")
    args = parser.parse_args()
    trio.run(main, args.mb, args.raw)
