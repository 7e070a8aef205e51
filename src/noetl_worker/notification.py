"""The NATS command notification: parse and validate (a malformed one is a poison message).

Everything here is untrusted: anyone who can publish on the subject chooses the bytes. The size
and nesting depth are bounded before the JSON parser runs; ids must be ASCII digits that fit a
signed 64-bit integer (the servers' BIGINT snowflakes) — ``str.isdigit`` alone would accept
``"²"``, which ``int()`` then refuses, and a 5,000-digit number trips Python's int-string limit;
``server_url`` must be an http(s) URL that parses (whether its origin is *allowed* is the
intake's decision, see ``origins.py``).
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from .errors import NotificationError
from .jsonlimits import JSONLimitError, loads_bounded
from .origins import ServerURLError, origin_of

MAX_NOTIFICATION_BYTES = 64 * 1024  # the servers' notifications are ~200 bytes
MAX_NOTIFICATION_DEPTH = 32  # flat objects; a trace context adds a level or two
MAX_ID = 2**63 - 1
MAX_TEXT = 1024  # command_id, step, execution_pool
_DIGITS = re.compile(r"[0-9]{1,19}")


@attrs.frozen
class Notification:
    execution_id: int
    event_id: int
    command_id: str
    step: str
    server_url: str  # may be empty: the worker's NOETL_SERVER_URL is used then
    execution_pool: str | None = None


def _as_int(payload: dict[str, Any], key: str) -> int:
    value = payload.get(key)
    # JSON integers (Python server) or numeric strings (Rust server); never bools or floats.
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip(" \t")):
        number = int(value.strip(" \t"))
    else:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "…"
        raise NotificationError(f"field {key!r} must be an integer or a string of ASCII digits, got {shown}")
    if not 0 <= number <= MAX_ID:
        raise NotificationError(f"field {key!r} is outside 0..2**63-1")
    return number


def _text(payload: dict[str, Any], key: str, value: Any) -> str:
    text = str(value)
    if len(text) > MAX_TEXT:
        raise NotificationError(f"field {key!r} is {len(text)} characters long (at most {MAX_TEXT})")
    return text


def parse_notification(data: bytes) -> Notification:
    try:
        payload = loads_bounded(
            data, max_bytes=MAX_NOTIFICATION_BYTES, max_depth=MAX_NOTIFICATION_DEPTH, what="notification"
        )
    except JSONLimitError as exc:
        raise NotificationError(str(exc)) from None
    if not isinstance(payload, dict):
        raise NotificationError(f"expected a JSON object, got {type(payload).__name__}")
    command_id = payload.get("command_id")
    if isinstance(command_id, bool) or not isinstance(command_id, (str, int)) or command_id == "":
        raise NotificationError(f"field 'command_id' must be a string or an integer, got {command_id!r:.60}")
    if isinstance(command_id, int) and not 0 <= command_id <= MAX_ID:
        raise NotificationError("field 'command_id' is outside 0..2**63-1")
    step = payload.get("step")
    if not isinstance(step, str) or not step:
        raise NotificationError(f"field 'step' must be a non-empty string, got {step!r:.60}")
    server_url = payload.get("server_url") or ""
    if not isinstance(server_url, str):
        raise NotificationError(f"field 'server_url' must be a string, got {server_url!r:.60}")
    server_url = server_url.strip()
    if server_url:
        try:
            origin_of(server_url)
        except ServerURLError as exc:
            raise NotificationError(f"field 'server_url' is refused: {exc}") from None
    pool = payload.get("execution_pool")
    if pool is not None and not isinstance(pool, str):
        raise NotificationError(f"field 'execution_pool' must be a string or null, got {pool!r:.60}")
    return Notification(
        execution_id=_as_int(payload, "execution_id"),
        event_id=_as_int(payload, "event_id"),
        command_id=_text(payload, "command_id", command_id),
        step=_text(payload, "step", step),
        server_url=server_url,
        execution_pool=_text(payload, "execution_pool", pool) if pool else None,
    )
