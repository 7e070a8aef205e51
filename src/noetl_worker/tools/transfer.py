"""``transfer``: move rows from a postgres, duckdb or http source into a postgres or duckdb table.

Config::

    source: {type: postgres | duckdb | http, query, params, <connection>}   # http: url, method,
            headers, params, json | body, data_path (dotted path to the row list in the answer)
    target: {type: postgres | duckdb, table, mapping {target_column: source_column}, key,
             <connection>}
    chunk_size: 1000        # rows per read and per write (also accepted under source)
    mode: append | replace | upsert          # upsert needs target.key (a column or a list)
    commit: end | chunk     # end (default): one transaction; chunk: commit after every chunk

``<connection>`` is the postgres tool's fields (``connection_string`` | ``dsn`` |
``connection``, or ``host``/``port``/``database``/``user``/``password``; usually from a
credential alias, resolved for each side separately) or duckdb's ``db_path`` | ``database``.

Streaming: a postgres source is read through a server-side cursor and a duckdb source as Arrow
record batches, ``chunk_size`` rows at a time, so the source is never held in memory; one chunk
is read while the previous one is written. An http source is one response, split into chunks
for writing. Blocking driver calls run in worker threads.

Target tables must exist. By default everything is written in one transaction on the target:
``replace`` empties the table first, and a failure rolls the whole transfer back, so a table is
never left half-replaced. DuckDB holds an uncommitted transaction's rows in memory (about 60 MiB
per million narrow rows, see docs/performance.md); ``commit: chunk`` bounds that by committing
each chunk, at the price of atomicity (a failure leaves the earlier chunks committed).
postgres targets use ``COPY`` (``append``/``replace``) or ``INSERT … ON CONFLICT (key) DO
UPDATE`` (``upsert``); duckdb targets insert each chunk as an Arrow table.

Result data: ``{rows_read, rows_written, chunks, duration_ms, source, target, table, mode}``; a
failure is a result with status ``error`` naming the chunk (its number and row range) and
whether reading or writing failed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

import attrs
import duckdb
import httpx
import psycopg
import trio
from psycopg import sql

from ..errors import ToolConfigError
from . import _fields
from .base import ToolContext, ToolResult

KIND: Final = "transfer"
SOURCES: Final = ("postgres", "duckdb", "http")
TARGETS: Final = ("postgres", "duckdb")
MODES: Final = ("append", "replace", "upsert")
COMMITS: Final = ("end", "chunk")
DEFAULT_CHUNK: Final = 1000
MAX_CHUNK: Final = 1_000_000


@attrs.frozen
class Chunk:
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


class TransferFailed(Exception):
    def __init__(self, stage: str, chunk: int, first_row: int, rows: int, cause: Exception) -> None:
        self.stage = stage
        self.chunk = chunk
        self.first_row = first_row
        self.rows = rows
        self.cause = cause
        span = f"rows {first_row}-{first_row + rows - 1}" if rows else f"from row {first_row}"
        super().__init__(f"{stage} chunk {chunk} ({span}) failed: {_message(cause)}")


class Source(Protocol):
    async def next_chunk(self, size: int) -> Chunk | None: ...

    async def aclose(self) -> None: ...


class Target(Protocol):
    async def begin(self, columns: Sequence[str], mode: str, key: Sequence[str]) -> None: ...

    async def write(self, chunk: Chunk) -> None: ...

    async def commit(self) -> None: ...

    async def commit_chunk(self) -> None: ...

    async def aclose(self) -> None: ...


# --- config ------------------------------------------------------------------------------


@attrs.frozen
class Plan:
    source_type: str
    target_type: str
    table: str
    mode: str
    key: tuple[str, ...]
    mapping: tuple[tuple[str, str], ...] | None
    chunk_size: int
    commit: str = "end"


def _side(config: Mapping[str, Any], side: str) -> Mapping[str, Any]:
    value = config.get(side)
    if not isinstance(value, Mapping):
        accepted = SOURCES if side == "source" else TARGETS
        raise ToolConfigError(
            KIND, side, f"required: an object with type ({', '.join(accepted)}) and its fields"
        )
    return value


def read_plan(config: Mapping[str, Any]) -> Plan:
    source, target = _side(config, "source"), _side(config, "target")
    source_type = _choice(source, "source.type", SOURCES)
    target_type = _choice(target, "target.type", TARGETS)
    table = target.get("table")
    if not isinstance(table, str) or not table.strip():
        raise ToolConfigError(
            KIND, "target.table", "required: the name of an existing table (schema.table allowed)"
        )
    mode = _fields.choice(KIND, config, "mode", MODES, None) or _fields.choice(
        KIND, target, "mode", MODES, "append"
    )
    assert mode is not None
    raw_key = _fields.first(target, "key", "upsert_key", "conflict_columns") or _fields.first(config, "key")
    key: tuple[str, ...] = ()
    if raw_key is not None:
        value = raw_key[1]
        key = (
            (value,)
            if isinstance(value, str)
            else tuple(str(v) for v in value)
            if isinstance(value, list)
            else ()
        )
        if not key:
            raise ToolConfigError(
                KIND, f"target.{raw_key[0]}", f"expected a column name or a list of them, got {value!r}"
            )
    if mode == "upsert" and not key:
        raise ToolConfigError(
            KIND, "target.key", "required for mode upsert: the conflict column(s) of the target"
        )
    mapping = target.get("mapping", config.get("mapping"))
    pairs: tuple[tuple[str, str], ...] | None = None
    if mapping is not None:
        if (
            not isinstance(mapping, Mapping)
            or not mapping
            or not all(isinstance(v, str) for v in mapping.values())
        ):
            raise ToolConfigError(
                KIND,
                "target.mapping",
                f"expected an object of target column to source column names, got {mapping!r}",
            )
        pairs = tuple((str(k), str(v)) for k, v in mapping.items())
    chunk = config.get("chunk_size", source.get("chunk_size", DEFAULT_CHUNK))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK:
        raise ToolConfigError(
            KIND, "chunk_size", f"{chunk!r} is not accepted: expected an integer 1..{MAX_CHUNK}"
        )
    commit = _fields.choice(KIND, config, "commit", COMMITS, "end") or "end"
    return Plan(source_type, target_type, table.strip(), mode, key, pairs, chunk, commit)


def _choice(side: Mapping[str, Any], field: str, accepted: tuple[str, ...]) -> str:
    value = side.get("type", side.get("kind"))
    if isinstance(value, str) and value.lower() in accepted:
        return value.lower()
    raise ToolConfigError(KIND, field, f"{value!r} is not accepted: expected one of {', '.join(accepted)}")


def _conninfo(side: Mapping[str, Any], name: str) -> str:
    from . import postgres

    config = dict(side)
    if isinstance(config.get("connection"), str) and config.get("connection_string") is None:
        config["connection_string"] = config["connection"]
    try:
        return postgres._conninfo(config)
    except ToolConfigError as exc:
        raise ToolConfigError(KIND, f"{name}.{exc.field}", exc.problem) from exc


def _duckdb_path(side: Mapping[str, Any], name: str) -> str:
    found = _fields.first(side, "db_path", "database", "connection")
    path = found[1] if found else None
    if not isinstance(path, str) or not path:
        raise ToolConfigError(
            KIND, f"{name}.db_path", f"required: a DuckDB file path or ':memory:', got {path!r}"
        )
    return path


def _query(side: Mapping[str, Any], name: str) -> str:
    found = _fields.first(side, "query", "sql", "command")
    if found is None or not isinstance(found[1], str) or not found[1].strip():
        raise ToolConfigError(KIND, f"{name}.query", "required: the SELECT that produces the rows")
    return str(found[1]).strip().rstrip(";")


# --- sources -----------------------------------------------------------------------------


@attrs.define(eq=False)
class PostgresSource:
    """A named (server-side) cursor on a connection of its own, in a read-only transaction."""

    conn: psycopg.Connection[tuple[Any, ...]]
    cursor: Any
    columns: tuple[str, ...] = ()

    @classmethod
    async def open(cls, side: Mapping[str, Any], chunk_size: int) -> PostgresSource:
        conninfo = _conninfo(side, "source")
        query = _query(side, "source")
        params = side.get("params")

        def start() -> PostgresSource:
            conn = psycopg.connect(conninfo, autocommit=False)
            try:
                conn.read_only = True
                cursor = conn.cursor(name="noetl_transfer")
                cursor.itersize = chunk_size
                cursor.execute(query, params)
                return cls(conn, cursor)
            except BaseException:
                conn.close()
                raise

        return await trio.to_thread.run_sync(start)

    async def next_chunk(self, size: int) -> Chunk | None:
        def fetch() -> Chunk | None:
            rows = self.cursor.fetchmany(size)
            if not self.columns and self.cursor.description is not None:
                self.columns = tuple(c.name for c in self.cursor.description)
            return Chunk(self.columns, rows) if rows else None

        return await trio.to_thread.run_sync(fetch)

    async def aclose(self) -> None:
        def close() -> None:
            try:
                self.cursor.close()
            finally:
                self.conn.rollback()
                self.conn.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close)


@attrs.define(eq=False)
class DuckdbSource:
    """Arrow record batches from DuckDB's streaming result."""

    conn: duckdb.DuckDBPyConnection
    reader: Any

    @classmethod
    async def open(cls, side: Mapping[str, Any], chunk_size: int) -> DuckdbSource:
        path = _duckdb_path(side, "source")
        query = _query(side, "source")
        params = side.get("params")

        def start() -> DuckdbSource:
            # The duckdb tool's settings: DuckDB shares one instance per file only between
            # connections opened with the same configuration.
            conn = duckdb.connect(path, config={"autoinstall_known_extensions": False})
            try:
                relation = conn.sql(query, params=params)
                # duckdb 2 names it to_arrow_reader; 1.x fetch_arrow_reader.
                to_reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
                reader = to_reader(chunk_size)
                return cls(conn, reader)
            except BaseException:
                conn.close()
                raise

        return await trio.to_thread.run_sync(start)

    async def next_chunk(self, size: int) -> Chunk | None:
        def fetch() -> Chunk | None:
            try:
                batch = self.reader.read_next_batch()
            except StopIteration:
                return None
            names = tuple(batch.schema.names)
            columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            return Chunk(names, list(zip(*columns, strict=True)))

        return await trio.to_thread.run_sync(fetch)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.conn.close)


