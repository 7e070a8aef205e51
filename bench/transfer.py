"""Bench: the transfer tool moving N rows (default 1,000,000) from PostgreSQL into DuckDB.

A source table of ``--rows`` rows (id int, name text, score double, created timestamptz) is
created in PostgreSQL (NOETL_TEST_PG_DSN, default the local trust one) and copied into a fresh
DuckDB file by ``noetl_worker.tools.transfer`` — the same code a playbook step runs. Prints rows/s,
wall time and the peak RSS of this process before and during the transfer (the point: the
source is streamed, so peak RSS does not grow with the row count); with ``--json`` also one JSON
line of those numbers (``bench/run.py`` reads it). Run from the repository root:

    PYTHONPATH=src .venv/bin/python bench/transfer.py [--rows 1000000] [--chunk 10000] \
        [--commit end|chunk] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import uuid
from pathlib import Path

import duckdb
import psycopg
import trio

from noetl_worker.config import Settings
from noetl_worker.tools import transfer
from noetl_worker.tools.base import ToolContext, ToolResources

DSN = os.environ.get("NOETL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class NoServer:
    async def get_json(self, path: str, *, params: object = None) -> object:
        raise NotImplementedError

    async def post_json(self, path: str, body: object) -> object:
        raise NotImplementedError

    async def put_json(self, path: str, body: object) -> object:
        raise NotImplementedError


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--commit", choices=("end", "chunk"), default="end")
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = parser.parse_args()

    table = f"bench_transfer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} AS SELECT n AS id, 'name-' || n AS name, n * 0.25 AS score,"
            f" now() - n * interval '1 second' AS created FROM generate_series(1, {args.rows}) n"
        )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "bench.duckdb")
            with duckdb.connect(path) as duck:
                duck.execute(
                    "CREATE TABLE target (id INTEGER, name VARCHAR, score DOUBLE, created TIMESTAMPTZ)"
                )
            config = {
                "source": {"type": "postgres", "connection_string": DSN, "query": f"SELECT * FROM {table}"},
                "target": {"type": "duckdb", "db_path": path, "table": "target"},
                "chunk_size": args.chunk,
                "commit": args.commit,
            }
            ctx = ToolContext(
                execution_id=1,
                step="bench",
                command_id="1",
                worker_id="bench",
                server_url="http://127.0.0.1:1",
                variables={},
                secrets={},
                server=NoServer(),
                resources=ToolResources(),
                settings=Settings.from_env({}),
            )
            rss_before = rss_mb()
            started = time.perf_counter()
            result = trio.run(transfer.run, config, ctx)
            elapsed = time.perf_counter() - started
            rss_peak = rss_mb()
            with duckdb.connect(path) as duck:
                (count,) = duck.execute("SELECT count(*) FROM target").fetchone() or (0,)
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")
    assert result.status == "success", result.error
    assert count == args.rows, count
    out = {
        "rows": args.rows,
        "chunk_size": args.chunk,
        "commit": args.commit,
        "chunks": result.data["chunks"],
        "wall_s": elapsed,
        "rows_per_s": args.rows / elapsed,
        "rss_start_mib": rss_before,
        "rss_peak_mib": rss_peak,
        "rss_above_start_mib": rss_peak - rss_before,
    }
    print(f"rows={args.rows} chunk_size={args.chunk} commit={args.commit} chunks={out['chunks']}")
    print(f"wall={elapsed:.2f}s rows/s={out['rows_per_s']:,.0f}")
    print(
        f"peak RSS: before={rss_before:.0f} MiB after={rss_peak:.0f} MiB (+{rss_peak - rss_before:.0f} MiB)"
    )
    if args.json:
        print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
