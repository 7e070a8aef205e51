"""What the SQL tools (postgres, duckdb) share: reading the SQL fields and shaping results.

SQL fields, first present wins: ``query`` | ``command`` | ``sql`` | ``cmd`` (a string, or a
list of strings), the Python worker's plural ``queries`` | ``commands`` | ``cmds``, and each
name with ``_b64`` / ``_base64`` for base64-encoded text. Every piece is rendered, then split
into statements.

Result ``data``: one statement → ``{columns, rows, row_count}`` (row-returning) or
``{affected_rows}``; several → the last statement's fields plus ``statements`` (every result)
and ``statement_count``.
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
    return {"columns": list(columns), "rows": shaped, "row_count": len(shaped)}


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    if len(results) == 1:
        return results[0]
    return {**results[-1], "statements": results, "statement_count": len(results)}


def error_result(
    kind: str, sqlstate: str | None, message: str, statement_index: int | None, total: int
) -> ToolResult:
    where = f" (statement {statement_index + 1} of {total})" if statement_index is not None else ""
    code = f"SQLSTATE {sqlstate}: " if sqlstate else ""
    return ToolResult(
        "error",
        error=f"{kind}: {code}{message}{where}",
        data={"sqlstate": sqlstate, "message": message, "statement_index": statement_index},
    )
