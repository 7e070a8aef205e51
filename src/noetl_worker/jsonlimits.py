"""Bounded JSON decoding for untrusted input (NATS notifications, claim answers).

``json.loads`` recurses once per nesting level: a document nested a few thousand levels deep
raises ``RecursionError`` (and anything that walks the result later would too). The depth is
therefore measured *before* parsing, with regular expressions only (C speed, no per-byte Python
loop): string literals are blanked out, everything but brackets is dropped, and innermost
``[]``/``{}`` pairs are removed one level per pass — a document of depth ``d`` takes ``d`` passes,
and a deep one is refused after ``limit`` passes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import WorkerError

# A JSON string literal (unrolled loop: linear, no catastrophic backtracking).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_INNERMOST = re.compile(rb"\[\]|\{\}")


class JSONLimitError(WorkerError):
    """The document is not acceptable JSON: the message says why (size, depth, syntax, encoding)."""


def depth_exceeds(data: bytes, limit: int) -> bool:
    """True when ``data`` nests arrays/objects more than ``limit`` levels deep."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b'""', data))
    for _ in range(limit):
        if not brackets:
            return False
        shorter = _INNERMOST.sub(b"", brackets)
        if len(shorter) == len(brackets):
            return False  # unbalanced: not JSON; the parser says so with a better message
        brackets = shorter
    return bool(brackets) and _INNERMOST.search(brackets) is not None


def loads_bounded(data: bytes, *, max_bytes: int, max_depth: int, what: str) -> Any:
    """Decode untrusted JSON; every failure is a :class:`JSONLimitError` naming ``what``."""
    if len(data) > max_bytes:
        raise JSONLimitError(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONLimitError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    if depth_exceeds(data, max_depth):
        raise JSONLimitError(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except RecursionError:
        raise JSONLimitError(f"{what} nests too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, and ints over the digit limit
        raise JSONLimitError(f"{what} is not JSON: {str(exc)[:200]}") from None
