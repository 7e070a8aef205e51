"""``mcp``: call a Model Context Protocol server over streamable HTTP (JSON-RPC 2.0, httpx).

Config: the endpoint — ``endpoint`` | ``url``, or ``server`` (a URL, or a name looked up as
``NOETL_MCP_<NAME>_ENDPOINT``, then ``NOETL_MCP_URL``); ``method`` (``tools/call`` when
``tool`` is given, else ``tools/list``; also ``health``, which pings the server, or any other
JSON-RPC method with ``params``); ``tool`` and ``arguments`` for ``tools/call``; ``headers``;
``timeout_seconds`` | ``timeout`` (default 60).

``initialize`` runs once per endpoint and is remembered (with the ``Mcp-Session-Id`` the server
gave) until the worker stops; a server that forgot the session (HTTP 404) gets one new
``initialize``. An answer may be plain JSON or a ``text/event-stream``: the event carrying the
response to our request id is the one used.

Result data: ``{status, server, endpoint, method, tool, arguments, text, result, initialize}``
where ``text`` joins the text parts of a tool's ``content``. A JSON-RPC error or a tool result
with ``isError`` is a result with status ``error``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import attrs
import httpx
import trio

from .. import __version__
from ..errors import ToolConfigError
from . import _fields
from .base import ToolContext, ToolResult

KIND: Final = "mcp"
PROTOCOL_VERSION: Final = "2025-06-18"
DEFAULT_TIMEOUT: Final = 60.0
ACCEPT: Final = "application/json, text/event-stream"
_ids = itertools.count(1)


class McpError(Exception):
    """The server's answer could not be used (HTTP error, JSON-RPC error, no answer)."""

    def __init__(self, message: str, data: Any = None, status_code: int | None = None) -> None:
        super().__init__(message)
        self.data = data
        self.status_code = status_code


@attrs.define(eq=False)
class _Session:
    endpoint: str
    session_id: str | None = None
    initialize: Any = None
    protocol_version: str = PROTOCOL_VERSION
    lock: trio.Lock = attrs.field(factory=trio.Lock)


@attrs.define(eq=False)
class _Sessions:
    by_endpoint: dict[str, _Session] = attrs.field(factory=dict)

    def get(self, endpoint: str) -> _Session:
        return self.by_endpoint.setdefault(endpoint, _Session(endpoint))


