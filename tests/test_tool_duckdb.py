"""The duckdb tool with real DuckDB (in memory and on a temporary file)."""

from __future__ import annotations

import datetime as dt
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from noetl_worker.errors import ToolConfigError
from noetl_worker.tools import duckdb as duckdb_tool
from noetl_worker.tools.base import ToolResult

from .tool_support import make_ctx


async def _run(**config: Any) -> ToolResult:
    with trio.fail_after(20):
        return await duckdb_tool.run(config, make_ctx())


async def test_in_memory_script_with_affected_rows_and_rows() -> None:
    result = await _run(
        query="""
            CREATE TABLE t (id INTEGER, note VARCHAR, amount DECIMAL(10, 2), day DATE);
            INSERT INTO t VALUES (1, 'a;b', 1.50, DATE '2026-01-02'), (2, $$c;d$$, 2, NULL);
            UPDATE t SET amount = amount * 2 WHERE id = 2;
            SELECT * FROM t ORDER BY id;
        """,
        db_type="duckdb",
    )
    assert result.status == "success", result.error
    data = result.data
    assert [s.get("affected_rows") for s in data["statements"][:3]] == [0, 2, 1]
    assert data["rows"] == [
        {"id": 1, "note": "a;b", "amount": 1.5, "day": "2026-01-02"},
        {"id": 2, "note": "c;d", "amount": 4, "day": None},
    ]
    assert data["row_count"] == 2


async def test_params_positional_named_and_lists() -> None:
    positional = await _run(command="SELECT ?::INT + ?::INT AS s", params=[1, 2], as_objects=False)
    assert positional.data == {"columns": ["s"], "rows": [[3]], "row_count": 1}
    numbered = await _run(query="SELECT $2::VARCHAR || $1::VARCHAR AS s", params=["a", "b"])
    assert numbered.data["rows"] == [{"s": "ba"}]
    named = await _run(query="SELECT $who::VARCHAR AS who", params={"who": "ann"})
    assert named.data["rows"] == [{"who": "ann"}]


async def test_file_database_persists_between_calls(tmp_path: Path) -> None:
    path = str(tmp_path / "db.duckdb")
    await _run(
        db_path=path,
        query="CREATE TABLE k (v TIMESTAMP); INSERT INTO k VALUES (TIMESTAMP '2026-03-04 05:06:07')",
    )
    again = await _run(database=path, query="SELECT v FROM k")
    assert again.data["rows"] == [{"v": dt.datetime(2026, 3, 4, 5, 6, 7).isoformat()}]


async def test_error_names_statement_and_kind() -> None:
    result = await _run(query="SELECT 1; SELECT * FROM nope")
    assert result.status == "error"
    assert result.data["statement_index"] == 1
    assert "CatalogException" in result.data["message"]
    assert "statement 2 of 2" in (result.error or "")


async def test_cancellation_interrupts_the_query() -> None:
    with trio.fail_after(10):
        with trio.move_on_after(0.5) as scope:
            await duckdb_tool.run({"query": "SELECT count(*) FROM range(100000000000) a"}, make_ctx())
    assert scope.cancelled_caught


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({}, "query"),
        ({"query": "SELECT 1", "db_type": "postgres"}, "db_type"),
        ({"query": "SELECT 1", "db_path": 3}, "db_path"),
    ],
)
async def test_config_errors_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        await duckdb_tool.run(config, make_ctx())
    assert info.value.field == field


async def test_concurrent_calls_on_one_file_each_use_their_own_connection(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "shared.duckdb")
    await _run(db_path=path, query="CREATE TABLE c (n INTEGER)")
    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(partial(_run, db_path=path, query="INSERT INTO c VALUES (?)", params=[n]))
    result = await _run(db_path=path, query="SELECT n FROM c ORDER BY n", as_objects=False)
    assert result.data["rows"] == [[0], [1], [2], [3]]


async def test_scripts_are_split_by_duckdbs_own_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    # A valid script never reaches the hand-written splitter: DuckDB's extract_statements cuts it.
    from noetl_worker.tools import _sql

    def refuse(script: str) -> list[str]:
        raise AssertionError("the hand-written splitter was used for a valid DuckDB script")

    monkeypatch.setattr(_sql, "split_statements", refuse)
    result = await _run(
        query=[
            "CREATE MACRO twice(x) AS x * 2; /* a ; in a /* nested */ comment */ "
            "SELECT twice(21) AS v, 'it''s; fine' AS s, $tag$ a;b $tag$ AS d;",
            "PRAGMA version; SELECT [1, 2] AS l, {'k': 'v;w'} AS st",
        ]
    )
    assert result.status == "success", result.error
    statements = result.data["statements"]
    assert len(statements) == 4
    assert statements[1]["rows"] == [{"v": 42, "s": "it's; fine", "d": " a;b "}]
    assert statements[3]["rows"] == [{"l": [1, 2], "st": {"k": "v;w"}}]


async def test_a_statement_that_does_not_parse_is_named() -> None:
    result = await _run(query="SELECT 1; SELECT 2; SELEC oops; SELECT 4")
    assert result.status == "error"
    assert result.data["statement_index"] == 2
    assert "ParserException" in result.data["message"]
    assert "statement 3 of 4" in (result.error or "")


async def test_a_script_of_only_comments_holds_no_statement() -> None:
    with pytest.raises(ToolConfigError, match="holds no SQL statement"):
        await _run(query="-- nothing here\n/* nor here */")
