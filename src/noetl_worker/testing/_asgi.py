"""A tiny ASGI core for the stub control plane: request/response values, a router, lifespan.

No web framework on purpose: the stub must answer with byte-exact upstream shapes, and the
handlers stay plain ``async def handler(request) -> Response`` functions that tests can read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import attrs

from ..http_server import answer_lifespan

log = logging.getLogger(__name__)

Scope = Mapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_NO_JSON = object()


@attrs.frozen
class Request:
    """One HTTP request as the handlers see it (headers lower-cased, query first values)."""

    method: str
    path: str
    params: Mapping[str, str]
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON; raises ``BadRequest`` (422 like FastAPI) when it is not."""
        if not self.body:
            raise BadRequest("request body is empty; expected a JSON document")
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None


@attrs.frozen
class Response:
    status: int
    body: Any = None
    headers: Mapping[str, str] = attrs.field(factory=dict)

    def encode(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body, separators=(",", ":")).encode()


class BadRequest(Exception):
    """The request could not be parsed; the app answers 422 with FastAPI's ``detail`` list."""


Handler = Callable[[Request], Awaitable[Response]]


@attrs.define
class Router:
    """Exact-segment routes: ``/api/commands/{event_id}/claim`` style patterns, first match wins."""

    _routes: list[tuple[str, re.Pattern[str], Handler]] = attrs.field(factory=list)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method.upper(), re.compile(f"^{regex}$"), handler))

    def match(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool]:
        """(handler, params, path_known): ``path_known`` distinguishes 405 from 404."""
        path_known = False
        for route_method, regex, handler in self._routes:
            m = regex.match(path)
            if m is None:
                continue
            path_known = True
            if route_method == method:
                return handler, m.groupdict(), True
        return None, {}, path_known


OnRequest = Callable[[Request], Awaitable[Response]]


def make_app(on_request: OnRequest) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Wrap ``on_request`` into an ASGI 3 app that also speaks the lifespan protocol.

    hypercorn sends ``lifespan.startup`` into a closed channel if the app returns early on the
    lifespan scope, so the app completes both lifespan phases itself.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = {
            k: v[0]
            for k, v in parse_qs(scope.get("query_string", b"").decode(), keep_blank_values=True).items()
        }
        request = Request(
            method=scope["method"].upper(),
            path=scope["path"],
            params={},
            query=query,
            headers=headers,
            body=b"".join(chunks),
        )
        response = await on_request(request)
        payload = response.encode()
        content_type = (
            b"application/octet-stream" if isinstance(response.body, bytes) else b"application/json"
        )
        raw_headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(payload))]
        raw_headers += [(k.encode(), v.encode()) for k, v in response.headers.items()]
        await send({"type": "http.response.start", "status": response.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})

    return app
