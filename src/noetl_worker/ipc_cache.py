"""Same-node fast path for large results: POSIX shared memory holding Arrow IPC (the Rust worker's IPC hint).

The durable result store stays authoritative; a consumer on the same node may read the staged
bytes instead of fetching them over HTTP. Unlike upstream, entries are *owned*: an entry is
unlinked when its lease has expired (``sweep``, run on every ``put`` and periodically by the
service) and every entry this process created is unlinked by ``close`` at shutdown
(docs/architecture.md, "Shared-memory results are cleaned up").

Segments are created with ``_posixshmem.shm_open`` + ``mmap`` rather than
``multiprocessing.shared_memory``: on Python 3.11/3.12 the latter registers each segment with
the resource tracker, which unlinks it (with a warning) when the process exits and so fights
our own lease bookkeeping. Everything here blocks (memcpy of up to the whole budget):
call it from a worker thread (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import orjson

from .errors import WorkerError

log = logging.getLogger(__name__)
# CPython's own module behind multiprocessing.shared_memory (POSIX only); untyped in typeshed.
_posixshmem: Any = importlib.import_module("_posixshmem")

ARROW_MEDIA_TYPE: Final = "application/vnd.apache.arrow.stream"
JSON_MEDIA_TYPE: Final = "application/json"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_]{1,64}")


class IpcHintError(WorkerError):
    """A shared-memory hint cannot be used here (other node, expired lease, gone, malformed)."""


@attrs.frozen
class EncodedPayload:
    """The bytes staged in shared memory and how to interpret them."""

    data: bytes | memoryview = attrs.field(repr=lambda b: f"<{len(b)} bytes>")  # Arrow: a view of its buffer
    media_type: str
    schema_digest: str  # "arrow" or "json"
    row_count: int | None = None


def compact_json(value: Any) -> bytes:
    """Compact UTF-8 JSON. orjson (C, ~10x json's speed on a 50 MB result); what it refuses
    (integers past 64 bits, unknown types) goes through json as before."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _all_mappings(rows: list[Any]) -> bool:
    # The type set is gathered in C; the ABC check per row only for rows that are not dicts.
    return set(map(type, rows)) == {dict} or all(isinstance(r, Mapping) for r in rows)


def _tabular(result_json: Mapping[str, Any]) -> tuple[list[Any], list[str] | None] | None:
    """``(rows, column names)`` if the result is tabular (a list of rows, or columns and rows), else None."""
    for holder in (result_json, result_json.get("data")):
        if not isinstance(holder, Mapping):
            continue
        rows = holder.get("rows")
        if not isinstance(rows, list) or not rows:
            continue
        columns = holder.get("columns")
        names: list[str] | None = None
        if isinstance(columns, list) and columns:
            names = [str(c.get("name")) if isinstance(c, Mapping) else str(c) for c in columns]
        if names is not None or _all_mappings(rows):
            return rows, names
    return None


_BATCH_ROWS = 32_768


def _arrow_stream(rows: list[Any], names: list[str] | None) -> memoryview:
    """The rows as an Arrow IPC stream, returned as a view of Arrow's buffer (no Python copy)."""
    import pyarrow as pa

    if _all_mappings(rows):
        try:
            batches = _row_batches(pa, rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError):
            batches = pa.Table.from_pylist(rows).to_batches()  # one conversion decides the types
    else:
        if names is None or not all(isinstance(r, list | tuple) for r in rows):
            raise TypeError("rows are neither objects nor lists matching columns")
        if any(len(r) != len(names) for r in rows):
            raise ValueError("a row's length differs from the number of columns")
        columns = [pa.array([r[i] for r in rows]) for i in range(len(names))]
        batches = pa.Table.from_arrays(columns, names=names).to_batches()
        del columns
    # Size the stream first (a mock stream only counts), then write it into a buffer of exactly
    # that size: a growing output buffer peaked at twice the stream while it was reallocated.
    schema = batches[0].schema
    counter = pa.MockOutputStream()
    _write_stream(pa, counter, schema, batches)
    buffer = pa.allocate_buffer(counter.size())
    _write_stream(pa, pa.FixedSizeBufferWriter(buffer), schema, batches)
    del batches
    pa.default_memory_pool().release_unused()  # the converters' freed buffers, back to the OS
    return memoryview(buffer).cast("B")


def _write_stream(pa: Any, sink: Any, schema: Any, batches: list[Any]) -> None:
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _row_batches(pa: Any, rows: list[Any]) -> list[Any]:
    """Rows of objects converted a batch at a time: one huge conversion's growing buffers
    peaked at ~2.6x the table's size. Batches whose inferred types differ are cast to the
    widened schema; a batch missing a column (ValueError on cast) sends the caller to the
    one-conversion path."""
    batches = [
        pa.RecordBatch.from_pylist(rows[i : i + _BATCH_ROWS]) for i in range(0, len(rows), _BATCH_ROWS)
    ]
    schemas = {b.schema for b in batches}
    if len(schemas) > 1:
        schema = pa.unify_schemas(list(schemas), promote_options="permissive")
        batches = [b if b.schema == schema else b.cast(schema) for b in batches]
    return batches


def encode_payload(result_json: Mapping[str, Any], json_bytes: bytes | None = None) -> EncodedPayload:
    """Arrow IPC stream for tabular results, else compact JSON (``json_bytes`` if given).

    Rows Arrow cannot type (mixed types in a column, ragged rows) fall back to JSON.
    """
    found = _tabular(result_json)
    if found is not None:
        rows, names = found
        try:
            stream = _arrow_stream(rows, names)
        except Exception as exc:  # pyarrow raises several unrelated types for untypable data
            log.debug("tabular result not encodable as Arrow, staging JSON: %s", exc)
        else:
            return EncodedPayload(stream, ARROW_MEDIA_TYPE, "arrow", len(rows))
    data = json_bytes if json_bytes is not None else compact_json(result_json)
    return EncodedPayload(data, JSON_MEDIA_TYPE, "json", None)


def _rfc3339_ms(epoch: float) -> str:
    stamp = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


@attrs.frozen
class IpcHint:
    """Where a staged payload lives; ``to_json`` is upstream's IpcHint shape."""

    shm_name: str
    schema_digest: str
    byte_length: int
    media_type: str
    row_count: int | None = None
    producer: str | None = None
    node_id: str | None = None
    lease_expires_at: float | None = None  # UNIX seconds

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "arrow_ipc",
            "shm_name": self.shm_name,
            "schema_digest": self.schema_digest,
            "byte_length": self.byte_length,
        }
        if self.row_count is not None:
            out["row_count"] = self.row_count
        if self.producer is not None:
            out["producer"] = self.producer
        if self.node_id is not None:
            out["node_id"] = self.node_id
        if self.lease_expires_at is not None:
            out["lease_expires_at"] = _rfc3339_ms(self.lease_expires_at)
        out["media_type"] = self.media_type
        return out


