"""The one small protocol every tool kind implements, and the values it exchanges.

A tool is an async function ``run(config, ctx) -> ToolResult`` living in its own module under
``noetl_worker.tools``. It runs on the trio thread and must never block it (run blocking
libraries with ``trio.to_thread.run_sync`` or in a subprocess). ``dispatch`` puts a trio
deadline around it (the tool's ``timeout`` or the worker cap, whichever is smaller); on expiry
the tool is cancelled and the command reports status ``timeout``, so tools only need to be
cancellable, not to implement the deadline themselves.

Outcomes:
- return a ``ToolResult`` (see its docstring for what ``status``, ``data`` and ``error`` mean);
  a failure the playbook can see — an exception in user code, a non-zero exit, a failing SQL
  statement, a non-2xx HTTP answer — is a *result* with status ``error``, not an exception;
- raise ``ToolConfigError(kind, field, problem)`` for invalid configuration, ``ToolError`` when
  the tool could not run at all.

How a result becomes events is the server dialect's business, never the tool's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import attrs
import trio

if TYPE_CHECKING:
    from ..config import Settings

ToolStatus = Literal["success", "error", "timeout"]
TOOL_STATUSES: tuple[ToolStatus, ...] = ("success", "error", "timeout")


@attrs.frozen
class ToolResult:
    """What a tool returns.

    The contract every tool keeps (and the server dialect relies on):

    - ``status`` ``"success"``: ``data`` is the step's result exactly as noetl's own Python
      worker (4.12.1) stores it, so ``{{ step.field }}`` in later steps reads the same fields:
      python → ``main()``'s return value (else the ``result`` global, else a summary); shell →
      ``{returncode, stdout, stderr, commands, duration_ms}``; http → ``{status_code, headers,
      url, elapsed, data}``; postgres → the last statement's ``{status, rows, columns,
      row_count}`` plus ``statement_count``; duckdb → its summary (``command_<n>_rows``,
      ``command_<n>_sample``, …); task_sequence → ``{status, _prev, results, ctx, metrics}``;
      playbook with ``return_step`` → the child's status document. Each tool module documents
      its shape.
    - ``status`` ``"error"`` / ``"timeout"``: what noetl's worker treats as a tool error (python
      exception, non-zero exit, failing SQL, non-2xx HTTP, a failed task sequence, a deadline).
      ``error`` is the error text (one line, for people); ``data`` is the data part of noetl's
      error envelope when it has one (shell ``{returncode, stdout, stderr, commands,
      duration_ms}``, http the response as on success, postgres the statement summary with
      ``errors``), else a small diagnostic object or ``None``.

    ``stdout`` / ``stderr`` / ``exit_code`` / ``duration_ms`` / ``pending_callback`` are the Rust
    worker's envelope fields; ``to_json`` gives that envelope (the Rust dialect's ``call.done``).
    """

    status: ToolStatus
    data: Any = None
    error: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    exit_code: int | None = None
    duration_ms: int | None = None
    pending_callback: bool = False

    def to_json(self) -> dict[str, Any]:
        """Upstream's shape: absent fields omitted, never null."""
        out: dict[str, Any] = {"status": self.status}
        if self.data is not None:
            out["data"] = self.data
        for key in ("error", "stdout", "stderr", "exit_code", "duration_ms"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.pending_callback:
            out["pending_callback"] = True
        return out


class ServerAPI(Protocol):
    """The control-plane calls a tool may make, bound to the command's ``server_url``.

    Paths start with ``/api/``. Non-2xx answers raise ``errors.HTTPStatusError`` (with
    ``.status``, ``.body``, ``.retryable``); no answer raises ``errors.TransportError``.
    Bodies are JSON; ``None`` is returned for an empty body.
    """

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any: ...

    async def post_json(self, path: str, body: Any) -> Any: ...

    async def put_json(self, path: str, body: Any) -> Any: ...


T = TypeVar("T")


class ToolMetrics(Protocol):
    """What a tool may count (``noetl_worker_tool_operations_total``), labelled by its kind."""

    def tool_operation(self, kind: str, operation: str, status: str) -> None: ...

    def transfer_rows_moved(self, read: int, written: int) -> None: ...


@attrs.define(eq=False)
class ToolResources:
    """Long-lived resources tools share across commands (connection pools, a warm python
    interpreter, ...). Created lazily on first use, closed once when the worker shuts down."""

    metrics: ToolMetrics | None = None
    _items: dict[str, Any] = attrs.field(factory=dict)
    _closers: list[Callable[[], Awaitable[None]]] = attrs.field(factory=list)
    _locks: dict[str, trio.Lock] = attrs.field(factory=dict)

    async def get_or_create(
        self,
        key: str,
        factory: Callable[[], Awaitable[T]],
        close: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        if key in self._items:
            return self._items[key]  # type: ignore[no-any-return]
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            if key not in self._items:
                item = await factory()
                self._items[key] = item
                if close is not None:
                    self._closers.append(lambda: close(item))
        return self._items[key]  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Close everything, newest first; one failing closer does not stop the others."""
        closers, self._closers = self._closers[::-1], []
        self._items.clear()
        with trio.CancelScope(shield=True):
            for closer in closers:
                try:
                    await closer()
                except Exception:
                    import logging

                    logging.getLogger(__name__).exception("closing a tool resource failed")


def _identity(value: Any) -> Any:
    return value


@asynccontextmanager
async def _no_release() -> AsyncIterator[None]:
    yield


async def _as_is(config: Mapping[str, Any]) -> dict[str, Any]:
    return dict(config)


@attrs.frozen
class ToolContext:
    """Everything a tool may know about the command it runs."""

    execution_id: int
    step: str
    command_id: str
    worker_id: str
    server_url: str
    variables: Mapping[str, Any]
    secrets: Mapping[str, str]
    server: ServerAPI
    resources: ToolResources
    settings: Settings
    attempts: int = 0
    # ``async with ctx.release_slot():`` gives the execution slot back while the tool only
    # waits on the server ("waiting is not working", docs/architecture.md) and takes one again.
    release_slot: Callable[[], AbstractAsyncContextManager[None]] = _no_release
    # ``ctx.render(obj)`` renders Jinja templates inside ``obj`` (str / list / dict, recursively)
    # against ``variables``; a bare ``{{ name }}`` yields the object itself, not its string form.
    # Bound by dispatch to ``templating.render``; identity where no templating is wanted.
    render: Callable[[Any], Any] = _identity
    # ``await ctx.prepare_task(config)`` gives a tool config that a tool assembles at run time
    # (a task of a task sequence, a workbook action) the same treatment the command's own
    # config had before dispatch: credential aliases (``auth: <name>``, the ``{alias: {type,
    # key}}`` map) and ``{{ keychain.… }}`` references resolved, their secrets added to
    # ``secrets`` so results are scrubbed of them. Bound by the pipeline; as-is by default.
    prepare_task: Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]] = _as_is


ToolFunction = Callable[[Mapping[str, Any], ToolContext], Awaitable[ToolResult]]
