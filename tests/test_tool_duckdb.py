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


async def test_script_result_is_noetls_summary() -> None:
    result = await _run(
        query="""
            CREATE TABLE t (id INTEGER, note VARCHAR, amount DECIMAL(10, 2), day DATE);
            INSERT INTO t VALUES (1, 'a;b', 1.50, DATE '2026-01-02'), (2, $$c;d$$, 2, NULL);
            UPDATE t SET amount = amount * 2 WHERE id = 2;
            SELECT * FROM t ORDER BY id;
        """,
        db_type="sqlite",  # noetl playbooks name a db_type; offline, it changes nothing
    )
    assert result.status == "success", result.error
    data = result.data
    assert data["executed_commands"] == 4
    assert "command_1_rows" not in data  # CREATE returns no rows
    assert (data["command_2_rows"], data["command_2_sample"]) == (1, [[2]])  # DuckDB's count row
    assert data["command_3_sample"] == [[1]]
    assert data["command_4_rows"] == 2
    assert data["command_4_sample"] == [[1, "a;b", 1.5, "2026-01-02"], [2, "c;d", 4, None]]
    assert data["execution_id"] == "101" and data["database_path"] == ":memory:"
    assert data["secrets_created"] == 0 and isinstance(data["task_id"], str)


async def test_sample_keeps_five_rows_and_counts_all() -> None:
    result = await _run(query="SELECT range AS n FROM range(12)")
    assert result.data["command_1_rows"] == 12
    assert result.data["command_1_sample"] == [[0], [1], [2], [3], [4]]


async def test_params_positional_named_and_lists() -> None:
    positional = await _run(command="SELECT ?::INT + ?::INT AS s", params=[1, 2])
    assert positional.data["command_1_sample"] == [[3]]
    numbered = await _run(query="SELECT $2::VARCHAR || $1::VARCHAR AS s", params=["a", "b"])
    assert numbered.data["command_1_sample"] == [["ba"]]
    named = await _run(query="SELECT $who::VARCHAR AS who", params={"who": "ann"})
    assert named.data["command_1_sample"] == [["ann"]]


async def test_file_database_persists_between_calls(tmp_path: Path) -> None:
    path = str(tmp_path / "db.duckdb")
    await _run(
        db_path=path,
        query="CREATE TABLE k (v TIMESTAMP); INSERT INTO k VALUES (TIMESTAMP '2026-03-04 05:06:07')",
    )
    again = await _run(database=path, query="SELECT v FROM k")
    assert again.data["command_1_sample"] == [[dt.datetime(2026, 3, 4, 5, 6, 7).isoformat()]]
    assert again.data["database_path"] == path


async def test_error_names_statement_and_kind() -> None:
    result = await _run(query="SELECT 1; SELECT * FROM nope; SELECT 3")
    assert result.status == "error"
    assert result.data["errors"][0]["statement_index"] == 1
    assert "CatalogException" in result.data["message"]
    assert result.data["message"].startswith("statement_1: ")
    assert "statement 2 of 3" in (result.error or "")


async def test_cancellation_interrupts_the_query() -> None:
    with trio.fail_after(10):
        with trio.move_on_after(0.5) as scope:
            await duckdb_tool.run({"query": "SELECT count(*) FROM range(100000000000) a"}, make_ctx())
    assert scope.cancelled_caught


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({}, "query"),
        ({"query": "SELECT 1", "db_type": 5}, "db_type"),
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
    result = await _run(db_path=path, query="SELECT n FROM c ORDER BY n")
    assert result.data["command_1_sample"] == [[0], [1], [2], [3]]


async def test_steps_of_one_execution_share_the_data_dir_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOETL_DATA_DIR", str(tmp_path))
    with trio.fail_after(20):
        await duckdb_tool.run(
            {"query": "CREATE TABLE shared (n INT); INSERT INTO shared VALUES (5)"}, make_ctx()
        )
        later = await duckdb_tool.run({"query": "SELECT n FROM shared"}, make_ctx())
    assert later.data["command_1_sample"] == [[5]]
    expected = tmp_path / "noetldb" / "duckdb_101.duckdb"  # make_ctx's execution id
    assert later.data["database_path"] == str(expected) and expected.exists()
    monkeypatch.delenv("NOETL_DATA_DIR")
    with trio.fail_after(20):
        alone = await duckdb_tool.run({"query": "SELECT count(*) FROM shared"}, make_ctx())
    assert alone.status == "error"  # without the data dir each step has its own memory database


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
    assert result.data["executed_commands"] == 4
    assert result.data["command_2_sample"] == [[42, "it's; fine", " a;b "]]
    assert result.data["command_4_sample"] == [[[1, 2], {"k": "v;w"}]]


async def test_a_statement_that_does_not_parse_is_named() -> None:
    result = await _run(query="SELECT 1; SELECT 2; SELEC oops; SELECT 4")
    assert result.status == "error"
    assert result.data["errors"][0]["statement_index"] == 2
    assert "ParserException" in result.data["message"]
    assert "statement 3 of 4" in (result.error or "")


async def test_a_script_of_only_comments_holds_no_statement() -> None:
    with pytest.raises(ToolConfigError, match="holds no SQL statement"):
        await _run(query="-- nothing here\n/* nor here */")