@attrs.frozen
class _Entry:
    size: int
    lease_expires_at: float


def _sanitize_namespace(namespace: str) -> str:
    cleaned = "".join(ch for ch in namespace if ch.isascii() and (ch.isalnum() or ch == "_"))
    return cleaned[:12] or "noetl"


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


@attrs.define(eq=False)
class IpcCache:
    """Shared-memory segments this process staged, bounded by ``budget_bytes``."""

    budget_bytes: int
    node_id: str
    producer: str
    namespace: str = attrs.field(default="noetl", converter=_sanitize_namespace)
    lease_seconds: float = 60.0
    clock: Callable[[], float] = time.time
    _entries: dict[str, _Entry] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    @property
    def empty(self) -> bool:
        """Nothing staged (a dict's truth value is read atomically; no lock needed)."""
        return not self._entries

    def put(self, payload: EncodedPayload) -> IpcHint | None:
        """Stage ``payload``; None (logged) when it cannot be: too large, empty, no shm."""
        size = len(payload.data)
        if not payload.schema_digest or size == 0 or size > self.budget_bytes:
            log.info("not staging %d bytes in shared memory (budget %d)", size, self.budget_bytes)
            return None
        with self._lock:
            now = self.clock()
            self._sweep_locked(now)
            used = sum(e.size for e in self._entries.values())
            for name in sorted(self._entries, key=lambda n: self._entries[n].lease_expires_at):
                if used + size <= self.budget_bytes:
                    break
                used -= self._entries.pop(name).size
                _unlink(name)
            try:
                name = self._create(payload.data, now)
            except OSError as exc:
                log.warning("shared-memory put of %d bytes failed: %s", size, exc)
                return None
            expires = now + self.lease_seconds
            self._entries[name] = _Entry(size, expires)
        return IpcHint(
            shm_name=name,
            schema_digest=payload.schema_digest,
            byte_length=size,
            media_type=payload.media_type,
            row_count=payload.row_count,
            producer=self.producer,
            node_id=self.node_id,
            lease_expires_at=expires,
        )

    def _create(self, data: bytes | memoryview, now: float) -> str:
        digest = hashlib.sha256(data).hexdigest()[:8]
        micros = int(now * 1_000_000)
        for attempt in range(16):  # same payload in the same microsecond: next name
            name = f"{self.namespace}_{(micros + attempt) & 0xFFFFFFFF:08x}_{digest}"
            try:
                fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            except FileExistsError:
                continue
            try:
                os.ftruncate(fd, len(data))
                # Written, not mapped: the pages do not join this process's RSS.
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException:
                _unlink(name)
                raise
            finally:
                os.close(fd)
            return name
        raise FileExistsError("no free shared-memory name")

    def sweep(self) -> int:
        """Unlink entries whose lease has expired; returns how many."""
        with self._lock:
            return self._sweep_locked(self.clock())

    def _sweep_locked(self, now: float) -> int:
        expired = [n for n, e in self._entries.items() if e.lease_expires_at <= now]
        for name in expired:
            del self._entries[name]
            _unlink(name)
        return len(expired)

    def sweep_orphans(self, directory: str = "/dev/shm") -> int:
        """Unlink this namespace's segments left by crashed processes, once past any lease.

        A segment's lease starts when it is written, so one whose modification time is older
        than ``lease_seconds`` has expired whoever made it. Linux exposes POSIX shared memory
        as files in ``/dev/shm``; elsewhere this finds nothing. Call it at start.
        """
        pattern = re.compile(re.escape(self.namespace) + r"_[0-9a-f]{8}_[0-9a-f]{8}")
        cutoff = self.clock() - self.lease_seconds
        removed = 0
        try:
            names = os.listdir(directory)
        except OSError:
            return 0
        with self._lock:
            for name in names:
                if not pattern.fullmatch(name) or name in self._entries:
                    continue
                try:
                    if os.stat(os.path.join(directory, name)).st_mtime >= cutoff:
                        continue
                except FileNotFoundError:
                    continue
                _unlink(name)
                removed += 1
        return removed

    def close(self) -> None:
        """Unlink every entry this process created (shutdown)."""
        with self._lock:
            names, self._entries = list(self._entries), {}
        for name in names:
            _unlink(name)


