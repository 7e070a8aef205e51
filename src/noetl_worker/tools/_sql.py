"""A small SQL lexer: split scripts into statements and find or rewrite parameter markers.

It knows exactly the PostgreSQL/DuckDB constructs in which a ``;`` or a marker is *not* code:
'single quotes' ('' escape), E'escape strings' (backslash escapes), "double-quoted identifiers",
-- line comments, /* nested block comments */ and $tag$ dollar quotes $tag$. Everything else is
code. Unterminated constructs run to the end of the text, as the server would read them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

SegmentKind = Literal["code", "string", "ident", "comment"]

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$\x80-\uffff]")
_NUMBERED = re.compile(r"(?<![A-Za-z0-9_$])\$([0-9]+)")
_NAMED_DOLLAR = re.compile(r"(?<![A-Za-z0-9_$])\$([A-Za-z_][A-Za-z0-9_]*)")
_OPENERS = re.compile(r"['\"$]|--|/\*")
_PYFORMAT = re.compile(r"%(?:\(([^)]+)\))?[sbt]")


def segments(sql: str) -> Iterator[tuple[SegmentKind, str]]:
    """The text as consecutive ``(kind, text)`` pieces; joined they give ``sql`` back."""
    i, n, code_start = 0, len(sql), 0
    while i < n:
        c = sql[i]
        end: int | None = None
        kind: SegmentKind = "string"
        if c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and not _ident_before(sql, i - 1)
            start = i - 1 if escapes else i
            end = _quoted_end(sql, i, "'", backslash=escapes)
        elif c == '"':
            start, kind, end = i, "ident", _quoted_end(sql, i, '"', backslash=False)
        elif sql.startswith("--", i):
            newline = sql.find("\n", i)
            start, kind, end = i, "comment", n if newline < 0 else newline
        elif sql.startswith("/*", i):
            start, kind, end = i, "comment", _block_comment_end(sql, i)
        elif c == "$" and not _ident_before(sql, i):
            tag = _DOLLAR_TAG.match(sql, i)
            if tag is not None:
                close = sql.find(tag.group(0), tag.end())
                start, end = i, n if close < 0 else close + len(tag.group(0))
        if end is None:
            # Jump to the next character that can open a construct instead of stepping by one.
            following = _OPENERS.search(sql, i + 1)
            i = following.start() if following else n
            continue
        if start > code_start:
            yield "code", sql[code_start:start]
        yield kind, sql[start:end]
        i = code_start = end
    if code_start < n:
        yield "code", sql[code_start:]


def _ident_before(sql: str, i: int) -> bool:
    return i > 0 and _IDENT_CHAR.match(sql[i - 1]) is not None


def _quoted_end(sql: str, i: int, quote: str, *, backslash: bool) -> int:
    j, n = i + 1, len(sql)
    while j < n:
        c = sql[j]
        if backslash and c == "\\":
            j += 2
        elif c == quote:
            if j + 1 < n and sql[j + 1] == quote:
                j += 2
            else:
                return j + 1
        else:
            j += 1
    return n


def _block_comment_end(sql: str, i: int) -> int:
    depth, j, n = 0, i, len(sql)
    while j < n:
        if sql.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif sql.startswith("*/", j):
            depth, j = depth - 1, j + 2
            if depth == 0:
                return j
        else:
            j += 1
    return n


def split_statements(script: str) -> list[str]:
    """The statements of a script, stripped; pieces holding only comments or space are dropped."""
    statements: list[str] = []
    current: list[str] = []
    has_code = False

    def flush() -> None:
        nonlocal has_code
        if has_code:
            statements.append("".join(current).strip())
        current.clear()
        has_code = False

    for kind, text in segments(script):
        if kind != "code":
            current.append(text)
            has_code = has_code or kind != "comment"
            continue
        pieces = text.split(";")
        for index, piece in enumerate(pieces):
            if index:
                flush()
            current.append(piece)
            has_code = has_code or bool(piece.strip())
    flush()
    return statements


def has_markers(statement: str) -> bool:
    """Whether the statement has a parameter marker: ``$1``, ``$name``, ``?``, ``%s``, ``%(n)s``."""
    for kind, text in segments(statement):
        if kind == "code" and (
            _NUMBERED.search(text) or _NAMED_DOLLAR.search(text) or "?" in text or _PYFORMAT.search(text)
        ):
            return True
    return False


def numbered_to_pyformat(statement: str, params: Sequence[Any]) -> tuple[str, list[Any]] | None:
    """Rewrite ``$1``-style markers (the Rust worker's) into psycopg's ``%s`` form.

    Returns the new statement and the parameters in marker order (``$2 … $1 … $2`` repeats
    values), or ``None`` when the statement has no numbered markers. Every other ``%`` is
    doubled, because psycopg reads ``%`` anywhere once parameters are passed. A marker beyond
    the parameters raises ``IndexError`` naming it.
    """
    out: list[str] = []
    ordered: list[Any] = []
    found = False
    for kind, text in segments(statement):
        text = text.replace("%", "%%")
        if kind != "code":
            out.append(text)
            continue

        def replace(match: re.Match[str]) -> str:
            nonlocal found
            number = int(match.group(1))
            if not 1 <= number <= len(params):
                raise IndexError(f"${number} has no parameter ({len(params)} given)")
            found = True
            ordered.append(params[number - 1])
            return "%s"

        out.append(_NUMBERED.sub(replace, text))
    return ("".join(out), ordered) if found else None
