"""``result_fetch``: read a stored step result back by its reference.

Config: ``ref`` | ``result_ref`` — a ``noetl://…`` URI, a reference object
(``{kind: result_ref, ref, store, ipc?}``, as ``call.done`` carries it, or the server's
``{kind: result_ref|temp_ref, ref, store}`` envelope), a ``call.done`` result holding one
(``{reference: …}`` or ``{context: {data: {_ref}}}``), or a bare shared-memory hint
(``{kind: arrow_ipc, shm_name, …}``); ``prefer`` (``http``, the only transport here: Arrow
Flight is out of scope and refused as a configuration error).

Where the bytes come from, first that works:
1. a same-node shared-memory hint (``ipc``) whose lease is still valid — no network at all;
2. for ``store: kv`` references, the server's NATS KV bucket ``noetl_result_store`` (key: the
   URI without ``noetl://``, ``/`` → ``_``; gzip'd JSON);
3. ``GET /api/result/resolve?ref=`` on the command's server.

Result data: ``{ref, source: shm|kv|http, data}``; an Arrow IPC payload is decoded with pyarrow
into ``{columns, rows, row_count}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Final

import attrs
import trio

from ..errors import ControlPlaneError, HTTPStatusError, ToolConfigError, ToolError
from ..ipc_cache import ARROW_MEDIA_TYPE, IpcHintError, read_hint
from .base import ToolContext, ToolResult

KIND: Final = "result_fetch"
TRANSPORTS: Final = ("http",)
log = logging.getLogger(__name__)


@attrs.frozen
class Reference:
    uri: str | None
    store: str | None = None
    hint: Mapping[str, Any] | None = None


def parse_reference(kind: str, field: str, value: Any) -> Reference:
    """The reference a config names, in any of the shapes the module docstring lists."""
    if isinstance(value, str):
        if not value.startswith("noetl://"):
            raise ToolConfigError(kind, field, f"{value!r} is not accepted: expected a noetl:// URI")
        return Reference(value)
    if not isinstance(value, Mapping):
        raise ToolConfigError(kind, field, f"expected a noetl:// URI or a reference object, got {value!r}")
    if value.get("kind") == "arrow_ipc":
        return Reference(None, hint=value)
    if isinstance(value.get("reference"), Mapping):
        return parse_reference(kind, field, value["reference"])
    data = value.get("context", {}).get("data") if isinstance(value.get("context"), Mapping) else None
    if isinstance(data, Mapping) and isinstance(data.get("_ref"), str):
        return parse_reference(kind, field, data["_ref"])
    if isinstance(value.get("_ref"), str):
        return parse_reference(kind, field, value["_ref"])
    uri = value.get("ref")
    if not isinstance(uri, str) or not uri.startswith("noetl://"):
        raise ToolConfigError(kind, field, f"the reference object has no noetl:// 'ref': {value!r}")
    hint = value.get("ipc") if isinstance(value.get("ipc"), Mapping) else None
    store = value.get("store")
    return Reference(uri, None if store is None else str(store), hint)


def check_transport(kind: str, config: Mapping[str, Any]) -> None:
    prefer = config.get("prefer")
    if config.get("flight_endpoint") is not None or (isinstance(prefer, str) and prefer.lower() == "flight"):
        field = "prefer" if prefer is not None else "flight_endpoint"
        raise ToolConfigError(
            kind,
            field,
            "Arrow Flight is out of scope for this worker: accepted prefer: http "
            "(results are read from shared memory, NATS KV or GET /api/result/resolve)",
        )
    if prefer is not None and (not isinstance(prefer, str) or prefer.lower() not in TRANSPORTS):
        raise ToolConfigError(kind, "prefer", f"{prefer!r} is not accepted: expected http")


def kv_key(uri: str) -> str:
    """The server's NATS KV key for a result URI."""
    return uri.removeprefix("noetl://").replace("/", "_").replace(":", ".")


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    cfg = ctx.render(dict(config))
    check_transport(KIND, cfg)
    field = "ref" if cfg.get("ref") is not None else "result_ref"
    if cfg.get(field) is None:
        raise ToolConfigError(KIND, "ref", "required: a noetl:// URI or a reference object")
    return await fetch(KIND, parse_reference(KIND, field, cfg[field]), ctx)


async def fetch(kind: str, reference: Reference, ctx: ToolContext) -> ToolResult:
    status = "error"
    try:
        source, data = await _read(reference, ctx)
        status = "success"
        return ToolResult("success", data={"ref": reference.uri, "source": source, "data": data})
    except (ControlPlaneError, ToolError) as exc:
        detail = str(exc)
        if isinstance(exc, HTTPStatusError) and exc.status == 404:
            detail = f"no stored result for {reference.uri} (HTTP 404: expired or never stored)"
        return ToolResult("error", error=f"{kind}: {detail}", data={"ref": reference.uri, "error": detail})
    finally:
        if ctx.resources.metrics is not None:
            ctx.resources.metrics.tool_operation(kind, "get", status)


async def _read(reference: Reference, ctx: ToolContext) -> tuple[str, Any]:
    if reference.hint is not None:
        try:
            raw = await trio.to_thread.run_sync(
                lambda: read_hint(reference.hint or {}, node_id=ctx.settings.ipc_node_id)
            )
            media_type = str(reference.hint.get("media_type") or ARROW_MEDIA_TYPE)
            return "shm", await trio.to_thread.run_sync(decode_payload, raw, media_type)
        except IpcHintError as exc:
            if reference.uri is None:
                raise ToolError(f"shared-memory hint not usable here and no durable ref: {exc}") from exc
            log.info("shared-memory hint not usable (%s); reading %s durably", exc, reference.uri)
    assert reference.uri is not None
    if reference.store == "kv":
        from . import nats as nats_tool

        try:
            return "kv", await nats_tool.read_result_store(ctx, kv_key(reference.uri))
        except (ToolError, trio.TooSlowError) as exc:
            log.info("NATS KV read of %s failed (%s); asking the server", reference.uri, exc)
    return "http", await ctx.server.get_json("/api/result/resolve", params={"ref": reference.uri})


def decode_payload(raw: bytes, media_type: str) -> Any:
    """Staged bytes as JSON-ready data: Arrow IPC stream → ``{columns, rows, row_count}``."""
    if media_type.startswith(ARROW_MEDIA_TYPE):
        import pyarrow as pa

        table = pa.ipc.open_stream(pa.py_buffer(raw)).read_all()
        rows = table.to_pylist()
        from ._jsonsafe import json_safe

        return {"columns": list(table.column_names), "rows": json_safe(rows), "row_count": len(rows)}
    return json.loads(raw)
