"""transfer: real PostgreSQL, real DuckDB files, a real HTTP source; chunks, modes, mapping."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
import trio

from noetl_worker.config import Bind
from noetl_worker.errors import ToolConfigError
from noetl_worker.http_server import answer_lifespan, serve_http
from noetl_worker.metrics import Metrics
from noetl_worker.tools import transfer
from noetl_worker.tools.base import ToolResources, ToolResult

from ..tool_support import make_ctx

DSN = os.environ.get("NOETL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def pg(sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(DSN, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def pg_table() -> Iterator[str]:
    name = f"tr_{uuid.uuid4().hex[:10]}"
    pg(f"CREATE TABLE {name} (id int PRIMARY KEY, name text, score double precision)")
    yield name
    pg(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def duck(tmp_path: Path) -> str:
    path = str(tmp_path / "t.duckdb")
    with duckdb.connect(path) as conn:
        conn.execute("CREATE TABLE people (person_id INTEGER PRIMARY KEY, label VARCHAR, score DOUBLE)")
        conn.execute("CREATE TABLE strict_t (id INTEGER, name VARCHAR NOT NULL, score DOUBLE)")
    return path


def duck_rows(path: str, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def call(resources: ToolResources | None = None, **config: Any) -> ToolResult:
    with trio.fail_after(60):
        return await transfer.run(config, make_ctx(resources or ToolResources()))


SOURCE_SQL = "SELECT n AS id, 'name-' || n AS name, n * 0.5 AS score FROM generate_series(1, 2500) AS n"


async def test_postgres_to_duckdb_in_chunks_with_a_mapping(duck: str) -> None:
    metrics = Metrics()
    result = await call(
        ToolResources(metrics=metrics),
        source={"type": "postgres", "connection_string": DSN, "query": SOURCE_SQL},
        target={
            "type": "duckdb",
            "db_path": duck,
            "table": "people",
            "mapping": {"person_id": "id", "label": "name", "score": "score"},
        },
        chunk_size=1000,
    )
    assert result.status == "success", result.error
    assert {k: result.data[k] for k in ("rows_read", "rows_written", "chunks")} == {
        "rows_read": 2500,
        "rows_written": 2500,
        "chunks": 3,
    }
    assert isinstance(result.data["duration_ms"], int)
    assert duck_rows(duck, "SELECT count(*), max(person_id), min(label) FROM people") == [
        (2500, 2500, "name-1")
    ]
    assert (
        metrics.registry.get_sample_value("noetl_worker_transfer_rows_total", {"direction": "written"})
        == 2500
    )


async def test_duckdb_to_postgres_replace_empties_the_target_first(duck: str, pg_table: str) -> None:
    pg(f"INSERT INTO {pg_table} VALUES (999, 'old', 0)")
    with duckdb.connect(duck) as conn:
        conn.execute("INSERT INTO people SELECT range, 'p' || range, range FROM range(1, 11)")
    result = await call(
        source={
            "type": "duckdb",
            "db_path": duck,
            "query": "SELECT person_id AS id, label AS name, score FROM people",
        },
        target={"type": "postgres", "connection_string": DSN, "table": pg_table},
        mode="replace",
        chunk_size=3,
    )
    assert result.status == "success", result.error
    assert result.data["chunks"] == 4
    assert pg(f"SELECT count(*), min(id), max(id) FROM {pg_table}") == [(10, 1, 10)]


async def test_upsert_updates_by_key_and_inserts_the_rest(pg_table: str) -> None:
    pg(f"INSERT INTO {pg_table} VALUES (1, 'old', 0), (50, 'untouched', 0)")
    result = await call(
        source={
            "type": "postgres",
            "connection_string": DSN,
            "query": "SELECT n AS id, 'new' AS name, 1.0 AS score FROM generate_series(1, 5) n",
        },
        target={"type": "postgres", "connection_string": DSN, "table": pg_table, "key": "id"},
        mode="upsert",
        chunk_size=2,
    )
    assert result.status == "success", result.error
    assert pg(f"SELECT id, name FROM {pg_table} ORDER BY id") == [
        (1, "new"), (2, "new"), (3, "new"), (4, "new"), (5, "new"), (50, "untouched"),
    ]  # fmt: skip


async def test_a_failing_write_names_the_chunk_and_commits_nothing(duck: str) -> None:
    source = (
        "SELECT n AS id, CASE WHEN n = 4 THEN NULL ELSE 'x' END AS name, 0.0 AS score"
        " FROM generate_series(1, 6) n"
    )
    result = await call(
        source={"type": "postgres", "connection_string": DSN, "query": source},
        target={"type": "duckdb", "db_path": duck, "table": "strict_t"},
        chunk_size=2,
    )
    assert result.status == "error"
    assert "write chunk 2 (rows 3-4)" in (result.error or "") and "strict_t" in (result.error or "")
    assert result.data["failed_chunk"] == 2 and result.data["rows_written"] == 0
    assert duck_rows(duck, "SELECT count(*) FROM strict_t") == [(0,)]


async def test_commit_per_chunk_keeps_the_chunks_before_a_failure(duck: str) -> None:
    source = (
        "SELECT n AS id, CASE WHEN n = 4 THEN NULL ELSE 'x' END AS name, 0.0 AS score"
        " FROM generate_series(1, 6) n"
    )
    result = await call(
        source={"type": "postgres", "connection_string": DSN, "query": source},
        target={"type": "duckdb", "db_path": duck, "table": "strict_t"},
        chunk_size=2,
        commit="chunk",
    )
    assert result.status == "error" and "2 rows of earlier chunks stay committed" in (result.error or "")
    assert result.data["rows_written"] == 2
    assert duck_rows(duck, "SELECT count(*) FROM strict_t") == [(2,)]


async def test_the_postgres_source_is_streamed_chunk_by_chunk(duck: str) -> None:
    # Row 2500 divides by zero: with a server-side cursor the first two chunks have already
    # been read (and written, uncommitted) when chunk 3 fails; a client-side cursor would fail
    # before reading anything.
    source = "SELECT n AS person_id, 'x' AS label, 1.0 / (n - 2500) AS score FROM generate_series(1, 3000) n"
    result = await call(
        source={"type": "postgres", "connection_string": DSN, "query": source},
        target={"type": "duckdb", "db_path": duck, "table": "people"},
        chunk_size=1000,
    )
    assert result.status == "error" and "read chunk 3" in (result.error or "")
    assert result.data["rows_read"] == 2000 and result.data["rows_written_before_rollback"] == 2000
    assert duck_rows(duck, "SELECT count(*) FROM people") == [(0,)]


@pytest.fixture
async def http_source() -> AsyncIterator[str]:
    rows = [{"id": i, "name": f"h{i}", "score": i / 2} for i in range(1, 8)]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = json.dumps({"result": {"items": rows}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve_http, app, Bind("127.0.0.1", 0), stop)
        yield urls[0]
        stop.set()


async def test_http_source_rows_at_a_data_path(http_source: str, pg_table: str) -> None:
    result = await call(
        source={"type": "http", "url": f"{http_source}/rows", "data_path": "result.items"},
        target={"type": "postgres", "connection_string": DSN, "table": pg_table},
        chunk_size=5,
    )
    assert result.status == "success", result.error
    assert result.data["rows_read"] == 7 and result.data["chunks"] == 2
    assert pg(f"SELECT count(*), max(name) FROM {pg_table}") == [(7, "h7")]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"target": {"type": "duckdb", "table": "t", "db_path": ":memory:"}}, "source"),
        ({"source": {"type": "mysql"}, "target": {"type": "duckdb", "table": "t"}}, "source.type"),
        ({"source": {"type": "duckdb"}, "target": {"type": "http", "table": "t"}}, "target.type"),
        ({"source": {"type": "duckdb"}, "target": {"type": "duckdb"}}, "target.table"),
        (
            {"source": {"type": "duckdb"}, "target": {"type": "duckdb", "table": "t"}, "mode": "upsert"},
            "target.key",
        ),
        ({"source": {"type": "duckdb"}, "target": {"type": "duckdb", "table": "t"}, "mode": "merge"}, "mode"),
        (
            {"source": {"type": "duckdb"}, "target": {"type": "duckdb", "table": "t"}, "chunk_size": 0},
            "chunk_size",
        ),
        (
            {
                "source": {"type": "postgres", "query": "SELECT 1"},
                "target": {"type": "duckdb", "table": "t", "db_path": ":memory:"},
            },
            "source.connection_string",
        ),
    ],
)
async def test_config_errors_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        await call(**config)
    assert info.value.field == field


async def test_a_mapping_to_a_missing_source_column_is_a_config_error(duck: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        await call(
            source={"type": "postgres", "connection_string": DSN, "query": "SELECT 1 AS id"},
            target={"type": "duckdb", "db_path": duck, "table": "people", "mapping": {"person_id": "nope"}},
        )
    assert info.value.field == "target.mapping" and "nope" in str(info.value)
