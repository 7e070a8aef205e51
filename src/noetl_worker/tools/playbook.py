"""``playbook``: start a child execution on the server and, with ``return_step``, wait for it.

Config: ``path`` | ``resource_path`` | ``catalog_id``, ``version``, ``payload`` (else ``args`` and
``input`` merged, ``input`` winning; else ``workload``) — the child's workload,
``parent_execution_id`` (this command's execution when absent), ``return_step`` (wait for the
child), ``wait`` (overrides: true waits even without ``return_step``, false never waits),
``timeout`` (300 s of waiting), ``poll_interval`` (2 s).

``POST /api/execute`` starts the child. Without waiting the result ``data`` is noetl's
fire-and-forget answer ``{status: "started", execution_id, path, data: <execute answer>}``.
Waiting, ``GET /api/executions/{id}/status`` is polled until it reports ``completed`` or
``failed`` and ``data`` is that status document, as noetl's worker stores it: a *failed* child
is a successful call (the parent routes on ``{{ step.failed }}``), as it is there. Not done
within ``timeout``: status ``timeout`` (noetl's worker reports success with ``status:
started``). While polling, the worker's execution slot is given back: the child's own commands
may need it. Transport errors and retryable statuses (408, 425, 429, 5xx) are retried with
capped backoff, honouring ``Retry-After``; other 4xx answers end the tool with status ``error``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import trio

from ..errors import HTTPStatusError, ToolConfigError, TransportError
from ..retry import PLAYBOOK_RETRY
from . import _fields
from .base import ToolContext, ToolResult

KIND = "playbook"
DEFAULT_TIMEOUT = 300.0
DEFAULT_POLL_INTERVAL = 2.0
EXECUTE_ATTEMPTS = 5
_DONE = frozenset({"completed", "complete", "success", "succeeded", "finished"})
_FAILED = frozenset({"failed", "failure", "error", "cancelled", "canceled", "aborted"})

T = TypeVar("T")


class _Final(Exception):
    """The server answered with a non-retryable error: the tool's result is ``error``."""

    def __init__(self, what: str, error: HTTPStatusError) -> None:
        super().__init__(f"{what}: HTTP {error.status}: {error.body[:500]}")
        self.error = error


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    body = _execute_body(config, ctx)
    wait = _fields.flag(KIND, config, "wait", default=config.get("return_step") not in (None, ""))
    timeout = _fields.seconds(KIND, config, "timeout") or DEFAULT_TIMEOUT
    poll_interval = _fields.seconds(KIND, config, "poll_interval") or DEFAULT_POLL_INTERVAL

    try:
        started = await _retrying(
            "POST /api/execute",
            lambda: ctx.server.post_json("/api/execute", body),
            attempts=EXECUTE_ATTEMPTS,
        )
    except _Final as exc:
        return _final_error(exc)
    except TransportError as exc:
        return ToolResult("error", error=f"POST /api/execute: server unreachable: {exc}")
    execution_id = _execution_id(started)
    if not wait:
        data = {"status": "started", "execution_id": execution_id, "path": body.get("path"), "data": started}
        return ToolResult("success", data=data)
    if execution_id is None:
        return ToolResult("error", data={"response": started}, error="POST /api/execute gave no execution_id")

    path = f"/api/executions/{execution_id}/status"
    last: Any = None
    outcome: str | None = None
    try:
        async with ctx.release_slot():
            with trio.move_on_after(timeout):
                while True:
                    last = await _retrying(f"GET {path}", lambda: ctx.server.get_json(path))
                    outcome = _outcome(last)
                    if outcome is not None:
                        break
                    await trio.sleep(poll_interval)
    except _Final as exc:
        return _final_error(exc, execution_id)
    data = {
        **(last if isinstance(last, Mapping) else {"status": last}),
        "execution_id": execution_id,
    }
    if outcome is not None:
        return ToolResult("success", data=data)
    return ToolResult(
        "timeout",
        data=data,
        error=f"child execution {execution_id} did not finish within {timeout:g} s",
    )


def _execute_body(config: Mapping[str, Any], ctx: ToolContext) -> dict[str, Any]:
    target = _fields.first(config, "path", "resource_path", "catalog_id")
    if target is None:
        raise ToolConfigError(KIND, "path", "required: a playbook path (or catalog_id)")
    name, value = target
    value = ctx.render(value)
    if not isinstance(value, str | int) or value == "":
        raise ToolConfigError(KIND, name, f"expected a non-empty string, got {value!r}")
    body: dict[str, Any] = {"catalog_id" if name == "catalog_id" else "path": str(value)}
    if config.get("version") is not None:
        body["version"] = ctx.render(config["version"])
    payload: dict[str, Any] = {}
    for name in ("payload",) if config.get("payload") is not None else ("workload", "args", "input"):
        value = config.get(name)
        if value is None:
            continue
        value = ctx.render(value)
        if not isinstance(value, Mapping):
            raise ToolConfigError(KIND, name, "expected an object")
        payload.update(value)
    body["payload"] = payload
    parent = config.get("parent_execution_id")
    # A string: the Python server's execution ids are strings, and it does not coerce ints.
    body["parent_execution_id"] = str(ctx.render(parent) if parent is not None else ctx.execution_id)
    return body


def _execution_id(response: Any) -> str | None:
    if not isinstance(response, Mapping):
        return None
    for key in ("execution_id", "id"):
        if response.get(key) not in (None, ""):
            return str(response[key])
    return None


def _outcome(status: Any) -> str | None:
    if not isinstance(status, Mapping):
        return None
    # Failed first: a failed execution may also report ``completed: true``.
    if status.get("failed") is True:
        return "failed"
    if status.get("completed") is True:
        return "completed"
    text = str(status.get("status") or "").strip().lower()
    if text in _FAILED:
        return "failed"
    if text in _DONE:
        return "completed"
    return None


async def _retrying(what: str, call: Callable[[], Awaitable[T]], *, attempts: int | None = None) -> T:
    """``call()``, retried on transport errors and retryable statuses with capped backoff."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except HTTPStatusError as exc:
            if not exc.retryable or (attempts is not None and attempt >= attempts):
                raise _Final(what, exc) from exc
            wait = PLAYBOOK_RETRY.delay(attempt, exc.retry_after)
        except TransportError:
            if attempts is not None and attempt >= attempts:
                raise
            wait = PLAYBOOK_RETRY.delay(attempt)
        await trio.sleep(wait)


def _final_error(exc: _Final, execution_id: str | None = None) -> ToolResult:
    data: dict[str, Any] = {"status_code": exc.error.status, "body": exc.error.body}
    if execution_id is not None:
        data["execution_id"] = execution_id
    return ToolResult("error", data=data, error=str(exc))
