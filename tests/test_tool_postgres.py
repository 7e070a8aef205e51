"""The postgres tool against a real PostgreSQL (NOETL_TEST_PG_DSN, default the local trust one).

Each test makes its own uniquely named table and drops it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from noetl_worker.errors import ToolConfigError
from noetl_worker.tools import postgres
from noetl_worker.tools.base import ToolResources, ToolResult

from .tool_support import make_ctx

DSN = os.environ.get("NOETL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def resources() -> AsyncIterator[ToolResources]:
    shared = ToolResources()
    yield shared
    with trio.fail_after(10):
        await shared.aclose()


@pytest.fixture
async def table(resources: ToolResources) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    await _run(resources, query=f"DROP TABLE IF EXISTS {name}")


async def _run(resources: ToolResources, **config: Any) -> ToolResult:
    config.setdefault("connection_string", DSN)
    with trio.fail_after(20):
        return await postgres.run(config, make_ctx(resources))


async def test_script_with_rows_and_affected_counts(resources: ToolResources, table: str) -> None:
    script = f"""
        CREATE TABLE {table} (id int primary key, note text, amount numeric, at timestamptz,
                              u uuid, raw bytea);
        -- a comment; with a semicolon
        INSERT INTO {table} VALUES
          (1, 'it''s; here', 12.50, '2026-01-02T03:04:05Z', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '\\x0102'),
          (2, $$dollar; quoted$$, 7, NULL, NULL, NULL);
        SELECT id, note, amount, at, u, raw FROM {table} ORDER BY id;
    """
    result = await _run(resources, query=script)
    assert result.status == "success", result.error
    data = result.data
    assert data["statement_count"] == 3
    assert data["status"] == "success"  # the last statement's result, as noetl's worker stores it
    assert "statements" not in data
    assert data["columns"] == ["id", "note", "amount", "at", "u", "raw"]
    assert data["row_count"] == 2
    assert data["rows"][0] == {
        "id": 1,
        "note": "it's; here",
        "amount": 12.5,
        "at": "2026-01-02T03:04:05+00:00",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "raw": "AQI=",
    }
    assert data["rows"][1]["note"] == "dollar; quoted"
    assert data["rows"][1]["amount"] == 7


async def test_rows_as_lists_and_params(resources: ToolResources) -> None:
    lists = await _run(
        resources, command="SELECT %s::int AS a, %s::text AS b", params=[1, "x"], as_objects=False
    )
    assert lists.data == {
        "status": "success",
        "columns": ["a", "b"],
        "rows": [[1, "x"]],
        "row_count": 1,
        "statement_count": 1,
    }
    named = await _run(resources, sql="SELECT %(v)s::int * 2 AS twice", params={"v": 21})
    assert named.data["rows"] == [{"twice": 42}]
    # The Rust worker's $n markers, repeated and out of order, beside a literal '%'.
    rust = await _run(resources, query="SELECT $2::text || '%' || $1::text AS s", params=["a", "b"])
    assert rust.data["rows"] == [{"s": "b%a"}]


async def test_base64_query_field(resources: ToolResources) -> None:
    import base64

    encoded = base64.b64encode(b"SELECT 'b64' AS source").decode()
    result = await _run(resources, query_b64=encoded)
    assert result.data["rows"] == [{"source": "b64"}]


async def test_dml_result_and_sql_aliases(resources: ToolResources, table: str) -> None:
    await _run(resources, commands=[f"CREATE TABLE {table} (n int)"])
    result = await _run(resources, cmds=[f"INSERT INTO {table} VALUES (1), (2)"])
    assert result.data == {
        "status": "success",
        "row_count": 2,
        "message": "Command executed. 2 rows affected.",
        "statement_count": 1,
    }
    counted = await _run(resources, queries=[f"SELECT count(*) AS n FROM {table}"])
    assert counted.data["rows"] == [{"n": 2}]


async def test_sql_error_reports_sqlstate_and_statement(resources: ToolResources) -> None:
    result = await _run(resources, query="SELECT 1; SELECT * FROM no_such_table_here; SELECT 3")
    assert result.status == "error"
    assert result.data["status"] == "error"
    assert result.data["sqlstate"] == "42P01"
    assert result.data["errors"][0]["statement_index"] == 1
    assert "no_such_table_here" in result.data["errors"][0]["message"]
    assert result.data["message"].startswith("statement_1: ")
    assert result.data["statement_count"] == 2  # the third statement did not run
    assert "SQLSTATE 42P01" in (result.error or "")
    again = await _run(resources, query="SELECT 2 AS ok")  # the pooled connection survived
    assert again.data["rows"] == [{"ok": 2}]


async def test_connection_fields_and_schema(resources: ToolResources, table: str) -> None:
    import psycopg.conninfo

    parts = psycopg.conninfo.conninfo_to_dict(DSN)
    fields = {
        "host": parts.get("host", "127.0.0.1"),
        "port": parts.get("port", 5432),
        "database": parts.get("dbname", "test"),
        "user": parts.get("user", "postgres"),
        "password": parts.get("password"),
    }
    with trio.fail_after(20):
        result = await postgres.run(
            {**fields, "schema": "pg_catalog", "query": "SHOW search_path"}, make_ctx(resources)
        )
    assert result.data["rows"] == [{"search_path": "pg_catalog"}]


async def test_connection_failure_is_an_error_result(resources: ToolResources) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await _run(
        resources, connection_string=f"postgresql://postgres@127.0.0.1:{port}/x", query="SELECT 1"
    )
    assert result.status == "error"
    assert result.data["status"] == "error" and "errors" not in result.data


async def test_cancel_stops_the_query_on_the_server(resources: ToolResources) -> None:
    marker = f"cancel_{uuid.uuid4().hex}"
    with trio.fail_after(10):
        with trio.move_on_after(0.5) as scope:
            await postgres.run(
                {"connection_string": DSN, "query": f"SELECT pg_sleep(30) /* {marker} */"},
                make_ctx(resources),
            )
    assert scope.cancelled_caught
    active = await _run(
        resources,
        query="SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
        " AND pid <> pg_backend_pid()",
        params=[f"%{marker}%"],
    )
    assert active.data["rows"] == []


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"connection_string": DSN}, "query"),
        ({"query": "SELECT 1"}, "connection_string"),
        ({"connection_string": DSN, "query": "  ;  -- nothing"}, "query"),
        ({"connection_string": DSN, "query": "SELECT 1", "params": "x"}, "params"),
        ({"connection_string": DSN, "query": "SELECT $2", "params": [1]}, "params"),
        ({"connection_string": DSN, "query": "SELECT 1", "as_objects": "maybe"}, "as_objects"),
        ({"connection_string": DSN, "query_b64": "%%%"}, "query_b64"),
    ],
)
async def test_config_errors_name_the_field(
    resources: ToolResources, config: dict[str, Any], field: str
) -> None:
    with pytest.raises(ToolConfigError) as info:
        await postgres.run(config, make_ctx(resources))
    assert info.value.field == field


async def test_pooled_connections_are_reused_and_closed_on_shutdown(
    resources: ToolResources,
) -> None:
    app = f"pool_{uuid.uuid4().hex[:12]}"
    owned = ToolResources()
    dsn = f"{DSN}{'&' if '?' in DSN else '?'}application_name={app}"
    for _ in range(3):
        await _run(owned, connection_string=dsn, query="SELECT 1")
    count = "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = %s"
    before = await _run(resources, query=count, params=[app])
    assert before.data["rows"] == [{"n": 1}]
    with trio.fail_after(10):
        await owned.aclose()
    # A backend leaves pg_stat_activity a moment after its client said goodbye.
    with trio.fail_after(5):
        while True:
            after = await _run(resources, query=count, params=[app])
            if after.data["rows"] == [{"n": 0}]:
                break
            await trio.sleep(0.05)