@attrs.define(eq=False)
class RowsSource:
    """Rows already in memory (an http answer), handed out a chunk at a time."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    offset: int = 0

    @classmethod
    async def fetch_http(cls, side: Mapping[str, Any], ctx: ToolContext) -> RowsSource:
        url = side.get("url") or side.get("endpoint")
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            raise ToolConfigError(KIND, "source.url", f"{url!r} is not accepted: expected an http(s) URL")
        method = str(side.get("method") or "GET").upper()
        headers = side.get("headers") or {}
        if not isinstance(headers, Mapping):
            raise ToolConfigError(KIND, "source.headers", f"expected an object, got {headers!r}")
        body = side.get("json", side.get("body"))
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.request(
                method,
                url,
                headers={str(k): str(v) for k, v in headers.items()},
                params=side.get("params"),
                json=body,
            )
        response.raise_for_status()
        document = await trio.to_thread.run_sync(response.json)  # a large answer: not on the trio thread
        path = side.get("data_path")
        for part in str(path).split(".") if path else []:
            document = document[int(part)] if isinstance(document, list) else document[part]
        if not isinstance(document, list):
            raise ToolConfigError(
                KIND, "source.data_path", f"the answer at {path or 'the top level'!r} is not a list of rows"
            )
        return cls.from_records(document)

    @classmethod
    def from_records(cls, records: list[Any]) -> RowsSource:
        if not records:
            return cls((), [])
        if all(isinstance(r, Mapping) for r in records):
            names: dict[str, None] = {}
            for record in records:
                names.update(dict.fromkeys(str(k) for k in record))
            columns = tuple(names)
            return cls(columns, [tuple(r.get(c) for c in columns) for r in records])
        if all(isinstance(r, list) for r in records):
            width = len(records[0])
            return cls(tuple(f"column{i}" for i in range(width)), [tuple(r) for r in records])
        raise ValueError("rows must all be objects or all be lists")

    async def next_chunk(self, size: int) -> Chunk | None:
        rows = self.rows[self.offset : self.offset + size]
        self.offset += len(rows)
        await trio.lowlevel.checkpoint()
        return Chunk(self.columns, rows) if rows else None

    async def aclose(self) -> None:
        self.rows = []


# --- targets -----------------------------------------------------------------------------


def _identifier(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split("."))


@attrs.define(eq=False)
class PostgresTarget:
    conninfo: str
    table: str
    conn: psycopg.Connection[tuple[Any, ...]] | None = None
    columns: tuple[str, ...] = ()
    statement: Any = None
    copy: bool = True

    async def begin(self, columns: Sequence[str], mode: str, key: Sequence[str]) -> None:
        self.columns = tuple(columns)
        table = _identifier(self.table)
        names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        if mode == "upsert":
            self.copy = False
            updates = [c for c in columns if c not in key]
            action = (
                sql.SQL("DO UPDATE SET ")
                + sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
                if updates
                else sql.SQL("DO NOTHING")
            )
            self.statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {}").format(
                table,
                names,
                sql.SQL(", ").join(sql.Placeholder() for _ in columns),
                sql.SQL(", ").join(sql.Identifier(k) for k in key),
                action,
            )
        else:
            self.statement = sql.SQL("COPY {} ({}) FROM STDIN").format(table, names)

        def start() -> psycopg.Connection[tuple[Any, ...]]:
            conn = psycopg.connect(self.conninfo, autocommit=False)
            if mode == "replace":
                # DELETE, not TRUNCATE: it waits for no exclusive lock and rolls back with the rest.
                conn.execute(sql.SQL("DELETE FROM {}").format(table))
            return conn

        self.conn = await trio.to_thread.run_sync(start)

    async def write(self, chunk: Chunk) -> None:
        conn = self.conn
        assert conn is not None

        def write() -> None:
            with conn.cursor() as cursor:
                if self.copy:
                    with cursor.copy(self.statement) as copy:
                        for row in chunk.rows:
                            copy.write_row(row)
                else:
                    cursor.executemany(self.statement, chunk.rows)

        await trio.to_thread.run_sync(write)

    async def commit(self) -> None:
        assert self.conn is not None
        await trio.to_thread.run_sync(self.conn.commit)

    async def commit_chunk(self) -> None:
        await self.commit()  # psycopg opens the next transaction on the next statement

    async def aclose(self) -> None:
        conn = self.conn
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close)  # uncommitted work rolls back


@attrs.define(eq=False)
class DuckdbTarget:
    path: str
    table: str
    conn: duckdb.DuckDBPyConnection | None = None
    statement: str = ""

    async def begin(self, columns: Sequence[str], mode: str, key: Sequence[str]) -> None:
        def quote(name: str) -> str:
            return '"' + name.replace('"', '""') + '"'

        table = ".".join(quote(p) for p in self.table.split("."))
        names = ", ".join(quote(c) for c in columns)
        statement = f"INSERT INTO {table} ({names}) SELECT * FROM noetl_chunk"
        if mode == "upsert":
            updates = [c for c in columns if c not in key]
            action = "DO UPDATE SET " + ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in updates)
            statement += (
                f" ON CONFLICT ({', '.join(quote(k) for k in key)}) {action if updates else 'DO NOTHING'}"
            )
        self.statement = statement

        def start() -> duckdb.DuckDBPyConnection:
            conn = duckdb.connect(self.path, config={"autoinstall_known_extensions": False})
            conn.begin()
            if mode == "replace":
                conn.execute(f"DELETE FROM {table}")
            return conn

        self.conn = await trio.to_thread.run_sync(start)

    async def write(self, chunk: Chunk) -> None:
        conn = self.conn
        assert conn is not None

        def write() -> None:
            import pyarrow as pa

            arrays = [pa.array([row[i] for row in chunk.rows]) for i in range(len(chunk.columns))]
            table = pa.Table.from_arrays(arrays, names=[f"c{i}" for i in range(len(chunk.columns))])
            conn.register("noetl_chunk", table)
            conn.execute(self.statement)  # on failure the connection is discarded, rolled back
            conn.unregister("noetl_chunk")

        await trio.to_thread.run_sync(write)

    async def commit(self) -> None:
        assert self.conn is not None
        await trio.to_thread.run_sync(self.conn.commit)

    async def commit_chunk(self) -> None:
        conn = self.conn
        assert conn is not None

        def commit() -> None:
            conn.commit()
            conn.begin()

        await trio.to_thread.run_sync(commit)

    async def aclose(self) -> None:
        conn = self.conn
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close)


# --- the tool ----------------------------------------------------------------------------


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    cfg = ctx.render(dict(config))
    plan = read_plan(cfg)
    source_side, target_side = _side(cfg, "source"), _side(cfg, "target")
    target: Target
    if plan.target_type == "postgres":
        target = PostgresTarget(_conninfo(target_side, "target"), plan.table)
    else:
        target = DuckdbTarget(_duckdb_path(target_side, "target"), plan.table)
    summary = {"source": plan.source_type, "target": plan.target_type, "table": plan.table, "mode": plan.mode}
    started = time.monotonic()
    counts = {"rows_read": 0, "rows_written": 0, "chunks": 0}
    status = "error"
    try:
        try:
            source = await _open_source(plan, source_side, ctx)
        except ToolConfigError:
            raise
        except Exception as exc:
            raise TransferFailed("read", 1, 1, 0, exc) from exc
        try:
            await _pump(plan, source, target, counts)
        finally:
            await source.aclose()
        status = "success"
        duration = int((time.monotonic() - started) * 1000)
        return ToolResult("success", data={**counts, "duration_ms": duration, **summary})
    except TransferFailed as exc:
        duration = int((time.monotonic() - started) * 1000)
        written = counts["rows_written"]
        if plan.commit == "end":
            counts["rows_written"] = 0  # rolled back with the transaction
        data = {
            **counts,
            "duration_ms": duration,
            **summary,
            "failed_chunk": exc.chunk,
            "failed_stage": exc.stage,
            "rows_written_before_rollback": written,
            "error": _message(exc.cause),
        }
        where = (
            f"writing to {plan.target_type} table {plan.table}"
            if exc.stage == "write"
            else f"reading the {plan.source_type} source"
        )
        committed = (
            "nothing committed"
            if plan.commit == "end"
            else f"the {counts['rows_written']} rows of earlier chunks stay committed"
        )
        return ToolResult(
            "error",
            error=f"transfer: {exc} ({where}; {committed})",
            data=data,
        )
    finally:
        await target.aclose()
        metrics = ctx.resources.metrics
        if metrics is not None:
            metrics.tool_operation(KIND, f"{plan.source_type}_to_{plan.target_type}", status)
            metrics.transfer_rows_moved(counts["rows_read"], counts["rows_written"])


async def _open_source(plan: Plan, side: Mapping[str, Any], ctx: ToolContext) -> Source:
    if plan.source_type == "postgres":
        return await PostgresSource.open(side, plan.chunk_size)
    if plan.source_type == "duckdb":
        return await DuckdbSource.open(side, plan.chunk_size)
    return await RowsSource.fetch_http(side, ctx)


async def _pump(plan: Plan, source: Source, target: Target, counts: dict[str, int]) -> None:
    """Read chunk n+1 while chunk n is written; at most two chunks in memory."""
    try:
        await _pump_chunks(plan, source, target, counts)
    except BaseExceptionGroup as group:
        # The reader task's failure arrives wrapped (strict exception groups): unwrap ours.
        ours, rest = group.split((TransferFailed, ToolConfigError))
        if ours is not None and rest is None:
            first = ours.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise


async def _pump_chunks(plan: Plan, source: Source, target: Target, counts: dict[str, int]) -> None:
    send, receive = trio.open_memory_channel[tuple[int, int, Chunk]](0)

    async def reader() -> None:
        async with send:
            number, first = 1, 1
            while True:
                try:
                    chunk = await source.next_chunk(plan.chunk_size)
                except Exception as exc:
                    raise TransferFailed("read", number, first, 0, exc) from exc
                if chunk is None:
                    return
                counts["rows_read"] += len(chunk.rows)
                await send.send((number, first, chunk))
                number, first = number + 1, first + len(chunk.rows)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        begun = False
        async with receive:
            async for number, first, chunk in receive:
                columns, rows = _mapped(plan, chunk)
                try:
                    if not begun:
                        await target.begin(columns, plan.mode, plan.key)
                        begun = True
                    await target.write(attrs.evolve(chunk, columns=columns, rows=rows))
                    if plan.commit == "chunk":
                        await target.commit_chunk()
                except Exception as exc:
                    raise TransferFailed("write", number, first, len(rows), exc) from exc
                counts["rows_written"] += len(rows)
                counts["chunks"] += 1
        if not begun and plan.mode == "replace":
            # An empty source still empties the target in replace mode.
            try:
                await target.begin([t for t, _ in plan.mapping or ()], plan.mode, plan.key)
            except Exception as exc:
                raise TransferFailed("write", 1, 1, 0, exc) from exc
            begun = True
        if begun:
            try:
                await target.commit()
            except Exception as exc:
                raise TransferFailed(
                    "write", counts["chunks"], max(1, counts["rows_written"]), 0, exc
                ) from exc


def _mapped(plan: Plan, chunk: Chunk) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    if plan.mapping is None:
        return chunk.columns, chunk.rows
    index = {name: i for i, name in enumerate(chunk.columns)}
    missing = [source for _, source in plan.mapping if source not in index]
    if missing:
        raise ToolConfigError(
            KIND,
            "target.mapping",
            f"source column(s) {missing} not in the source's columns {list(chunk.columns)}",
        )
    picks = [index[source] for _, source in plan.mapping]
    return tuple(t for t, _ in plan.mapping), [tuple(row[i] for i in picks) for row in chunk.rows]


def _message(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error):
        primary = exc.diag.message_primary if exc.sqlstate else None
        code = f"SQLSTATE {exc.sqlstate}: " if exc.sqlstate else ""
        return code + (primary or str(exc).strip())
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