def resolve_endpoint(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(server label, endpoint URL)`` from the config, else the environment."""
    environ = os.environ if environ is None else environ
    for name in ("endpoint", "url"):
        value = config.get(name)
        if value is not None:
            return str(config.get("server") or value), _url(name, value)
    server = config.get("server")
    if server is not None:
        if str(server).lower().startswith(("http://", "https://")):
            return str(server), _url("server", server)
        variable = "NOETL_MCP_" + re.sub(r"[^A-Z0-9]", "_", str(server).upper()) + "_ENDPOINT"
        if environ.get(variable):
            return str(server), _url(variable, environ[variable])
    default = environ.get("NOETL_MCP_URL")
    if default:
        return str(server or default), _url("NOETL_MCP_URL", default)
    named = f" (nor NOETL_MCP_{str(server).upper()}_ENDPOINT)" if server is not None else ""
    raise ToolConfigError(
        KIND,
        "endpoint",
        f"required: endpoint, url or server (an http(s) URL); NOETL_MCP_URL is not set{named}",
    )


def _url(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.lower().startswith(("http://", "https://")):
        raise ToolConfigError(KIND, field, f"{value!r} is not accepted: expected an http(s) URL")
    return value


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    cfg = ctx.render(dict(config))
    server, endpoint = resolve_endpoint(cfg)
    tool = cfg.get("tool") or cfg.get("name")
    method = str(cfg.get("method") or ("tools/call" if tool else "tools/list"))
    arguments = cfg.get("arguments", cfg.get("args", {})) or {}
    if not isinstance(arguments, Mapping):
        raise ToolConfigError(
            KIND, "arguments", f"expected an object of argument names to values, got {arguments!r}"
        )
    if method == "tools/call" and not isinstance(tool, str):
        raise ToolConfigError(KIND, "tool", "required for tools/call: the name of the tool to call")
    params = cfg.get("params")
    if params is not None and not isinstance(params, Mapping):
        raise ToolConfigError(KIND, "params", f"expected an object, got {params!r}")
    headers = cfg.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ToolConfigError(
            KIND, "headers", f"expected an object of header names to values, got {headers!r}"
        )
    timeout = _fields.seconds(KIND, cfg, "timeout_seconds", "timeout") or DEFAULT_TIMEOUT

    base = {
        "server": server,
        "endpoint": endpoint,
        "method": method,
        "tool": tool if method == "tools/call" else None,
        "arguments": dict(arguments) if method == "tools/call" else None,
    }
    client = await _client(ctx)
    sessions = await ctx.resources.get_or_create(f"{KIND}.sessions", _new_sessions)
    session = sessions.get(endpoint)
    extra = {str(k): str(v) for k, v in headers.items() if v is not None}
    status = "error"
    try:
        with trio.fail_after(timeout):
            result = await _call(client, session, method, tool, dict(arguments), params, extra)
        text = _text(result)
        failed = isinstance(result, Mapping) and result.get("isError") is True
        status = "error" if failed else "success"
        data = {"status": status, **base, "text": text, "result": result, "initialize": session.initialize}
        if failed:
            return ToolResult("error", data=data, error=f"mcp {method} {tool}: {text}")
        return ToolResult("success", data=data)
    except trio.TooSlowError:
        status = "timeout"
        message = f"mcp {method} at {endpoint} did not answer within {timeout:g} s"
        return ToolResult("timeout", error=message, data={"status": "timeout", **base, "error": message})
    except McpError as exc:
        data = {
            "status": "error",
            **base,
            "error": str(exc),
            "details": exc.data,
            "http_status": exc.status_code,
        }
        return ToolResult("error", error=f"mcp {method} at {endpoint}: {exc}", data=data)
    finally:
        if ctx.resources.metrics is not None:
            ctx.resources.metrics.tool_operation(KIND, method, status)


async def _call(
    client: httpx.AsyncClient,
    session: _Session,
    method: str,
    tool: Any,
    arguments: dict[str, Any],
    params: Mapping[str, Any] | None,
    headers: dict[str, str],
) -> Any:
    if method == "health":
        await _ensure_initialized(client, session, headers)
        await _rpc(client, session, "ping", {}, headers)
        return {"healthy": True, "server_info": (session.initialize or {}).get("serverInfo")}
    if method == "initialize":
        session.initialize = None
        await _ensure_initialized(client, session, headers)
        return session.initialize
    if method == "tools/call":
        call_params: dict[str, Any] = {"name": tool, "arguments": arguments}
    else:
        call_params = dict(params or {})
    for attempt in (1, 2):
        await _ensure_initialized(client, session, headers)
        try:
            return await _rpc(client, session, method, call_params, headers)
        except McpError as exc:
            if exc.status_code != 404 or session.session_id is None or attempt == 2:
                raise
            # The server forgot our session (restart, idle expiry): initialize once more.
            session.initialize = None
            session.session_id = None
    raise AssertionError("unreachable")


async def _ensure_initialized(client: httpx.AsyncClient, session: _Session, headers: dict[str, str]) -> None:
    async with session.lock:
        if session.initialize is not None:
            return
        session.session_id = None
        params = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "noetl-worker", "version": __version__},
        }
        result = await _rpc(client, session, "initialize", params, headers)
        if isinstance(result, Mapping) and isinstance(result.get("protocolVersion"), str):
            session.protocol_version = result["protocolVersion"]
        await _post(client, session, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
        session.initialize = result


async def _rpc(
    client: httpx.AsyncClient,
    session: _Session,
    method: str,
    params: Mapping[str, Any],
    headers: dict[str, str],
) -> Any:
    request_id = next(_ids)
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": dict(params)}
    message = await _post(client, session, body, headers, request_id)
    assert message is not None
    if "error" in message:
        error = message["error"] if isinstance(message["error"], Mapping) else {"message": message["error"]}
        raise McpError(f"JSON-RPC error {error.get('code')}: {error.get('message')}", error.get("data"))
    return message.get("result")


async def _post(
    client: httpx.AsyncClient,
    session: _Session,
    body: Mapping[str, Any],
    headers: dict[str, str],
    request_id: int | None = None,
) -> dict[str, Any] | None:
    """POST one JSON-RPC message; the answer to ``request_id`` (None for a notification).

    The body is streamed: a server may keep an event stream open after our answer (server
    requests, progress), so reading stops at the event that answers us.
    """
    sent = {"Accept": ACCEPT, "Content-Type": "application/json", **headers}
    if session.session_id is not None:
        sent["Mcp-Session-Id"] = session.session_id
    if body.get("method") != "initialize":
        sent["MCP-Protocol-Version"] = session.protocol_version
    try:
        async with client.stream(
            "POST", session.endpoint, content=json.dumps(body), headers=sent
        ) as response:
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")
                raise McpError(f"HTTP {response.status_code}: {text[:500]}", status_code=response.status_code)
            if body.get("method") == "initialize" and response.headers.get("mcp-session-id"):
                session.session_id = response.headers["mcp-session-id"]
            if request_id is None:
                return None
            content_type = response.headers.get("content-type", "").lower()
            if content_type.startswith("text/event-stream"):
                async for data in _sse_events(response):
                    message = _json(data)
                    if _answers(message, request_id):
                        return dict(message)
            else:
                parsed = _json((await response.aread()).decode())
                for message in parsed if isinstance(parsed, list) else [parsed]:
                    if _answers(message, request_id):
                        return dict(message)
    except httpx.HTTPError as exc:
        raise McpError(f"{type(exc).__name__}: {exc}") from exc
    raise McpError(f"no JSON-RPC answer to request {request_id} in the response ({content_type or 'empty'})")


def _answers(message: Any, request_id: int) -> bool:
    return (
        isinstance(message, Mapping)
        and message.get("id") == request_id
        and ("result" in message or "error" in message)
    )


async def _sse_events(response: httpx.Response) -> AsyncIterator[str]:
    lines: list[str] = []
    async for line in response.aiter_lines():
        for event in sse_feed(lines, line):
            yield event
    if lines:
        yield "\n".join(lines)


def sse_feed(pending: list[str], line: str) -> list[str]:
    """Feed one line of a ``text/event-stream``; the data of the events it completes."""
    line = line.rstrip("\r")
    if not line:
        if not pending:
            return []
        event = "\n".join(pending)
        pending.clear()
        return [event]
    if line.startswith("data:"):
        pending.append(line[5:].removeprefix(" "))
    return []


def sse_data(text: str) -> list[str]:
    """The ``data`` of each event in a whole ``text/event-stream`` body."""
    pending: list[str] = []
    events = [event for line in text.split("\n") for event in sse_feed(pending, line)]
    return events + (["\n".join(pending)] if pending else [])


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise McpError(f"not JSON: {text[:200]!r}") from None


def _text(result: Any) -> str | None:
    if not isinstance(result, Mapping) or not isinstance(result.get("content"), list):
        return None
    parts = [p.get("text") for p in result["content"] if isinstance(p, Mapping) and p.get("type") == "text"]
    return "\n".join(str(p) for p in parts if p is not None)


async def _new_sessions() -> _Sessions:
    return _Sessions()


async def _client(ctx: ToolContext) -> httpx.AsyncClient:
    async def create() -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        return await trio.to_thread.run_sync(
            lambda: httpx.AsyncClient(limits=limits, timeout=DEFAULT_TIMEOUT)
        )

    async def close(client: httpx.AsyncClient) -> None:
        await client.aclose()

    return await ctx.resources.get_or_create(f"{KIND}.client", create, close)
