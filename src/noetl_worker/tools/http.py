"""``http``: one HTTP request with httpx, config-compatible with both upstream workers.

Accepted config (Rust worker names first, Python worker aliases after):
``method`` (GET), ``url`` | ``endpoint``, ``headers``, ``params``, ``json`` | ``body`` |
``payload``, ``data`` (Python-worker rules), ``form``, ``timeout_seconds`` | ``timeout``,
``follow_redirects`` (true), ``verify`` | ``verify_ssl`` (true), ``response_type``
(json | text | binary; chosen from Content-Type when absent) and ``auth``: the flat form
``{type: bearer|basic|api_key, token | credential | …}`` or noetl's map form
``{<alias>: {type, key: <credential>}, …}`` (the worker merges each credential into its entry
before the tool runs; every entry is applied, later ones win on the same header).

Result ``data`` (as noetl's Python worker stores it): ``{status_code, headers, url, elapsed,
data}`` with ``data`` the decoded body (JSON, text, or ``{base64, size}`` for binary). A non-2xx
answer is status ``error`` with the same data; no answer at all is status ``error`` without
data; the deadline is status ``timeout``.

The request's total deadline is a trio cancel scope: httpx timeouts only bound single I/O
operations, so a server dribbling a byte at a time would otherwise never time out.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import httpx
import trio

from ..errors import ToolConfigError
from . import _fields
from .base import ToolContext, ToolResult

KIND = "http"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
RESPONSE_TYPES = ("json", "text", "binary")
AUTH_TYPES = ("bearer", "basic", "api_key", "none")
DEFAULT_TIMEOUT = 60.0
# Modest and equal on purpose: httpcore's pool assignment is O(conns * queued),
# and keep-alive below the connection cap makes surplus connections churn.
POOL_SIZE = 16


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    request = _build_request(config, ctx)
    timeout = _fields.seconds(KIND, config, "timeout_seconds", "timeout") or DEFAULT_TIMEOUT
    verify = _fields.flag(KIND, config, "verify", "verify_ssl", default=True)
    follow = _fields.flag(KIND, config, "follow_redirects", default=True)
    response_type = _fields.choice(KIND, config, "response_type", RESPONSE_TYPES, None)
    client = await _client(ctx, verify)

    started = time.monotonic()
    with trio.move_on_after(timeout) as deadline:
        try:
            response = await client.request(
                request.method,
                request.url,
                headers=request.headers,
                params=request.params,
                content=request.content,
                json=request.json,
                data=request.data,
                files=request.files,
                follow_redirects=follow,
                timeout=timeout,
            )
        except httpx.TimeoutException as exc:
            return _timeout_result(request.method, request.url, timeout, exc)
        except httpx.HTTPError as exc:
            return ToolResult(
                "error",
                error=f"HTTP {request.method} {request.url} failed: {type(exc).__name__}: {exc}",
            )
    if deadline.cancelled_caught:
        return _timeout_result(request.method, request.url, timeout, None)
    return _result(response, response_type, time.monotonic() - started)


class _Request:
    """The parts of one request, as httpx's ``request`` keyword arguments want them."""

    def __init__(self, method: str, url: str) -> None:
        self.method = method
        self.url = url
        self.headers: dict[str, str] = {}
        self.params: list[tuple[str, str | int | float | bool | None]] = []
        self.content: str | bytes | None = None
        self.json: Any = None
        self.data: dict[str, str] | None = None
        self.files: dict[str, tuple[None, str]] | None = None


def _build_request(config: Mapping[str, Any], ctx: ToolContext) -> _Request:
    method = _fields.choice(KIND, config, "method", METHODS, "GET") or "GET"
    found = _fields.first(config, "url", "endpoint")
    if found is None:
        raise ToolConfigError(KIND, "url", "required (or 'endpoint'): an http:// or https:// URL")
    field, raw_url = found
    url = ctx.render(raw_url)
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise ToolConfigError(KIND, field, f"{url!r} is not accepted: expected an http(s) URL")
    request = _Request(method, url)

    headers = _mapping(config, "headers", ctx)
    request.headers = {str(k): _text(v) for k, v in headers.items() if v is not None}
    request.params = _query_pairs(_mapping(config, "params", ctx))
    _apply_body(request, config, ctx)
    _apply_auth(request, config.get("auth"), ctx)
    return request


