"""Bounded JSON decoding for untrusted input (NATS notifications, claim answers).

``json.loads`` recurses once per nesting level: a document nested a few thousand levels deep
raises ``RecursionError`` (and anything that walks the result later would too). The depth is
therefore measured *before* parsing, with bytes methods only (C speed, no per-byte Python loop):
everything but brackets outside string literals is dropped, and innermost pairs are removed one
level per pass — a document of depth ``d`` takes ``d`` passes, a run of more than ``limit``
openers is refused at once, and anything else deep after ``limit`` passes.

The parse itself is orjson's (C; about a third of ``json.loads``'s time on a claim answer) where
it gives exactly what ``json.loads`` would, and ``json.loads`` everywhere else: orjson refuses
``NaN``/``Infinity``, lone surrogates and out-of-range floats that ``json`` accepts (those
fall back), and reads an integer beyond 64 bits as a float, silently — so a document with a run
of 19 or more digits anywhere (a number that might not fit; found with C-speed bytes methods) is
parsed by ``json`` from the start.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import orjson

from .errors import WorkerError

_KEEP = b'[]{}"\\'
_DROP = bytes(b for b in range(256) if b not in _KEEP)
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
# Every digit to "0", everything else to " ": a run of 19 zeros is a number orjson may not keep
# exact (19 digits can exceed a signed 64-bit integer); digits inside strings count too, which
# only costs the slower parse.
_DIGITS = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))
_LONG_NUMBER = b"0" * 19


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
    # A document with no more openers than the limit cannot nest deeper (two counts: C speed).
    if data.count(b"[") + data.count(b"{") > max_depth and depth_exceeds(data, max_depth):
        raise JSONLimitError(f"{what} nests deeper than {max_depth} levels")
    if _LONG_NUMBER not in data.translate(_DIGITS):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # json.loads decides, and names the fault when there is one
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONLimitError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise JSONLimitError(f"{what} nests too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, and ints over the digit limit
        raise JSONLimitError(f"{what} is not JSON: {str(exc)[:200]}") from None
