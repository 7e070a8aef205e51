"""The ``result`` object of ``call.done`` and the references it may carry (both servers' shape).

Produce side (:func:`build_call_done_result`): the scrubbed tool result goes inline when its
compact JSON fits the budget; otherwise it is stored durably (``PUT /api/result/{eid}``) and
staged in same-node shared memory, and the event carries a reference instead.

Consume side: :func:`resolve_envelopes` swaps the server's > 8 KiB reference envelopes in a claim
``context`` for their data; :func:`resolve_render_references` fetches a referenced step result
only when a template in the command needs more than its bounded summary.

The Python server accepts only ``status``, ``reference``, ``context`` and ``command_id`` in the
result object, and ``reference`` / ``context`` must be objects: every shape built here obeys.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final, Protocol

import attrs
import trio

from .errors import ControlPlaneError, HTTPStatusError
from .ipc_cache import IpcCache, IpcHint, compact_json, encode_payload
from .scrub import Scrubber, scrub_serialised
from .tools.base import ServerAPI

log = logging.getLogger(__name__)

EXTRACT_BUDGET: Final = 4096
EXTRACT_MAX_DEPTH: Final = 8
EXTRACT_MAX_STRING: Final = 512
EXTRACT_MAX_KEYS: Final = 64
_MARKERS: Final = frozenset({"_len", "_count", "_keys", "_truncated"})
_ALWAYS_IN_SUMMARY: Final = frozenset({"_ref", "_store", "_uri"})
REFERENCE_KINDS: Final = ("result_ref", "temp_ref")


class RawPutServerAPI(Protocol):
    """Optional extension of ``ServerAPI``: PUT an already serialised JSON body.

    A large result is serialised once (in a worker thread) for the budget check; a server
    client offering this method sends those bytes as they are instead of serialising the
    body again on the trio thread (about 1.3 s for 50 MB, see docs/performance.md).
    """

    async def put_json_bytes(self, path: str, body: bytes) -> Any: ...


class ResultMetrics(Protocol):
    """Durable result-store metrics (``noetl_worker_result_store_put_*``)."""

    def put_ok(self, seconds: float, nbytes: int) -> None: ...

    def put_failed(self) -> None: ...


# --- extracted summary ------------------------------------------------------------------


class _Budget:
    def __init__(self, units: int) -> None:
        self.left = units

    def spend(self, units: int) -> None:
        self.left = max(0, self.left - units)


def extract_summary(value: Any, budget: int = EXTRACT_BUDGET) -> Any:
    """The bounded, structure-preserving summary of a result (``extracted``)."""
    return _summarise(value, 0, _Budget(budget))


def _summarise(value: Any, depth: int, budget: _Budget) -> Any:
    if value is None or isinstance(value, bool | int | float):
        budget.spend(len(json.dumps(value)))
        return value
    if isinstance(value, str):
        size = len(value.encode())
        if size > EXTRACT_MAX_STRING:
            return {"_len": size}
        budget.spend(size)
        return value
    if isinstance(value, list | tuple):
        if value and depth < EXTRACT_MAX_DEPTH:
            return [_summarise(value[0], depth + 1, budget)]
        return {"_count": len(value)}
    if isinstance(value, Mapping):
        if depth >= EXTRACT_MAX_DEPTH:
            return {"_count": len(value), "_keys": [str(k) for k in list(value)[:EXTRACT_MAX_KEYS]]}
        out: dict[str, Any] = {}
        for key, item in value.items():
            if budget.left == 0:
                out["_truncated"] = True
                break
            key_text = str(key)
            budget.spend(len(key_text.encode()) + 4)
            out[key_text] = _summarise(item, depth + 1, budget)
        return out
    return _summarise(str(value), depth, budget)


def result_uri(execution_id: int, step: str, cursor: tuple[int, int] = (0, 0)) -> str:
    """The logical locator stamped on a ``result_ref`` ; attempt is always 1."""
    frame, row = cursor
    return f"noetl://default/default/results/{execution_id}/{step}/{frame}/{row}/1"


# --- produce side -----------------------------------------------------------------------


@attrs.define(eq=False)
class _Prepared:
    scrubbed: Any
    size: int  # bytes of the scrubbed result as compact JSON
    # The durable PUT's body, serialised once; dropped after the PUT so the Arrow encoding that
    # follows does not hold it too.
    put_body: bytes | None
    extracted: Any = None


def _envelope(step: str, data: Any) -> dict[str, Any]:
    return {"name": step, "data": data, "scope": "execution", "source_step": step}


def _prepare(
    scrubber: Scrubber, tool_result: Any, inline_max: int, step: str, small: bool = False
) -> _Prepared:
    if small:
        scrubbed = scrubber.scrub(tool_result)
        body = compact_json(scrubbed)
        put_body = _put_body_bytes(step, body) if len(body) > inline_max else None
        size = len(body)
    else:
        # Serialise the PUT body once, and scrub it in the same pass: the tree is scrubbed (and
        # serialised again) only when the bytes show something a rule could act on.
        scrubbed, put_body = scrub_serialised(
            scrubber, tool_result, lambda value: compact_json(_envelope(step, value))
        )
        size = len(put_body) - (len(compact_json(_envelope(step, None))) - len(b"null"))
    extracted = extract_summary(scrubbed) if size > inline_max else None
    return _Prepared(scrubbed, size, put_body, extracted)


_SMALL_NODES: Final = 512
_SMALL_TEXT: Final = 16_384


def _is_small(value: Any) -> bool:
    """True when ``value`` surely has few nodes and little text; gives up early otherwise."""
    nodes = 0
    text = 0
    stack = [value]
    while stack:
        node = stack.pop()
        nodes += 1
        if nodes > _SMALL_NODES:
            return False
        if isinstance(node, str):
            text += len(node)
            if text > _SMALL_TEXT:
                return False
        elif isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return True


def _put_body_bytes(step: str, data_json: bytes) -> bytes:
    """``{"name", "data", "scope", "source_step"}`` around already serialised data."""
    name = json.dumps(step, ensure_ascii=False).encode()
    return b"".join(
        (
            b'{"name":',
            name,
            b',"data":',
            data_json,
            b',"scope":"execution","source_step":',
            name,
            b"}",
        )
    )


async def build_call_done_result(
    tool_result: Any,
    *,
    status: str | None = None,
    execution_id: int,
    step: str,
    server: ServerAPI,
    scrubber: Scrubber,
    inline_max_bytes: int,
    ipc_cache: IpcCache | None,
    cursor: tuple[int, int] = (0, 0),
    metrics: ResultMetrics | None = None,
) -> dict[str, Any]:
    """The ``result`` object of ``call.done`` for a serialized ToolResult.

    | durable PUT | shared memory | result                                                   |
    | ok          | ok / failed   | status, context {data {_ref}}, reference ResultRef(+ipc) |
    | failed      | ok            | status, reference = bare IpcHint (same node only)        |
    | failed      | failed        | status                                                   |
    """
    if status is None:
        status = str(tool_result.get("status", "success")) if isinstance(tool_result, Mapping) else "success"
    if _is_small(tool_result):
        # A thread hop costs more CPU than scrubbing a few hundred values (no-op commands).
        prepared = _prepare(scrubber, tool_result, inline_max_bytes, step, small=True)
    else:
        # Scrubbing and serialising a large result would stall the trio thread.
        prepared = await trio.to_thread.run_sync(_prepare, scrubber, tool_result, inline_max_bytes, step)
    if prepared.size <= inline_max_bytes:
        return {"status": status, "context": prepared.scrubbed}

    reference = await _durable_put(prepared, execution_id, step, server, metrics)
    hint = await _stage(prepared, ipc_cache) if ipc_cache is not None else None
    if reference is not None:
        reference["uri"] = result_uri(execution_id, step, cursor)
        if hint is not None:
            reference["ipc"] = hint.to_json()
        return {
            "status": status,
            "context": {"data": {"_ref": reference["ref"]}},
            "reference": reference,
        }
    if hint is not None:
        log.warning(
            "result of step %s (%d bytes) is only in shared memory %s: readable on this node only",
            step, prepared.size, hint.shm_name,
        )  # fmt: skip
        return {"status": status, "reference": hint.to_json()}
    log.error(
        "result of step %s (%d bytes) exceeds the inline budget of %d bytes and could not be "
        "stored: reporting its status only",
        step, prepared.size, inline_max_bytes,
    )  # fmt: skip
    return {"status": status}


async def _durable_put(
    prepared: _Prepared,
    execution_id: int,
    step: str,
    server: ServerAPI,
    metrics: ResultMetrics | None,
) -> dict[str, Any] | None:
    path = f"/api/result/{execution_id}"
    started = time.perf_counter()
    try:
        put_raw = getattr(server, "put_json_bytes", None)
        if put_raw is not None and prepared.put_body is not None:
            raw, prepared.put_body = prepared.put_body, None
            answer = await put_raw(path, raw)
            del raw
        else:
            prepared.put_body = None
            answer = await server.put_json(path, _envelope(step, prepared.scrubbed))
        if not isinstance(answer, Mapping) or not isinstance(answer.get("ref"), str):
            raise ValueError(f"answer has no 'ref': {str(answer)[:200]}")
    except (ControlPlaneError, ValueError) as exc:
        log.warning("durable result PUT for step %s failed: %s", step, exc)
        if metrics is not None:
            metrics.put_failed()
        return None
    if metrics is not None:
        metrics.put_ok(time.perf_counter() - started, prepared.size)
    stored_bytes = answer.get("bytes")
    reference: dict[str, Any] = {
        "kind": "result_ref",
        "ref": answer["ref"],
        "store": answer.get("store") or "unknown",
        "scope": answer.get("scope") or "execution",
    }
    if answer.get("expires_at"):
        reference["expires_at"] = answer["expires_at"]
    reference["meta"] = {
        "bytes": stored_bytes if isinstance(stored_bytes, int) else prepared.size,
        "sha256": answer.get("sha256"),
        "media_type": "application/json",
        "content_type": "application/json",
    }
    reference["extracted"] = prepared.extracted
    return reference


async def _stage(prepared: _Prepared, cache: IpcCache) -> IpcHint | None:
    def stage() -> IpcHint | None:
        payload = encode_payload(prepared.scrubbed)
        return cache.put(payload)

    try:
        return await trio.to_thread.run_sync(stage)
    except Exception:  # a failed fast path must never fail the command
        log.exception("staging a result in shared memory failed")
        return None


# --- consume side: reference envelopes in a claim context --------------------------------


def is_reference_envelope(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and value.get("kind") in REFERENCE_KINDS
        and isinstance(value.get("ref"), str)
        and value["ref"].startswith("noetl://")
    )


async def _resolve_ref(ref: str, server: ServerAPI) -> Any:
    return await server.get_json("/api/result/resolve", params={"ref": ref})


async def resolve_envelopes(value: Any, server: ServerAPI) -> Any:
    """Replace reference envelopes — the value itself and its top-level fields — by their data.

    The Python server sends any claim ``context`` field over 8 KiB (``tool_config``, ``input``,
    ``render_context``, ``spec``) as ``{"kind": "result_ref", "ref": "noetl://…", …}``. Errors
    (``HTTPStatusError`` — 404 for an unknown ref — or ``TransportError``) propagate: the
    command cannot run without its configuration.
    """
    if is_reference_envelope(value):
        value = await _resolve_ref(value["ref"], server)
    if not isinstance(value, Mapping):
        return value
    out = dict(value)
    for key, item in value.items():
        if is_reference_envelope(item):
            out[key] = await _resolve_ref(item["ref"], server)
    return out


# --- consume side: render-time resolution of step references ---------------------------

_TEMPLATE_RE: Final = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_SEGMENT_RE: Final = re.compile(
    r"\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(-?\d+)\s*\]|\[\s*\"([^\"]*)\"\s*\]"
    r"|\[\s*'([^']*)'\s*\])"
)
Segment = str | int


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def template_accessors(texts: list[str], name: str) -> list[list[Segment]]:
    """Accessor paths of ``name`` used inside ``{{ }}`` / ``{% %}`` of ``texts``.

    ``[]`` is a bare (whole-object) use. A name preceded by ``.`` or an identifier character
    is another thing (``steps.load``, ``reload``) and is ignored.
    """
    pattern = re.compile(r"(?<![A-Za-z0-9_.])" + re.escape(name) + r"(?![A-Za-z0-9_])")
    paths: list[list[Segment]] = []
    for text in texts:
        for expression in _TEMPLATE_RE.findall(text):
            for hit in pattern.finditer(expression):
                path: list[Segment] = []
                position = hit.end()
                while (segment := _SEGMENT_RE.match(expression, position)) is not None:
                    field, index, dquoted, squoted = segment.groups()
                    if index is not None:
                        path.append(int(index))
                    else:
                        path.append(field if field is not None else (dquoted or squoted or ""))
                    position = segment.end()
                paths.append(path)
    return paths


def _needs_bulk(value: Any) -> bool:
    """A whole value taken from the summary is incomplete if it holds arrays or markers."""
    if isinstance(value, list):
        return True
    if isinstance(value, Mapping):
        return bool(_MARKERS & value.keys()) or any(_needs_bulk(v) for v in value.values())
    return False


_MISSING: Final = object()


def summary_satisfies(summary: Any, path: list[Segment]) -> bool:
    """Does the bounded summary answer this accessor path without the full result?"""
    if summary is _MISSING:
        return False
    if path and path[0] in _ALWAYS_IN_SUMMARY:
        return True
    current = summary
    for segment in path:
        if isinstance(current, list):
            if segment != 0 or not current:
                return False
            current = current[0]
        elif isinstance(current, Mapping):
            if "_len" in current or "_count" in current:
                return False  # a long string or an array left out of the summary
            key = str(segment)
            if key not in current:
                return "_truncated" not in current
            current = current[key]
        else:
            return True  # indexing a scalar: the full result cannot do better
    return not _needs_bulk(current)


def _reference_uri(step_result: Any) -> str | None:
    if not isinstance(step_result, Mapping):
        return None
    candidates: list[Any] = [step_result.get("reference")]
    context = step_result.get("context")
    if isinstance(context, Mapping) and isinstance(context.get("result"), Mapping):
        candidates.insert(0, context["result"].get("reference"))
    for reference in candidates:
        if isinstance(reference, Mapping) and isinstance(reference.get("ref"), str):
            return str(reference["ref"])
    return None


def _flat_variable(data: Any, summary: Any) -> Any:
    if not isinstance(data, Mapping):
        return data
    flat = dict(data)
    if "data" not in flat:
        flat["data"] = data
    if isinstance(summary, Mapping):
        for key in _ALWAYS_IN_SUMMARY:
            if key in summary:
                flat[key] = summary[key]
    return flat


def _resolved_step(step_result: Mapping[str, Any], data: Any) -> dict[str, Any]:
    updated = {k: v for k, v in step_result.items() if k != "reference"}
    context = dict(updated.get("context") or {})
    result = {k: v for k, v in (context.get("result") or {}).items() if k != "reference"}
    result["context"] = {"data": data}
    context["result"] = result
    updated["context"] = context
    return updated


async def resolve_render_references(
    command_input: Any, render_context: Mapping[str, Any], server: ServerAPI
) -> dict[str, Any]:
    """A copy of ``render_context`` with referenced step results fetched where needed.

    Only steps whose name a template in ``command_input`` uses, and only when the flat
    ``<step>`` summary cannot answer every accessor, cost a ``GET /api/result/resolve``.
    404 keeps the summary quietly; other failures keep it with a warning.
    """
    out = dict(render_context)
    steps = render_context.get("steps")
    if not isinstance(steps, Mapping):
        return out
    texts = list(_strings(command_input))
    new_steps = dict(steps)
    for name, step_result in steps.items():
        ref = _reference_uri(step_result)
        if ref is None:
            continue
        accessors = template_accessors(texts, str(name))
        summary = render_context.get(name, _MISSING)
        if all(summary_satisfies(summary, path) for path in accessors):
            continue
        try:
            data = await _resolve_ref(ref, server)
        except HTTPStatusError as exc:
            if exc.status != 404:
                log.warning("resolving %s for step %s failed: %s", ref, name, exc)
            continue
        except ControlPlaneError as exc:
            log.warning("resolving %s for step %s failed: %s", ref, name, exc)
            continue
        out[name] = _flat_variable(data, None if summary is _MISSING else summary)
        new_steps[name] = _resolved_step(step_result, data)
    out["steps"] = new_steps
    return out
