"""Bounded JSON decoding for untrusted input (NATS notifications, claim answers).

``json.loads`` recurses once per nesting level: a document nested a few thousand levels deep
raises ``RecursionError`` (and anything that walks the result later would too). The depth is
therefore measured *before* parsing, with bytes methods only (C speed, no per-byte Python loop):
everything but brackets outside string literals is dropped, and innermost pairs are removed one
level per pass — a document of depth ``d`` takes ``d`` passes, a run of more than ``limit``
openers is refused at once, and anything else deep after ``limit`` passes.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from .errors import WorkerError

_KEEP = b'[]{}"\\'
_DROP = bytes(b for b in range(256) if b not in _KEEP)
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


class JSONLimitError(WorkerError):
    """The document is not acceptable JSON: the message says why (size, depth, syntax, encoding)."""


@functools.lru_cache(maxsize=8)
def _opener_run(limit: int) -> re.Pattern[bytes]:
    return re.compile(rb"\[{%d}" % (limit + 1))


def depth_exceeds(data: bytes, limit: int) -> bool:
    """True when ``data`` nests arrays/objects more than ``limit`` levels deep."""
    # Keep only brackets, quotes and backslashes (bytes.translate: C speed); drop escaped
    # backslashes and quotes, then every other backslash; string literals are then plain
    # "..." runs, and every other piece of a split on '"' is outside them.
    kept = data.translate(None, _DROP).replace(b"\\\\", b"").replace(b'\\"', b"").replace(b"\\", b"")
    # Depth does not care which kind of bracket: one kind makes each pass remove one level.
    brackets = b"".join(kept.split(b'"')[::2]).translate(_ONE_KIND)
    run = _opener_run(limit)
    for _ in range(limit):
        if not brackets:
            return False
        if run.search(brackets):  # the usual attack, seen at once rather than after `limit` passes
            return True
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return False  # unbalanced: not JSON; the parser says so with a better message
        brackets = shorter
    return bool(brackets) and b"[]" in brackets


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
