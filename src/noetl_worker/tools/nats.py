"""``nats``: key-value, object store and JetStream operations against a NATS server.

Config: ``operation`` (one of ``OPERATIONS``), the connection — ``url`` (``nats://host:port``,
comma-separated for a cluster), ``user`` / ``password`` or ``token``, usually merged in from a
``credential`` alias of type ``nats`` — and the operation's own fields (``bucket``, ``key``,
``name``, ``value``, ``subject``, ``stream``, ...; see docs/tools.md). Without ``url`` the
worker's own ``NATS_URL`` (and its user/password) is used: that is where the NoETL server keeps
its KV result store ``noetl_result_store``.

nats-py is asyncio code. Every call crosses the trio-asyncio bridge that ``service.serve`` opens
at the root, one crossing per operation; connections are the tool's own (never intake's),
pooled per target in ``ToolResources`` and closed at shutdown. A value read back is decoded as
JSON, else text, else base64 with its size; gzip'd values (the server's result store) are
inflated first.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import attrs
import nats
import nats.errors
import nats.js.errors
import trio
import trio_asyncio
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig

from ..errors import ToolConfigError, ToolError, describe
from ..retry import NATS_RECONNECT_WAIT
from . import _fields
from .base import ToolContext, ToolResult

KIND: Final = "nats"
OPERATIONS: Final = (
    "kv_get", "kv_put", "kv_delete", "kv_keys", "kv_purge",
    "object_get", "object_put", "object_delete", "object_list", "object_info",
    "js_publish", "js_get_msg", "js_stream_info", "js_consume",
)  # fmt: skip
DECODINGS: Final = ("auto", "json", "text", "base64")
ACK_POLICIES: Final = ("ack", "nak", "none")
DEFAULT_TIMEOUT: Final = 10.0
MAX_BATCH: Final = 1000
RESULT_STORE_BUCKET: Final = "noetl_result_store"
_GZIP_MAGIC: Final = b"\x1f\x8b"

log = logging.getLogger(__name__)
T = TypeVar("T")


class NatsOperationError(ToolError):
    """A NATS call failed (no server, API error, timeout); the message names the operation."""


# --- the bridge -------------------------------------------------------------------------


async def _aio(what: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """One nats-py coroutine run from trio; its errors become ``NatsOperationError``."""
    try:
        return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)  # type: ignore[no-any-return]
    except trio.Cancelled:
        raise
    except RuntimeError as exc:
        if "loop" not in str(exc).lower():
            raise
        raise ToolError("the nats tool needs the trio-asyncio loop (run it inside the worker)") from exc
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        # nats-py may turn a cancellation into another error (TooManyStalledMsgsError): re-check.
        await trio.lowlevel.checkpoint_if_cancelled()
        raise NatsOperationError(f"nats {what} failed: {describe(exc)}") from exc


# --- connections ------------------------------------------------------------------------


@attrs.frozen
class Target:
    """Where to connect; ``key`` tells pooled connections apart without holding secrets."""

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)

    @property
    def key(self) -> str:
        secret = hashlib.sha256(f"{self.password}\0{self.token}".encode()).hexdigest()[:16]
        return f"{','.join(self.servers)}|{self.user}|{secret}"


def read_target(config: Mapping[str, Any], ctx: ToolContext) -> Target:
    url = config.get("url") or config.get("nats_url") or config.get("servers")
    if url is None:
        own = ctx.settings.nats
        return Target(tuple(own.url.split(",")), own.user, own.password)
    servers = url if isinstance(url, list) else str(url).split(",")
    cleaned = tuple(str(s).strip() for s in servers if str(s).strip())
    if not cleaned or not all(s.startswith(("nats://", "tls://", "ws://", "wss://")) for s in cleaned):
        raise ToolConfigError(
            KIND, "url", f"{url!r} is not accepted: expected nats://host:port (comma-separated for several)"
        )
    # noetl's own worker reads nats_user / nats_password / nats_token: accepted as well.
    user = config.get("user") or config.get("username") or config.get("nats_user")
    password = config.get("password") or config.get("nats_password")
    token = config.get("token") or config.get("nats_token")
    return Target(
        cleaned,
        None if user is None else str(user),
        None if password is None else str(password),
        None if token is None else str(token),
    )


@attrs.define(eq=False)
class NatsPool:
    """The nats tool's connections, one per target; a closed one is replaced on next use."""

    _clients: dict[str, NatsClient] = attrs.field(factory=dict)
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def client(self, target: Target, timeout: float) -> NatsClient:
        async with self._lock:
            nc = self._clients.get(target.key)
            if nc is not None and not nc.is_closed:
                return nc
            nc = await _aio("connect", nats.connect, **_connect_options(target, timeout))
            self._clients[target.key] = nc
            return nc

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        with trio.CancelScope(shield=True):
            for nc in clients:
                try:
                    with trio.move_on_after(5):
                        await _aio("close", nc.close)
                except ToolError as exc:
                    log.warning("closing a nats tool connection failed: %s", exc)


