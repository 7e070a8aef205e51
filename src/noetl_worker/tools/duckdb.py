"""``duckdb``: run SQL in DuckDB, in a worker thread, with one connection per call.

Config: the SQL fields of ``_sqltool`` (``query`` | ``command`` | …), ``params`` (list for
``?`` / ``$1``, object for ``$name``), ``db_path`` | ``database`` (when absent: the file
``$NOETL_DATA_DIR/noetldb/duckdb_<execution_id>.duckdb`` shared by the steps of one execution,
as noetl's worker does, if ``NOETL_DATA_DIR`` is set; else in memory),
``read_only``; ``db_type`` (noetl's worker loads a DuckDB extension for it, downloading it if
needed) is accepted and ignored: the worker must work offline.

Result ``data`` (as noetl's Python worker stores it), a summary: ``executed_commands``, and for
every statement *n* (from 1) that returned rows ``command_<n>_rows`` (how many) and
``command_<n>_sample`` (the first five, as lists), plus ``task_id``, ``execution_id``,
``secrets_created`` (0) and ``database_path``. A failing statement stops the script: status
``error``.

A connection per call keeps concurrent commands apart (a DuckDB connection must not be used by
two threads at once); calls on the same file share DuckDB's in-process database instance.
Extensions are never installed from the network: the worker must work offline.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping
from functools import partial
from typing import Any

import duckdb
import trio

from ..errors import ToolConfigError, ToolError
from . import _fields, _sql, _sqltool
from ._blocking import run_interruptible
from ._jsonsafe import json_safe
from .base import ToolContext, ToolResult

KIND = "duckdb"


SAMPLE_ROWS = 5
DATA_DIR_ENV = "NOETL_DATA_DIR"


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    db_type = config.get("db_type")
    if db_type is not None and not isinstance(db_type, str):
        raise ToolConfigError(KIND, "db_type", f"expected a name such as sqlite or postgres, got {db_type!r}")
    found = _fields.first(config, "db_path", "database")
    path = ctx.render(found[1]) if found else await _default_path(ctx)
    if not isinstance(path, str) or not path:
        field = found[0] if found else "db_path"
        raise ToolConfigError(KIND, field, f"expected a file path or ':memory:', got {path!r}")
    statements = _sqltool.read_statements(KIND, config, ctx)
    params = _sqltool.read_params(KIND, config, ctx)
    read_only = _fields.flag(KIND, config, "read_only", default=False)
    bound = [(s, params if params is not None and _sql.has_markers(s) else None) for s in statements]

    try:
        conn = await trio.to_thread.run_sync(_connect, path, read_only)
    except duckdb.Error as exc:
        return _sqltool.error_result(KIND, None, _message(exc), None, len(statements))
    try:
        stop = threading.Event()

        def interrupt() -> None:
            stop.set()
            conn.interrupt()

        results = await run_interruptible(lambda: _execute(conn, bound, stop), interrupt)
    except _StatementError as exc:
        return _sqltool.error_result(KIND, None, _message(exc.error), exc.index, len(statements))
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close)
    return ToolResult("success", data=_summary(results, path, ctx))


async def _default_path(ctx: ToolContext) -> str:
    """noetl's default, one file per execution under ``NOETL_DATA_DIR`` (so the steps of an
    execution share their tables), when that directory is configured; else in memory."""
    data_dir = os.environ.get("NOETL_DATA_DIR", "").strip()
    if not data_dir:
        return ":memory:"
    folder = os.path.join(data_dir, "noetldb")
    try:
        await trio.to_thread.run_sync(partial(os.makedirs, folder, exist_ok=True))
    except OSError as exc:
        raise ToolError(f"duckdb: cannot create {folder} ({DATA_DIR_ENV}): {exc}") from exc
    return os.path.join(folder, f"duckdb_{ctx.execution_id}.duckdb")


def _summary(results: list[list[Any]], path: str, ctx: ToolContext) -> dict[str, Any]:
    summary: dict[str, Any] = {"executed_commands": len(results), "task_id": str(uuid.uuid4())}
    for number, rows in enumerate(results, start=1):
        if rows:
            summary[f"command_{number}_rows"] = len(rows)
            summary[f"command_{number}_sample"] = [[json_safe(v) for v in row] for row in rows[:SAMPLE_ROWS]]
    summary.update(execution_id=str(ctx.execution_id), secrets_created=0, database_path=path)
    return summary


def _connect(path: str, read_only: bool) -> duckdb.DuckDBPyConnection:
    config: dict[str, str | bool | int | float | list[str]] = {"autoinstall_known_extensions": False}
    return duckdb.connect(path, read_only=read_only, config=config)


class _StatementError(Exception):
    def __init__(self, index: int, error: duckdb.Error) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class _Stopped(Exception):
    """The command was cancelled between two statements."""


def _execute(
    conn: duckdb.DuckDBPyConnection, bound: list[tuple[str, Any]], stop: threading.Event
) -> list[list[Any]]:
    """Every statement's rows (DML gives DuckDB's one-row count, as noetl's summary shows)."""
    results: list[list[Any]] = []
    for index, (statement, params) in enumerate(bound):
        if stop.is_set():
            raise _Stopped
        try:
            conn.execute(statement, params)
            rows = conn.fetchall() if conn.description else []
        except duckdb.Error as exc:
            raise _StatementError(index, exc) from exc
        results.append(list(rows))
    return results


def _message(error: duckdb.Error) -> str:
    return f"{type(error).__name__}: {str(error).strip()}"
