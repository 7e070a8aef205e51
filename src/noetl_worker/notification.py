"""The NATS command notification: parse and validate (a malformed one is a poison message)."""

from __future__ import annotations

import json
from typing import Any

import attrs

from .errors import NotificationError


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
    # JSON integers (Python server) or numeric strings (some publishers); never bools or floats.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise NotificationError(f"field {key!r} must be an integer or a numeric string, got {value!r}")


def parse_notification(data: bytes) -> Notification:
    try:
        payload = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotificationError(f"not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise NotificationError(f"expected a JSON object, got {type(payload).__name__}")
    command_id = payload.get("command_id")
    if isinstance(command_id, bool) or not isinstance(command_id, (str, int)) or command_id == "":
        raise NotificationError(f"field 'command_id' must be a string or an integer, got {command_id!r}")
    step = payload.get("step")
    if not isinstance(step, str) or not step:
        raise NotificationError(f"field 'step' must be a non-empty string, got {step!r}")
    server_url = payload.get("server_url") or ""
    if not isinstance(server_url, str):
        raise NotificationError(f"field 'server_url' must be a string, got {server_url!r}")
    pool = payload.get("execution_pool")
    if pool is not None and not isinstance(pool, str):
        raise NotificationError(f"field 'execution_pool' must be a string or null, got {pool!r}")
    return Notification(
        execution_id=_as_int(payload, "execution_id"),
        event_id=_as_int(payload, "event_id"),
        command_id=str(command_id),
        step=step,
        server_url=server_url.strip(),
        execution_pool=pool or None,
    )
