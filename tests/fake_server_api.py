"""An in-memory ``ServerAPI``: routes (method, path) to canned answers and records calls."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from noetl_worker.errors import HTTPStatusError

Handler = Callable[[Mapping[str, Any] | None, Any], Any]


@attrs.define
class Call:
    method: str
    path: str
    params: Mapping[str, Any] | None = None
    body: Any = None


@attrs.define
class FakeServer:
    """``routes[(method, path)]`` is an answer, an exception to raise, or a handler."""

    routes: dict[tuple[str, str], Any] = attrs.field(factory=dict)
    calls: list[Call] = attrs.field(factory=list)

    def _answer(self, method: str, path: str, params: Any, body: Any) -> Any:
        self.calls.append(Call(method, path, params, body))
        try:
            answer = self.routes[(method, path)]
        except KeyError:
            raise HTTPStatusError(404, f"no route {method} {path}") from None
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer(params, body)
        return answer

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        return self._answer("GET", path, params, None)

    async def post_json(self, path: str, body: Any) -> Any:
        return self._answer("POST", path, None, body)

    async def put_json(self, path: str, body: Any) -> Any:
        return self._answer("PUT", path, None, body)