def _mapping(config: Mapping[str, Any], name: str, ctx: ToolContext) -> Mapping[str, Any]:
    value = config.get(name)
    if value is None:
        return {}
    value = ctx.render(value)
    if not isinstance(value, Mapping):
        raise ToolConfigError(KIND, name, f"expected an object of names to values, got {value!r}")
    return value


def _text(value: Any) -> str:
    """A query or header value as upstream stringifies it (JSON spelling for non-strings)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return repr(value)
    return json.dumps(value, separators=(",", ":"))


def _query_pairs(params: Mapping[str, Any]) -> list[tuple[str, str | int | float | bool | None]]:
    pairs: list[tuple[str, str | int | float | bool | None]] = []
    for key, value in params.items():
        values = value if isinstance(value, list | tuple) else [value]
        pairs.extend((str(key), _text(item)) for item in values if item is not None)
    return pairs


def _content_type(request: _Request) -> str:
    for key, value in request.headers.items():
        if key.lower() == "content-type":
            return value.lower()
    return ""


def _apply_body(request: _Request, config: Mapping[str, Any], ctx: ToolContext) -> None:
    chosen = _fields.first(config, "json", "body", "payload")
    if chosen is not None:
        name, value = chosen
        _set_body(request, name, ctx.render(value))
        return
    if config.get("form") is not None:
        request.data = {k: _text(v) for k, v in _mapping(config, "form", ctx).items()}
        return
    if config.get("data") is not None:
        _apply_data(request, ctx.render(config["data"]))


def _set_body(request: _Request, name: str, value: Any) -> None:
    if isinstance(value, str | bytes):
        request.content = value
    elif name == "json" or isinstance(value, Mapping | list | int | float | bool):
        request.json = value
    else:
        raise ToolConfigError(KIND, name, f"expected an object, array or string, got {value!r}")


def _apply_data(request: _Request, data: Any) -> None:
    """The Python worker's ``data``: ``{query, body}`` split, else by method and Content-Type."""
    if isinstance(data, Mapping) and data and set(data) <= {"query", "body"}:
        query = data.get("query")
        if isinstance(query, Mapping):
            request.params.extend(_query_pairs(query))
        if data.get("body") is not None:
            _encode_by_content_type(request, data["body"])
        return
    if request.method in ("GET", "DELETE") and isinstance(data, Mapping):
        request.params.extend(_query_pairs(data))
        return
    _encode_by_content_type(request, data)


def _encode_by_content_type(request: _Request, body: Any) -> None:
    content_type = _content_type(request)
    if isinstance(body, Mapping) and "application/x-www-form-urlencoded" in content_type:
        request.data = {str(k): _text(v) for k, v in body.items() if v is not None}
    elif isinstance(body, Mapping) and "multipart/form-data" in content_type:
        # httpx must write the boundary itself, so the caller's bare Content-Type goes.
        request.headers = {k: v for k, v in request.headers.items() if k.lower() != "content-type"}
        request.files = {str(k): (None, _text(v)) for k, v in body.items() if v is not None}
    else:
        _set_body(request, "data", body)


def _apply_auth(request: _Request, auth: Any, ctx: ToolContext) -> None:
    if auth is None:
        return
    if not isinstance(auth, Mapping):
        raise ToolConfigError(
            KIND,
            "auth",
            "expected an object: {type: bearer|basic|api_key, token|credential, ...} or"
            " {<alias>: {type, key: <credential>}}",
        )
    if _is_auth_map(auth):
        for alias, entry in auth.items():
            _apply_auth_entry(request, entry, ctx, f"auth.{alias}", override=True)
        return
    _apply_auth_entry(request, auth, ctx, "auth", override=False)


def _is_auth_map(auth: Mapping[str, Any]) -> bool:
    """noetl's map form: no ``type`` of its own, and every value is an entry object."""
    return "type" not in auth and bool(auth) and all(isinstance(v, Mapping) for v in auth.values())


