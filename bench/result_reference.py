"""Bench: a ~50 MB tabular tool result through build_call_done_result.

In-process fake server whose PUT serialises the body as an HTTP client would; a real IpcCache
in /dev/shm. Prints wall times per phase and peak RSS. Run from the repository root:

    python bench/result_reference.py [--mb 50] [--raw]
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

try:
    from noetl_worker.scrub import scrub_serialised
except ImportError:  # an older build measured with PYTHONPATH=<its src>
    scrub_serialised = None  # type: ignore[assignment]


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


RESULT: dict[str, Any] | None = None  # --json: the numbers of build_call_done_result


def rss_mb() -> float:
    """Peak RSS since the last reset_peak() (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start a new peak-RSS measurement from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


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


async def main(target_mb: int, raw: bool, only_build: bool) -> None:
    tool_result = make_rows(target_mb)
    body = compact_json(tool_result)
    print(f"rows={len(tool_result['data']['rows'])} json_bytes={len(body):,}")
    if RESULT is not None:
        RESULT["json_mib"] = len(body) / 2**20
    del body
    reset_peak()
    baseline = rss_mb()
    print(f"RSS after building the input: {baseline:.0f} MiB")

    scrubber = Scrubber.create(["hunter2-secret"])
    if only_build:
        await build(tool_result, scrubber, raw, baseline)
        return
    started, cpu = time.perf_counter(), time.process_time()
    scrubbed = scrubber.scrub(tool_result)
    print(f"tree scrub alone: {time.perf_counter() - started:.2f} s (CPU {time.process_time() - cpu:.2f} s)")
    started, cpu = time.perf_counter(), time.process_time()
    if scrub_serialised is not None:
        scrub_serialised(scrubber, tool_result, compact_json)
    print(
        f"scrub + serialise in one pass: {time.perf_counter() - started:.2f} s "
        f"(CPU {time.process_time() - cpu:.2f} s)"
    )
    started = time.perf_counter()
    encoded = encode_payload(scrubbed)
    print(
        f"arrow encode alone: {time.perf_counter() - started:.2f} s "
        f"({len(encoded.data):,} bytes, {encoded.media_type})"
    )
    del scrubbed, encoded
    await build(tool_result, scrubber, raw, baseline)


async def build(tool_result: dict[str, Any], scrubber: Scrubber, raw: bool, baseline: float) -> None:
    # Steady state: a worker imports pyarrow (~27 MiB) on its first large result and keeps it;
    # that one-time cost is not what a result costs.
    import pyarrow  # noqa: F401

    reset_peak()
    baseline = rss_mb()
    cache = IpcCache(268_435_456, "bench-node", "bench", namespace=f"bench{os.getpid() % 10000}")
    server = RawPutServer() if raw else FakeServer()
    print(f"server client: {'put_json_bytes (pre-serialised body)' if raw else 'put_json'}")
    try:
        started, cpu = time.perf_counter(), time.process_time()
        result = await build_call_done_result(
            tool_result,
            execution_id=1,
            step="load",
            server=server,
            scrubber=scrubber,
            inline_max_bytes=102_400,
            ipc_cache=cache,
        )
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        cache.close()
    ipc = result["reference"].get("ipc", {})
    print(
        f"build_call_done_result: {wall:.2f} s, CPU {cpu:.2f} s (PUT body {server.put_bytes:,} bytes, "
        f"shm {ipc.get('byte_length', 0):,} bytes {ipc.get('media_type')})"
    )
    blocked = server.put_seconds
    print(f"  of which the PUT client blocked the trio thread: {blocked:.2f} s")
    print(f"peak RSS overall: {rss_mb():.0f} MiB (+{rss_mb() - baseline:.0f} MiB over the input)")
    if RESULT is not None:
        RESULT.update(
            wall_s=wall, cpu_s=cpu, rss_above_input_mib=rss_mb() - baseline, load=os.getloadavg()[0]
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--raw", action="store_true", help="client with put_json_bytes")
    parser.add_argument(
        "--only-build", action="store_true", help="only build_call_done_result (its own peak RSS)"
    )
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    args = parser.parse_args()
    if args.json:
        RESULT = {"cores": os.cpu_count()}
    trio.run(main, args.mb, args.raw, args.only_build)
    if RESULT is not None:
        print(json.dumps(RESULT, sort_keys=True))
