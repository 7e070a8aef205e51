"""What the SQL tools (postgres, duckdb) share: reading the SQL fields and shaping results.

SQL fields, first present wins: ``query`` | ``command`` | ``sql`` | ``cmd`` (a string, or a
list of strings), the Python worker's plural ``queries`` | ``commands`` | ``cmds``, and each
name with ``_b64`` / ``_base64`` for base64-encoded text. Every piece is rendered, then split
into statements.

``rows_result`` / ``command_result`` shape one statement's result as noetl's Python worker
does (``{status, rows, row_count, columns}``, or ``{status, row_count, message}`` without rows);
``combine`` / ``error_result`` give the postgres tool's step result: the last statement's fields
plus ``statement_count`` (and ``errors`` / ``message`` when a statement failed).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ToolConfigError
from . import _sql
from ._jsonsafe import json_safe
from .base import ToolContext, ToolResult

SQL_FIELDS = ("query", "command", "sql", "cmd", "queries", "commands", "cmds")


def read_statements(
    kind: str,
    config: Mapping[str, Any],
    ctx: ToolContext,
    split: Callable[[str], list[str]] = _sql.split_statements,
) -> list[str]:
    """The statements to run, in order; ``ToolConfigError`` when there are none.

    ``split`` cuts one SQL text into statements (DuckDB passes one that keeps whole scripts: its
    own parser splits them where they run)."""
    for name in SQL_FIELDS:
        for field in (name, f"{name}_b64", f"{name}_base64"):
            value = config.get(field)
            if value is None:
                continue
            pieces = value if isinstance(value, list) else [value]
            texts = [_text(kind, field, piece, ctx) for piece in pieces]
            statements = [s for text in texts for s in split(text)]
            if not statements:
                raise ToolConfigError(kind, field, "holds no SQL statement")
            return statements
    raise ToolConfigError(kind, "query", f"required: SQL text in one of {', '.join(SQL_FIELDS)}")


def _text(kind: str, field: str, value: Any, ctx: ToolContext) -> str:
    if field.endswith(("_b64", "_base64")) and isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ToolConfigError(kind, field, f"not base64 of UTF-8 text: {exc}") from exc
    rendered = ctx.render(value)
    if not isinstance(rendered, str):
        raise ToolConfigError(kind, field, f"expected SQL text (a string), got {rendered!r}")
    return rendered


def read_params(kind: str, config: Mapping[str, Any], ctx: ToolContext) -> Any:
    """``params``: a list (positional) or an object (named), rendered; ``None`` when absent."""
    params = config.get("params")
    if params is None:
        return None
    params = ctx.render(params)
    if isinstance(params, list | tuple):
        return list(params)
    if isinstance(params, Mapping):
        return dict(params)
    raise ToolConfigError(kind, "params", f"expected a list or an object, got {params!r}")


def rows_result(columns: Sequence[str], rows: Sequence[Sequence[Any]], as_objects: bool) -> dict[str, Any]:
    if as_objects:
        shaped: list[Any] = [
            {column: json_safe(value) for column, value in zip(columns, row, strict=True)} for row in rows
        ]
    else:
        shaped = [[json_safe(value) for value in row] for row in rows]
    return {"status": "success", "rows": shaped, "row_count": len(shaped), "columns": list(columns)}


def command_result(rowcount: int) -> dict[str, Any]:
    """A statement without rows (DML, DDL): the affected row count (-1 when unknown)."""
    return {
        "status": "success",
        "row_count": rowcount,
        "message": f"Command executed. {rowcount} rows affected.",
    }


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The step result: the last statement's result plus how many statements ran."""
    return {**results[-1], "statement_count": len(results)}


def error_result(
    kind: str, sqlstate: str | None, message: str, statement_index: int | None, total: int
) -> ToolResult:
    """A failed statement (``statement_index``) or connection (``None``).

    Statements after a failing one are not run (noetl's worker runs them anyway), so the data
    is the failing statement's: ``{status: error, message, errors: [{statement_index, message}],
    statement_count, sqlstate}``.
    """
    where = f" (statement {statement_index + 1} of {total})" if statement_index is not None else ""
    code = f"SQLSTATE {sqlstate}: " if sqlstate else ""
    data: dict[str, Any] = {"status": "error", "sqlstate": sqlstate}
    if statement_index is None:
        data["message"] = message
    else:
        data["errors"] = [{"statement_index": statement_index, "message": message}]
        data["message"] = f"statement_{statement_index}: {message}"
        data["statement_count"] = statement_index + 1
    return ToolResult("error", error=f"{kind}: {code}{message}{where}", data=data)