def _connect_options(target: Target, timeout: float) -> dict[str, Any]:
    async def error_cb(exc: Exception) -> None:
        log.warning("nats tool connection error: %s: %s", type(exc).__name__, exc)

    options: dict[str, Any] = {
        "servers": list(target.servers),
        "name": "noetl-worker nats tool",
        "connect_timeout": max(0.5, min(timeout, 5.0)),
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": NATS_RECONNECT_WAIT,
        "error_cb": error_cb,
    }
    if target.user is not None:
        options["user"] = target.user
        options["password"] = target.password or ""
    if target.token is not None:
        options["token"] = target.token
    return options


async def jetstream(ctx: ToolContext, target: Target, timeout: float) -> JetStreamContext:
    pool = await ctx.resources.get_or_create(f"{KIND}.pool", _new_pool, NatsPool.aclose)
    client = await pool.client(target, timeout)
    return client.jetstream(timeout=timeout)


async def _new_pool() -> NatsPool:
    return NatsPool()


# --- values -----------------------------------------------------------------------------


def decode_value(raw: bytes | None, decoding: str = "auto") -> dict[str, Any]:
    """``{value, size, encoding}`` (+ ``compressed``) for bytes read from NATS."""
    if raw is None:
        return {"value": None, "size": 0, "encoding": None}
    out: dict[str, Any] = {"size": len(raw)}
    data = raw
    if decoding in ("auto", "json") and raw[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(raw)
            out["compressed"] = "gzip"
        except (OSError, EOFError, zlib.error):
            data = raw
    if decoding == "base64":
        return {
            **out,
            "value": {"base64": base64.b64encode(raw).decode(), "size": len(raw)},
            "encoding": "base64",
        }
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if decoding == "json":
            raise NatsOperationError(f"value of {len(raw)} bytes is not UTF-8 JSON") from None
        value = {"base64": base64.b64encode(raw).decode(), "size": len(raw)}
        return {**out, "value": value, "encoding": "base64"}
    if decoding in ("auto", "json"):
        try:
            return {**out, "value": json.loads(text), "encoding": "json"}
        except ValueError:
            if decoding == "json":
                raise NatsOperationError(f"value of {len(raw)} bytes is not valid JSON") from None
    return {**out, "value": text, "encoding": "text"}


def _encode_value(config: Mapping[str, Any], field: str = "value") -> bytes:
    b64 = config.get(f"{field}_base64", config.get(f"{field}_b64"))
    if b64 is not None:
        try:
            return base64.b64decode(str(b64), validate=True)
        except binascii.Error as exc:
            raise ToolConfigError(KIND, f"{field}_base64", f"not valid base64: {exc}") from exc
    if field not in config:
        raise ToolConfigError(
            KIND, field, f"required: a string or JSON value (or {field}_base64 for binary data)"
        )
    value = config[field]
    data = value.encode() if isinstance(value, str) else json.dumps(value, separators=(",", ":")).encode()
    if _fields.flag(KIND, config, "gzip", default=False):
        data = gzip.compress(data)
    return data


def _text(config: Mapping[str, Any], name: str, what: str) -> str:
    value = config.get(name)
    if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
        raise ToolConfigError(KIND, name, f"required for {config.get('operation')}: {what}")
    return str(value)


def _headers(config: Mapping[str, Any]) -> dict[str, str] | None:
    value = config.get("headers")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ToolConfigError(KIND, "headers", f"expected an object of header names to values, got {value!r}")
    return {str(k): str(v) for k, v in value.items() if v is not None}


def _decoding(config: Mapping[str, Any]) -> str:
    return _fields.choice(KIND, config, "decode", DECODINGS, "auto") or "auto"


# --- the tool ---------------------------------------------------------------------------


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    cfg = ctx.render(dict(config))
    operation = _fields.choice(KIND, cfg, "operation", OPERATIONS, None)
    if operation is None:
        raise ToolConfigError(KIND, "operation", f"required: one of {', '.join(OPERATIONS)}")
    timeout = _fields.seconds(KIND, cfg, "timeout_seconds", "timeout") or DEFAULT_TIMEOUT
    handler = _HANDLERS[operation]
    target = read_target(cfg, ctx)
    status = "error"
    try:
        with trio.fail_after(timeout):
            js = await jetstream(ctx, target, timeout)
            data = await handler(js, cfg, timeout)
        status = "success"
        # Shaped as noetl's own worker reports it: ``status`` first (``not_found`` for a missing
        # key or object), the operation's fields after.
        found = data.pop("found", True)
        return ToolResult("success", data={"status": "success" if found else "not_found", **data})
    except NatsOperationError as exc:
        return ToolResult("error", error=str(exc), data={"status": "error", "error": str(exc)})
    except trio.TooSlowError:
        message = f"nats {operation} did not complete within {timeout:g} s"
        status = "timeout"
        return ToolResult("timeout", error=message, data={"status": "error", "error": message})
    finally:
        metrics = ctx.resources.metrics
        if metrics is not None:
            metrics.tool_operation(KIND, operation, status)


Handler = Callable[[JetStreamContext, Mapping[str, Any], float], Awaitable[dict[str, Any]]]


async def _kv(js: JetStreamContext, config: Mapping[str, Any], create: bool = False) -> tuple[Any, bool]:
    bucket = _text(config, "bucket", "the key-value bucket name")
    try:
        return await _aio(f"kv bucket {bucket}", js.key_value, bucket), False
    except NatsOperationError as exc:
        if not (create and isinstance(exc.__cause__, nats.js.errors.BucketNotFoundError)):
            raise
    kv_config = KeyValueConfig(bucket=bucket, history=int(config.get("history") or 1))
    if config.get("ttl") is not None:
        kv_config.ttl = _fields.seconds(KIND, config, "ttl")
    return await _aio(f"create kv bucket {bucket}", js.create_key_value, config=kv_config), True


async def _kv_get(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    kv, _ = await _kv(js, config)
    key = _text(config, "key", "the key to read")
    base = {"bucket": str(config["bucket"]), "key": key}
    try:
        entry = await _aio(f"kv_get {key}", kv.get, key)
    except NatsOperationError as exc:
        if isinstance(exc.__cause__, nats.js.errors.KeyNotFoundError):
            return {**base, "found": False, "value": None}
        raise
    created = entry.created
    decoded = decode_value(entry.value, _decoding(config))
    out = {
        **base,
        "found": True,
        "value": decoded["value"],
        "revision": entry.revision,
        "created": created.isoformat() if hasattr(created, "isoformat") else created,
    }
    if "compressed" in decoded:
        out["compressed"] = decoded["compressed"]
    return out


async def _kv_put(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    create = _fields.flag(KIND, config, "create_bucket", "create", default=False)
    kv, _ = await _kv(js, config, create=create)
    key = _text(config, "key", "the key to write")
    value = _encode_value(config)
    revision = await _aio(f"kv_put {key}", kv.put, key, value)
    return {
        "bucket": str(config["bucket"]),
        "key": key,
        "revision": revision,
    }


async def _kv_delete(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    kv, _ = await _kv(js, config)
    key = _text(config, "key", "the key to delete")
    await _aio(f"kv_delete {key}", kv.delete, key)
    return {"bucket": str(config["bucket"]), "key": key, "deleted": True}


async def _kv_purge(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    kv, _ = await _kv(js, config)
    key = _text(config, "key", "the key whose history to purge")
    await _aio(f"kv_purge {key}", kv.purge, key)
    return {"bucket": str(config["bucket"]), "key": key, "purged": True}


async def _kv_keys(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    kv, _ = await _kv(js, config)
    pattern = config.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise ToolConfigError(KIND, "pattern", f"expected a glob pattern (e.g. 'user.*'), got {pattern!r}")
    filters = config.get("filter") or config.get("filters")
    if filters is not None and not isinstance(filters, str | list):
        raise ToolConfigError(KIND, "filter", f"expected a subject filter or a list of them, got {filters!r}")
    kwargs = {"filters": [filters] if isinstance(filters, str) else filters} if filters else {}
    try:
        keys = await _aio("kv_keys", kv.keys, **kwargs)
    except NatsOperationError as exc:
        if not isinstance(exc.__cause__, nats.js.errors.NoKeysError):
            raise
        keys = []
    if pattern is not None:
        keys = [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
    return {"bucket": str(config["bucket"]), "keys": sorted(keys), "count": len(keys)}


async def _obs(js: JetStreamContext, config: Mapping[str, Any], create: bool = False) -> tuple[Any, bool]:
    bucket = _text(config, "bucket", "the object store bucket name")
    try:
        return await _aio(f"object store {bucket}", js.object_store, bucket), False
    except NatsOperationError as exc:
        if not (create and isinstance(exc.__cause__, nats.js.errors.NotFoundError)):
            raise
    # nats-py overwrites config.bucket with its ``bucket`` argument: pass the name itself.
    return await _aio(f"create object store {bucket}", js.create_object_store, bucket=bucket), True


def _object_name(config: Mapping[str, Any]) -> str:
    key = "name" if config.get("name") is not None else "key"
    return _text(config, key, "the object name (name or key)")


def _info_json(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "size": info.size,
        "chunks": info.chunks,
        "digest": info.digest,
        "mtime": info.mtime,
        "deleted": bool(info.deleted),
    }


async def _object_get(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    store, _ = await _obs(js, config)
    name = _object_name(config)
    try:
        result = await _aio(f"object_get {name}", store.get, name)
    except NatsOperationError as exc:
        if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
            return {"bucket": str(config["bucket"]), "name": name, "found": False, "value": None, "size": 0}
        raise
    decoded = decode_value(result.data, _decoding(config))
    # ``data`` is noetl's own worker's name for the object's content.
    return {
        "bucket": str(config["bucket"]),
        "name": name,
        "found": True,
        **decoded,
        "data": decoded["value"],
        "info": _info_json(result.info),
    }


async def _object_put(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    create = _fields.flag(KIND, config, "create_bucket", "create", default=False)
    store, _ = await _obs(js, config, create=create)
    name = _object_name(config)
    field = "value" if "value" in config or "value_base64" in config else "data"
    info = await _aio(f"object_put {name}", store.put, name, _encode_value(config, field))
    return {"bucket": str(config["bucket"]), **_info_json(info)}


async def _object_delete(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    store, _ = await _obs(js, config)
    name = _object_name(config)
    await _aio(f"object_delete {name}", store.delete, name)
    return {"bucket": str(config["bucket"]), "name": name, "deleted": True}


async def _object_list(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    store, _ = await _obs(js, config)
    try:
        infos = await _aio("object_list", store.list, ignore_deletes=True)
    except NatsOperationError as exc:
        if not isinstance(exc.__cause__, nats.js.errors.NotFoundError):
            raise
        infos = []
    objects = sorted((_info_json(i) for i in infos), key=lambda o: str(o["name"]))
    return {"bucket": str(config["bucket"]), "objects": objects, "count": len(objects)}


async def _object_info(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    store, _ = await _obs(js, config)
    name = _object_name(config)
    try:
        info = await _aio(f"object_info {name}", store.get_info, name)
    except NatsOperationError as exc:
        if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
            return {"bucket": str(config["bucket"]), "name": name, "found": False}
        raise
    return {"bucket": str(config["bucket"]), "found": True, **_info_json(info)}


async def _js_publish(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    subject = _text(config, "subject", "the subject to publish to")
    headers = _headers(config) or {}
    msg_id = config.get("msg_id", config.get("message_id"))
    if msg_id is not None:
        # JetStream drops a second message with the same id inside the stream's duplicate window.
        headers["Nats-Msg-Id"] = str(msg_id)
    stream = config.get("stream")
    payload = _encode_value(
        config, "payload" if "payload" in config or "payload_base64" in config else "data"
    )
    ack = await _aio(
        f"js_publish {subject}",
        js.publish,
        subject,
        payload,
        timeout=timeout,
        stream=None if stream is None else str(stream),
        headers=headers or None,
    )
    return {"subject": subject, "stream": ack.stream, "seq": ack.seq, "duplicate": bool(ack.duplicate)}


async def _js_get_msg(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    stream = _text(config, "stream", "the stream name")
    seq = config.get("seq", config.get("sequence"))
    subject = config.get("subject")
    if seq is None and subject is None:
        raise ToolConfigError(
            KIND, "seq", "required for js_get_msg: a sequence number, or 'subject' for the last message on it"
        )
    if seq is not None and (isinstance(seq, bool) or not str(seq).isdigit()):
        raise ToolConfigError(KIND, "seq", f"{seq!r} is not accepted: expected a positive integer")
    if seq is not None:
        msg = await _aio(f"js_get_msg {stream}#{seq}", js.get_msg, stream, seq=int(seq))
    else:
        msg = await _aio(f"js_get_msg {stream} {subject}", js.get_last_msg, stream, str(subject))
    return {
        "stream": stream,
        "seq": msg.seq,
        "subject": msg.subject,
        "headers": dict(msg.headers or {}),
        "time": msg.time.isoformat() if msg.time else None,
        **decode_value(msg.data, _decoding(config)),
    }


async def _js_stream_info(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    stream = _text(config, "stream", "the stream name")
    info = await _aio(f"js_stream_info {stream}", js.stream_info, stream)
    state = info.state
    return {
        "stream": info.config.name,
        "subjects": list(info.config.subjects or []),
        "messages": state.messages,
        "bytes": state.bytes,
        "first_seq": state.first_seq,
        "last_seq": state.last_seq,
        "consumer_count": state.consumer_count,
    }


async def _js_consume(js: JetStreamContext, config: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    subject = _text(config, "subject", "the subject (filter) to consume")
    batch = config.get("batch", config.get("batch_size", 10))
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise ToolConfigError(KIND, "batch", f"{batch!r} is not accepted: expected an integer 1..{MAX_BATCH}")
    wait = _fields.seconds(KIND, config, "wait_seconds", "fetch_timeout") or min(2.0, timeout / 2)
    ack_policy = _fields.choice(KIND, config, "ack", ACK_POLICIES, "ack") or "ack"
    durable = config.get("durable", config.get("consumer"))
    stream = config.get("stream")
    consumer_config = None
    if durable is None:
        consumer_config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60.0
        )
    sub = await _aio(
        f"js_consume {subject}",
        js.pull_subscribe,
        subject,
        durable=None if durable is None else str(durable),
        stream=None if stream is None else str(stream),
        config=consumer_config,
    )
    try:
        try:
            msgs = await _aio(f"js_consume {subject}", sub.fetch, batch, timeout=wait)
        except NatsOperationError as exc:
            if not isinstance(exc.__cause__, TimeoutError):
                raise
            msgs = []
        messages = []
        for msg in msgs:
            meta = msg.metadata
            messages.append(
                {
                    "subject": msg.subject,
                    "seq": meta.sequence.stream,
                    "num_delivered": meta.num_delivered,
                    "headers": dict(msg.headers or {}),
                    **decode_value(msg.data, _decoding(config)),
                }
            )
            if ack_policy == "ack":
                await _aio("ack", msg.ack)
            elif ack_policy == "nak":
                await _aio("nak", msg.nak)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await _aio("unsubscribe", sub.unsubscribe)
            except ToolError:
                pass
    return {"subject": subject, "messages": messages, "count": len(messages), "ack": ack_policy}


_HANDLERS: Final[dict[str, Handler]] = {
    "kv_get": _kv_get,
    "kv_put": _kv_put,
    "kv_delete": _kv_delete,
    "kv_keys": _kv_keys,
    "kv_purge": _kv_purge,
    "object_get": _object_get,
    "object_put": _object_put,
    "object_delete": _object_delete,
    "object_list": _object_list,
    "object_info": _object_info,
    "js_publish": _js_publish,
    "js_get_msg": _js_get_msg,
    "js_stream_info": _js_stream_info,
    "js_consume": _js_consume,
}


async def read_result_store(ctx: ToolContext, key: str, bucket: str = RESULT_STORE_BUCKET) -> Any:
    """A value of the server's KV result store (gzip'd JSON), for ``result_fetch``."""
    target = read_target({}, ctx)
    with trio.fail_after(DEFAULT_TIMEOUT):
        js = await jetstream(ctx, target, DEFAULT_TIMEOUT)
        data = await _kv_get(js, {"operation": "kv_get", "bucket": bucket, "key": key}, DEFAULT_TIMEOUT)
    if not data["found"]:
        raise NatsOperationError(f"nats kv {bucket}: no entry for key {key!r}")
    return data["value"]
