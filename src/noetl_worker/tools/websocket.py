"""``websocket``: connect to a ``ws://`` / ``wss://`` endpoint, send messages, collect replies.

Config: ``url`` (required), ``headers`` {name: value}, ``subprotocols`` [..], ``auth`` (an
object like the http tool's — ``{type: bearer, token}`` or ``{type: bearer, credential}`` — or
a credential alias the worker has already resolved into one), ``send`` / ``messages`` (a list;
strings go as text frames, other JSON values as compact JSON text, ``{base64: …}`` as a binary
frame), and when to stop receiving: ``receive`` (count of messages, default 0 with ``until``
or the deadline deciding), ``until`` (a text message equal to it ends the exchange and is kept),
``timeout_seconds`` | ``timeout`` (default 30; receiving stops there without an error when
``receive`` was not asked for). ``decode_json`` (true) parses text frames that hold JSON.

Result data: ``{messages, close_code, close_reason}``; ``close_code`` is null when we closed
the connection ourselves after getting what we wanted.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from collections.abc import Mapping
from typing import Any, Final

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from ..errors import ToolConfigError
from . import _fields
from .base import ToolContext, ToolResult

KIND: Final = "websocket"
DEFAULT_TIMEOUT: Final = 30.0
MAX_MESSAGES: Final = 100_000


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    cfg = ctx.render(dict(config))
    url = cfg.get("url") or cfg.get("endpoint")
    if not isinstance(url, str) or not url.lower().startswith(("ws://", "wss://")):
        raise ToolConfigError(KIND, "url", f"{url!r} is not accepted: expected a ws:// or wss:// URL")
    headers = _headers(cfg, ctx)
    subprotocols = cfg.get("subprotocols") or []
    if not isinstance(subprotocols, list) or not all(isinstance(p, str) for p in subprotocols):
        raise ToolConfigError(KIND, "subprotocols", f"expected a list of strings, got {subprotocols!r}")
    outgoing = [_frame(m, i) for i, m in enumerate(_list(cfg))]
    wanted = cfg.get("receive", cfg.get("receive_count", 0))
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted <= MAX_MESSAGES:
        raise ToolConfigError(KIND, "receive", f"{wanted!r} is not accepted: expected 0..{MAX_MESSAGES}")
    until = cfg.get("until")
    if until is not None and not isinstance(until, str):
        raise ToolConfigError(KIND, "until", f"expected the text of the terminating message, got {until!r}")
    timeout = _fields.seconds(KIND, cfg, "timeout_seconds", "timeout") or DEFAULT_TIMEOUT
    decode = _fields.flag(KIND, cfg, "decode_json", default=True)
    context = ssl.create_default_context() if url.lower().startswith("wss://") else None

    messages: list[Any] = []
    close: tuple[int | None, str | None] = (None, None)
    status = "error"
    try:
        with trio.move_on_after(timeout) as deadline:
            async with open_websocket_url(
                url,
                ssl_context=context,
                subprotocols=subprotocols,
                extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()],
                connect_timeout=timeout,
                disconnect_timeout=min(5.0, timeout),
            ) as ws:
                for message in outgoing:
                    await ws.send_message(message)
                close = await _receive(ws, messages, wanted, until, decode)
        if deadline.cancelled_caught and (wanted and len(messages) < wanted):
            status = "timeout"
            error = f"websocket {url}: {len(messages)} of {wanted} messages within {timeout:g} s"
            return ToolResult("timeout", error=error, data=_data(messages, close))
        status = "success"
        return ToolResult("success", data=_data(messages, close))
    except HandshakeError as exc:
        return ToolResult(
            "error", error=f"websocket {url}: handshake failed: {exc!r}", data=_data(messages, close)
        )
    except ConnectionClosed as exc:
        # The peer closed while we were still sending.
        code, text = _close_of(exc)
        return ToolResult(
            "error",
            error=f"websocket {url}: closed by the peer while sending (code {code}, reason {text!r})",
            data=_data(messages, (code, text)),
        )
    except OSError as exc:
        return ToolResult(
            "error", error=f"websocket {url}: {type(exc).__name__}: {exc}", data=_data(messages, close)
        )
    finally:
        if ctx.resources.metrics is not None:
            ctx.resources.metrics.tool_operation(KIND, "exchange", status)


async def _receive(
    ws: WebSocketConnection, messages: list[Any], wanted: int, until: str | None, decode: bool
) -> tuple[int | None, str | None]:
    while not (wanted and len(messages) >= wanted):
        try:
            raw = await ws.get_message()
        except ConnectionClosed as exc:
            return _close_of(exc)
        messages.append(_decode(raw, decode))
        if until is not None and raw == until:
            break
    return None, None


def _close_of(exc: ConnectionClosed) -> tuple[int | None, str | None]:
    reason = exc.reason
    return (None, None) if reason is None else (reason.code, reason.reason)


def _data(messages: list[Any], close: tuple[int | None, str | None]) -> dict[str, Any]:
    return {"messages": messages, "count": len(messages), "close_code": close[0], "close_reason": close[1]}


def _decode(raw: str | bytes, decode: bool) -> Any:
    if isinstance(raw, bytes):
        return {"base64": base64.b64encode(raw).decode(), "size": len(raw)}
    if decode and raw[:1] in ("{", "["):
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw


def _list(cfg: Mapping[str, Any]) -> list[Any]:
    found = _fields.first(cfg, "send", "messages")
    if found is None:
        return []
    _, value = found
    if not isinstance(value, list):
        return [value]
    return value


def _frame(message: Any, index: int) -> str | bytes:
    if isinstance(message, str):
        return message
    if isinstance(message, Mapping) and set(message) <= {"base64", "size"} and "base64" in message:
        try:
            return base64.b64decode(str(message["base64"]), validate=True)
        except binascii.Error as exc:
            raise ToolConfigError(KIND, f"send[{index}].base64", f"not valid base64: {exc}") from exc
    return json.dumps(message, separators=(",", ":"))


def _headers(cfg: Mapping[str, Any], ctx: ToolContext) -> dict[str, str]:
    raw = cfg.get("headers") or {}
    if not isinstance(raw, Mapping):
        raise ToolConfigError(KIND, "headers", f"expected an object of header names to values, got {raw!r}")
    headers = {str(k): str(v) for k, v in raw.items() if v is not None}
    auth = cfg.get("auth")
    if auth is None:
        return headers
    if not isinstance(auth, Mapping):
        raise ToolConfigError(KIND, "auth", "expected {type: bearer|basic|api_key, token|credential, ...}")
    kind = str(auth.get("type") or "bearer").lower()
    secret = _secret(auth, ctx)
    if kind == "bearer":
        headers.setdefault("Authorization", f"Bearer {secret}")
    elif kind == "basic":
        pair = f"{auth.get('username') or auth.get('user') or ''}:{secret}"
        headers.setdefault("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    elif kind == "api_key":
        headers.setdefault(str(auth.get("header") or "X-API-Key"), secret)
    else:
        raise ToolConfigError(
            KIND, "auth.type", f"{kind!r} is not accepted: expected bearer, basic or api_key"
        )
    return headers


def _secret(auth: Mapping[str, Any], ctx: ToolContext) -> str:
    for name in ("token", "access_token", "password", "api_key", "key"):
        if isinstance(auth.get(name), str):
            return str(auth[name])
    alias = auth.get("credential")
    if isinstance(alias, str) and alias in ctx.secrets:
        return ctx.secrets[alias]
    raise ToolConfigError(
        KIND, "auth", f"no secret: give token inline or a 'credential' the worker resolved (got {alias!r})"
    )
