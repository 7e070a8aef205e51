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

Scripts are split into statements by DuckDB's own parser (``extract_statements``), which knows
DuckDB's dialect exactly; the hand-written splitter of ``_sql`` is used only to name the
statement that does not parse.

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
    scripts = _sqltool.read_statements(KIND, config, ctx, split=_whole_script)
    params = _sqltool.read_params(KIND, config, ctx)
    read_only = _fields.flag(KIND, config, "read_only", default=False)

    try:
        conn = await trio.to_thread.run_sync(_connect, path, read_only)
    except duckdb.Error as exc:
        return _sqltool.error_result(KIND, None, _message(exc), None, len(scripts))
    try:
        stop = threading.Event()

        def interrupt() -> None:
            stop.set()
            conn.interrupt()

        results = await run_interruptible(lambda: _execute(conn, scripts, params, stop), interrupt)
    except _StatementError as exc:
        return _sqltool.error_result(KIND, None, _message(exc.error), exc.index, exc.total)
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
    def __init__(self, index: int, error: duckdb.Error, total: int) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error
        self.total = total


def _whole_script(text: str) -> list[str]:
    return [text] if text.strip() else []


def _statements(conn: duckdb.DuckDBPyConnection, scripts: list[str]) -> list[str]:
    """Every statement of the scripts, in order, as DuckDB's parser splits them."""
    out: list[str] = []
    for script in scripts:
        try:
            parsed = conn.extract_statements(script)
        except duckdb.Error as exc:
            # Say which statement does not parse: find it among the script's pieces.
            pieces = _sql.split_statements(script)
            total = len(out) + len(pieces)
            for piece in pieces:
                try:
                    (statement,) = conn.extract_statements(piece) or (None,)
                except (duckdb.Error, ValueError) as inner:
                    error = inner if isinstance(inner, duckdb.Error) else exc
                    raise _StatementError(len(out), error, total) from exc
                if statement is not None:
                    out.append(statement.query)
            raise _StatementError(len(out), exc, max(total, len(out) + 1)) from exc
        out.extend(s.query for s in parsed)
    return out


class _Stopped(Exception):
    """The command was cancelled between two statements."""


def _execute(
    conn: duckdb.DuckDBPyConnection, scripts: list[str], params: Any, stop: threading.Event
) -> list[list[Any]]:
    """Every statement's rows (DML gives DuckDB's one-row count, as noetl's summary shows)."""
    statements = _statements(conn, scripts)
    if not statements:
        raise ToolConfigError(KIND, "query", "holds no SQL statement")
    results: list[list[Any]] = []
    for index, statement in enumerate(statements):
        if stop.is_set():
            raise _Stopped
        bound = params if params is not None and _sql.has_markers(statement) else None
        try:
            conn.execute(statement, bound)
            rows = conn.fetchall() if conn.description else []
        except duckdb.Error as exc:
            raise _StatementError(index, exc, len(statements)) from exc
        results.append(list(rows))
    return results


def _message(error: duckdb.Error) -> str:
    return f"{type(error).__name__}: {str(error).strip()}"
