"""Helpers shared by the stub's route modules: flavored error bodies and input parsing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ._asgi import BadRequest, Request, Response
from ._state import StubState


def error(
    state: StubState,
    status: int,
    message: str,
    *,
    code: str | None = None,
    retry_after: float | None = None,
    **extra: Any,
) -> Response:
    """An error in the server's own shape.

    Python (FastAPI): ``{"detail": "<message>"}`` or ``{"detail": {"code", "message", ...}}``.
    Rust: ``{"error": "<message>", "status": <code>}`` -- no ``detail``, no ``code``.
    """
    headers = {} if retry_after is None else {"retry-after": _fmt_seconds(retry_after)}
    if state.flavor == "rust":
        return Response(status, {"error": message, "status": status}, headers)
    if code is None and not extra:
        return Response(status, {"detail": message}, headers)
    detail: dict[str, Any] = {} if code is None else {"code": code}
    detail["message"] = message
    detail.update(extra)
    return Response(status, {"detail": detail}, headers)


def _fmt_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def json_object(request: Request) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def path_int(request: Request, name: str) -> int:
    raw = request.params[name]
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"path parameter {name}={raw!r} must be an integer") from None


def require_str(body: Mapping[str, Any], *names: str) -> str:
    """The first present of ``names`` (aliases) as a non-empty string."""
    for name in names:
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
                raise BadRequest(f"field {name!r} must be a non-empty string, got {value!r}")
            return str(value)
    raise BadRequest(f"field {' or '.join(repr(n) for n in names)} is required")


def optional(body: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in body and body[name] is not None:
            return body[name]
    return default


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat().replace("+00:00", "Z")


def truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")