def _parse_rfc3339(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_hint(hint_json: Mapping[str, Any], *, node_id: str, now: float | None = None) -> bytes:
    """The staged bytes of a hint, refusing hints of another node or past their lease."""
    if hint_json.get("kind") != "arrow_ipc":
        raise IpcHintError(f"hint kind must be 'arrow_ipc', got {hint_json.get('kind')!r}")
    name = hint_json.get("shm_name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise IpcHintError(f"hint shm_name must match [A-Za-z0-9_]+, got {name!r}")
    hint_node = hint_json.get("node_id")
    if hint_node != node_id:
        raise IpcHintError(f"hint {name} was produced on node {hint_node!r}, this is {node_id!r}")
    lease = hint_json.get("lease_expires_at")
    if not isinstance(lease, str):
        raise IpcHintError(f"hint {name} has no lease_expires_at")
    try:
        expires = _parse_rfc3339(lease)
    except ValueError:
        raise IpcHintError(f"hint {name} lease_expires_at is not RFC 3339: {lease!r}") from None
    current = time.time() if now is None else now
    if expires <= current:
        raise IpcHintError(f"hint {name} lease expired at {lease}")
    length = hint_json.get("byte_length")
    if not isinstance(length, int) or length <= 0:
        raise IpcHintError(f"hint {name} byte_length must be a positive integer, got {length!r}")
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        raise IpcHintError(f"shared-memory segment {name} is gone") from None
    try:
        if os.fstat(fd).st_size < length:
            raise IpcHintError(f"shared-memory segment {name} is shorter than {length} bytes")
        with mmap.mmap(fd, length, access=mmap.ACCESS_READ) as view:
            return bytes(view[:length])
    finally:
        os.close(fd)
