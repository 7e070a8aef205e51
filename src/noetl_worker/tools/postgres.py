"""``postgres``: run SQL with psycopg 3 (its sync API, in worker threads; psycopg's async API
needs asyncio).

Connection: ``connection_string`` | ``dsn``, and/or ``host``, ``port``, ``database`` |
``dbname``, ``user``, ``password`` (the worker has already applied credentials to these),
``schema`` (sets ``search_path``). Statements run in autocommit mode, one after another, so a
script may carry its own ``BEGIN`` / ``COMMIT``. ``params`` bind to every statement that has
markers: ``%s`` / ``%(name)s`` (psycopg) or ``$1`` (the Rust worker's; rewritten).

Connections are pooled per connection string (a few idle ones kept, ``POOL_SIZE`` at most in
use) and closed when the worker shuts down. A cancelled command cancels its query on the server.

SQL fields and result shape: see ``_sqltool`` — the last statement's ``{status, rows, columns,
row_count}`` (or ``{status, row_count, message}``) plus ``statement_count``; the first failing
statement stops the script and gives status ``error``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import psycopg
import psycopg.conninfo
import psycopg.pq
import trio

from ..errors import ToolConfigError
from . import _fields, _sql, _sqltool
from ._blocking import run_interruptible
from .base import ToolContext, ToolResult

KIND = "postgres"
POOL_SIZE = 8
CONNECT_TIMEOUT = 10
Connection = psycopg.Connection[tuple[Any, ...]]


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    conninfo = _conninfo(config)
    statements = _sqltool.read_statements(KIND, config, ctx)
    params = _sqltool.read_params(KIND, config, ctx)
    as_objects = _fields.flag(KIND, config, "as_objects", default=True)
    bound = [_bind(statement, params) for statement in statements]
    pool = await ctx.resources.get_or_create(
        f"{KIND}.pool:{conninfo}", lambda: _new_pool(conninfo), _Pool.aclose
    )
    try:
        async with pool.connection() as conn:
            stop = threading.Event()

            def interrupt() -> None:
                stop.set()
                conn.cancel_safe(timeout=5.0)

            try:
                results = await run_interruptible(lambda: _execute(conn, bound, as_objects, stop), interrupt)
            except _StatementError as exc:  # the connection is still good: keep it
                error = exc.error
                return _sqltool.error_result(
                    KIND, error.sqlstate, _message(error), exc.index, len(statements)
                )
    except psycopg.Error as exc:  # connecting failed
        return _sqltool.error_result(KIND, exc.sqlstate, _message(exc), None, len(statements))
    return ToolResult("success", data=_sqltool.combine(results))


def _conninfo(config: Mapping[str, Any]) -> str:
    base = _fields.first(config, "connection_string", "dsn", "conninfo")
    keywords: dict[str, Any] = {}
    for name, keyword in (
        ("host", "host"),
        ("port", "port"),
        ("database", "dbname"),
        ("dbname", "dbname"),
        ("user", "user"),
        ("username", "user"),
        ("password", "password"),
        ("sslmode", "sslmode"),
    ):
        if config.get(name) is not None and keyword not in keywords:
            keywords[keyword] = str(config[name])
    if base is None and not ({"host", "dbname"} & set(keywords)):
        raise ToolConfigError(
            KIND,
            "connection_string",
            "required: connection_string (or dsn), or host/port/database/user/password fields",
        )
    if config.get("schema") is not None:
        keywords["options"] = f"-c search_path={config['schema']}"
    try:
        given = psycopg.conninfo.conninfo_to_dict(str(base[1]) if base else "")
        for keyword, default in (
            ("connect_timeout", CONNECT_TIMEOUT),
            ("application_name", "noetl-worker"),
        ):
            if keyword not in given:
                keywords.setdefault(keyword, default)
        return psycopg.conninfo.make_conninfo(str(base[1]) if base else "", **keywords)
    except psycopg.ProgrammingError as exc:
        field = base[0] if base else "host"
        raise ToolConfigError(KIND, field, f"not a valid connection string: {exc}") from exc


def _bind(statement: str, params: Any) -> tuple[str, Any]:
    if params is None or not _sql.has_markers(statement):
        return statement, None
    if isinstance(params, list):
        try:
            rewritten = _sql.numbered_to_pyformat(statement, params)
        except IndexError as exc:
            raise ToolConfigError(KIND, "params", str(exc)) from exc
        if rewritten is not None:
            return rewritten
    return statement, params


class _StatementError(Exception):
    def __init__(self, index: int, error: psycopg.Error) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class _Stopped(Exception):
    """The command was cancelled between two statements."""


def _execute(
    conn: Connection, bound: list[tuple[str, Any]], as_objects: bool, stop: threading.Event
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with conn.cursor() as cursor:
        for index, (statement, params) in enumerate(bound):
            if stop.is_set():
                raise _Stopped
            try:
                cursor.execute(statement, params)
                if cursor.description is None:
                    results.append(_sqltool.command_result(cursor.rowcount))
                    continue
                columns = [column.name for column in cursor.description]
                results.append(_sqltool.rows_result(columns, cursor.fetchall(), as_objects))
            except psycopg.Error as exc:
                raise _StatementError(index, exc) from exc
    return results


def _message(error: psycopg.Error) -> str:
    primary = error.diag.message_primary if error.sqlstate else None
    return primary or str(error).strip()


@attrs.define(eq=False)
class _Pool:
    """Sync connections to one server, used from worker threads, at most ``POOL_SIZE`` at once."""

    conninfo: str
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(POOL_SIZE))
    idle: list[Connection] = attrs.field(factory=list)
    closed: bool = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        async with self.limiter:
            conn = self._take_idle()
            if conn is None:
                conn = await trio.to_thread.run_sync(self._connect)
            reusable = False
            try:
                yield conn
                reusable = True
            finally:
                idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if reusable and idle and not self.closed:
                    self.idle.append(conn)
                else:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(conn.close)

    def _take_idle(self) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and not conn.broken:
                return conn
        return None

    def _connect(self) -> Connection:
        return psycopg.connect(self.conninfo, autocommit=True)

    async def aclose(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            await trio.to_thread.run_sync(conn.close)


async def _new_pool(conninfo: str) -> _Pool:
    return _Pool(conninfo)
