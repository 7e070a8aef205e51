"""``duckdb``: run SQL in DuckDB, in a worker thread, with one connection per call.

Config: the SQL fields of ``_sqltool`` (``query`` | ``command`` | …), ``params`` (list for
``?`` / ``$1``, object for ``$name``), ``db_path`` | ``database`` (in-memory when absent),
``as_objects`` (true), ``read_only``; ``db_type`` is accepted when it is ``duckdb``. Results
have the postgres tool's shape.

Scripts are split into statements by DuckDB's own parser (``extract_statements``), which knows
DuckDB's dialect exactly and gives each statement's type; the hand-written splitter of ``_sql``
is used only to name the statement that does not parse.

A connection per call keeps concurrent commands apart (a DuckDB connection must not be used by
two threads at once); calls on the same file share DuckDB's in-process database instance.
Extensions are never installed from the network: the worker must work offline.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import duckdb
import trio

from ..errors import ToolConfigError
from . import _fields, _sql, _sqltool
from ._blocking import run_interruptible
from .base import ToolContext, ToolResult

KIND = "duckdb"
# Statement types whose result is rows even when the only column is called "Count".
_ROW_TYPES = frozenset({"SELECT", "EXPLAIN", "PRAGMA", "CALL", "EXECUTE", "RELATION"})


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    _fields.choice(KIND, config, "db_type", ("duckdb",), None)
    found = _fields.first(config, "db_path", "database")
    path = ctx.render(found[1]) if found else ":memory:"
    if not isinstance(path, str) or not path:
        field = found[0] if found else "db_path"
        raise ToolConfigError(KIND, field, f"expected a file path or ':memory:', got {path!r}")
    scripts = _sqltool.read_statements(KIND, config, ctx, split=_whole_script)
    params = _sqltool.read_params(KIND, config, ctx)
    as_objects = _fields.flag(KIND, config, "as_objects", default=True)
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

        results = await run_interruptible(
            lambda: _execute(conn, scripts, params, as_objects, stop), interrupt
        )
    except _StatementError as exc:
        return _sqltool.error_result(KIND, None, _message(exc.error), exc.index, exc.total)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close)
    return ToolResult("success", data=_sqltool.combine(results))


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


def _statements(conn: duckdb.DuckDBPyConnection, scripts: list[str]) -> list[tuple[str, frozenset[str]]]:
    """(statement, its DuckDB statement type) for every statement of the scripts, in order."""
    out: list[tuple[str, frozenset[str]]] = []
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
                    out.append((statement.query, frozenset({statement.type.name})))
            raise _StatementError(len(out), exc, max(total, len(out) + 1)) from exc
        out.extend((s.query, frozenset({s.type.name})) for s in parsed)
    return out


class _Stopped(Exception):
    """The command was cancelled between two statements."""


def _execute(
    conn: duckdb.DuckDBPyConnection,
    scripts: list[str],
    params: Any,
    as_objects: bool,
    stop: threading.Event,
) -> list[dict[str, Any]]:
    statements = _statements(conn, scripts)
    if not statements:
        raise ToolConfigError(KIND, "query", "holds no SQL statement")
    results: list[dict[str, Any]] = []
    for index, (statement, kinds) in enumerate(statements):
        if stop.is_set():
            raise _Stopped
        bound = params if params is not None and _sql.has_markers(statement) else None
        try:
            conn.execute(statement, bound)
            columns = [str(d[0]) for d in conn.description or ()]
            rows = conn.fetchall() if columns else []
        except duckdb.Error as exc:
            raise _StatementError(index, exc, len(statements)) from exc
        if columns == ["Count"] and not kinds & _ROW_TYPES:
            results.append({"affected_rows": int(rows[0][0]) if rows else 0})
        else:
            results.append(_sqltool.rows_result(columns, rows, as_objects))
    return results


def _message(error: duckdb.Error) -> str:
    return f"{type(error).__name__}: {str(error).strip()}"