def _apply_auth_entry(
    request: _Request, auth: Mapping[str, Any], ctx: ToolContext, field: str, *, override: bool
) -> None:
    """One auth entry → a header. ``override``: noetl's map entries replace a header the
    playbook set; the flat form never does (the Rust worker's rule)."""
    kind = _fields.choice(KIND, auth, "type", AUTH_TYPES, "bearer" if "token" in auth else None)
    if kind is None:
        raise ToolConfigError(KIND, f"{field}.type", f"required: one of {', '.join(AUTH_TYPES)}")
    if kind == "none":
        return
    present = {key.lower() for key in request.headers}
    if kind == "bearer":
        token = _secret(auth, ctx, field, "token", "access_token", "bearer_token", "value")
        _set_header(request, "Authorization", f"Bearer {token}", present, override)
    elif kind == "basic":
        username = auth.get("username") or auth.get("user") or ""
        password = _secret(auth, ctx, field, "password")
        pair = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        _set_header(request, "Authorization", f"Basic {pair}", present, override)
    else:
        header = str(auth.get("header") or auth.get("header_name") or "X-API-Key")
        key = _secret(auth, ctx, field, "api_key", "token", "value")
        _set_header(request, header, key, present, override)


def _set_header(request: _Request, name: str, value: str, present: set[str], override: bool) -> None:
    if name.lower() in present and not override:
        return
    request.headers = {k: v for k, v in request.headers.items() if k.lower() != name.lower()}
    request.headers[name] = value


def _secret(auth: Mapping[str, Any], ctx: ToolContext, field: str, *inline: str) -> str:
    for name in inline:
        if isinstance(auth.get(name), str):
            return str(ctx.render(auth[name]))
    alias = auth.get("credential")
    if isinstance(alias, str) and alias in ctx.secrets:
        return ctx.secrets[alias]
    raise ToolConfigError(
        KIND,
        field,
        f"no secret: give {' or '.join(inline)} inline, a 'key' naming a stored credential, or a"
        f" 'credential' alias the worker resolved (got credential={alias!r})",
    )


async def _client(ctx: ToolContext, verify: bool) -> httpx.AsyncClient:
    async def create() -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
        # Building the TLS context reads the CA bundle from disk: not on the trio thread.
        return await trio.to_thread.run_sync(lambda: httpx.AsyncClient(verify=verify, limits=limits))

    async def close(client: httpx.AsyncClient) -> None:
        await client.aclose()

    return await ctx.resources.get_or_create(f"http.client.verify={verify}", create, close)


def _timeout_result(method: str, url: str, timeout: float, exc: Exception | None) -> ToolResult:
    detail = f" ({type(exc).__name__})" if exc is not None else ""
    return ToolResult("timeout", error=f"HTTP {method} {url} did not complete within {timeout:g} s{detail}")


def _result(response: httpx.Response, response_type: str | None, elapsed: float) -> ToolResult:
    data = {
        "status_code": response.status_code,
        "headers": {key: ", ".join(response.headers.get_list(key)) for key in response.headers},
        "url": str(response.url),
        "elapsed": round(elapsed, 6),
        "data": _decode_body(response, response_type),
    }
    if response.is_success:
        return ToolResult("success", data=data)
    phrase = response.reason_phrase or _standard_phrase(response.status_code)
    reason = f": {phrase}" if phrase else ""
    return ToolResult("error", data=data, error=f"HTTP {response.status_code}{reason}")


def _standard_phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def _decode_body(response: httpx.Response, response_type: str | None) -> Any:
    raw = response.content
    content_type = response.headers.get("content-type", "").lower()
    if response_type is None:
        if "json" in content_type:
            response_type = "json"
        elif content_type.startswith("text/") or "xml" in content_type or "charset=" in content_type:
            response_type = "text"
        else:
            response_type = "text" if _is_utf8(raw) else "binary"
    if response_type == "binary":
        return {"base64": base64.b64encode(raw).decode("ascii"), "size": len(raw)}
    if not raw:
        return None if response_type == "json" else ""
    if response_type == "json":
        try:
            return json.loads(raw)
        except ValueError:
            return response.text  # a mislabelled body is still worth keeping
    return response.text


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
