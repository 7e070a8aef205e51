"""Registry, result store, credentials, keychain, variables and execution routes."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import attrs

from ._asgi import BadRequest, Request, Response, Router
from ._common import error, iso, json_object, optional, path_int, require_str, truthy
from ._state import ExecutionRow, PoolRow, StubState

_SCOPES = ("step", "execution", "workflow", "permanent")
_STORES = ("memory", "kv", "object", "s3", "gcs", "db", "disk", "eventlog")
_TTL = re.compile(r"^(\d+)([smhd])$")
_TTL_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl_seconds(ttl: Any) -> float | None:
    if ttl is None:
        return 7200.0
    if ttl == "forever":
        return None
    m = _TTL.match(str(ttl))
    if m is None:
        raise BadRequest(f"field 'ttl'={ttl!r} must look like 30m, 1h, 2d or be 'forever'")
    return int(m.group(1)) * _TTL_UNIT[m.group(2)]


def _pool_json(row: PoolRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "runtime": row.runtime,
        "status": row.status,
        "capacity": row.capacity,
        "labels": row.labels,
        "heartbeat": iso(row.heartbeat_at),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


@attrs.define
class MiscRoutes:
    state: StubState

    def install(self, router: Router) -> None:
        add = router.add
        add("GET", "/health", self.health)
        add("GET", "/api/health", self.api_health)
        add("POST", "/api/worker/pool/register", self.register)
        add("POST", "/api/worker/pool/heartbeat", self.heartbeat)
        add("POST", "/api/worker/pool/deregister", self.deregister)
        add("DELETE", "/api/worker/pool/deregister", self.deregister)
        add("GET", "/api/worker/pools", self.list_pools)
        add("GET", "/api/result/resolve", self.resolve_result)
        add("PUT", "/api/result/{execution_id}", self.put_result)
        add("GET", "/api/result/{execution_id}/{step}", self.get_step_result)
        add("GET", "/api/credentials/{alias}", self.get_credential)
        add("GET", "/api/credentials/{alias}/sealed", self.get_sealed_credential)
        add("GET", "/api/keychain/{catalog_id}/{keychain_name}", self.get_keychain)
        add("POST", "/api/keychain/{catalog_id}/{keychain_name}", self.put_keychain)
        add("DELETE", "/api/keychain/{catalog_id}/{keychain_name}", self.delete_keychain)
        add("POST", "/api/vars/{execution_id}", self.set_vars)
        add("GET", "/api/vars/{execution_id}", self.get_vars)
        add("POST", "/api/catalog/resource", self.catalog_resource)
        add("POST", "/api/execute", self.execute)
        add("GET", "/api/executions/{execution_id}/status", self.execution_status)
        add("POST", "/api/executions/{execution_id}/cancel", self.cancel_execution)

    # ---------------------------------------------------------------- health

    async def health(self, request: Request) -> Response:
        return Response(200, {"status": "ok"})

    async def api_health(self, request: Request) -> Response:
        """Python 4.12.1: ``{"status": "ok"}`` only; Rust: database/nats/uptime/version too
        (what the worker's dialect probe tells them apart by)."""
        if self.state.flavor == "python":
            return Response(200, {"status": "ok"})
        uptime = int(time.monotonic() - self.state.started_at)
        return Response(
            200,
            {
                "status": "ok",
                "database": "connected",
                "nats": "removed",
                "uptime_seconds": uptime,
                "version": "3.83.1",
            },
        )

    # ---------------------------------------------------------------- worker pool registry

    async def register(self, request: Request) -> Response:
        state = self.state
        body = json_object(request)
        name = require_str(body, "name")
        kind = str(optional(body, "kind", "component_type", default="worker_pool"))
        uri = optional(body, "uri", "base_url")
        if kind in ("server_api", "broker") and not uri:
            return error(state, 400, f"uri is required for kind {kind!r}")
        capacity = body.get("capacity")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
            raise BadRequest(f"field 'capacity'={capacity!r} must be an integer >= 0")
        runtime = optional(body, "runtime", default={})
        if not isinstance(runtime, dict):
            raise BadRequest("field 'runtime' must be an object")
        now_wall = time.time()
        previous = state.pools.get(name)
        row = PoolRow(
            runtime_id=previous.runtime_id if previous else state.next_id(),
            name=name,
            kind=kind,
            runtime=runtime,
            status=str(optional(body, "status", default="ready")).lower(),
            uri=uri,
            capacity=capacity,
            labels=dict(optional(body, "labels", default={})),
            hostname=body.get("hostname"),
            pid=body.get("pid"),
            meta=dict(optional(body, "meta", default={})),
            created_at=previous.created_at if previous else now_wall,
            updated_at=now_wall,
            heartbeat_at=now_wall,
            seen_at=time.monotonic(),
        )
        state.pools[name] = row
        state.registrations.append(body)
        state._changed()
        return Response(
            200,
            {
                "status": "ok",
                "name": name,
                "runtime_id": str(row.runtime_id),
                "kind": kind,
                "runtime": runtime,
            },
        )

    async def heartbeat(self, request: Request) -> Response:
        state = self.state
        body = json_object(request)
        name = optional(body, "name")
        row = state.pools.get(str(name)) if name is not None else None
        if row is None:
            registration = body.get("registration")
            if (
                state.auto_recreate_runtime
                and isinstance(registration, dict)
                and registration.get("name")
                and registration.get("runtime") is not None
            ):
                await self.register(attrs.evolve(request, body=json.dumps(registration).encode()))
                state.heartbeats.setdefault(str(registration["name"]), []).append(time.monotonic())
                recreated = state.pools[str(registration["name"])]
                return Response(
                    200,
                    {
                        "status": "recreated",
                        "name": recreated.name,
                        "runtime_id": str(recreated.runtime_id),
                    },
                )
            return (
                error(
                    state,
                    404,
                    f"runtime {name!r} is unknown",
                    retry_after=state.heartbeat_retry_after,
                )
                if state.flavor == "rust"
                else Response(
                    404,
                    {"detail": {"status": "unknown", "name": name}},
                    {"retry-after": str(state.heartbeat_retry_after)},
                )
            )
        row.status = "ready"
        row.heartbeat_at = row.updated_at = time.time()
        row.seen_at = time.monotonic()
        state.heartbeats.setdefault(row.name, []).append(row.seen_at)
        state._changed()
        return Response(200, {"status": "ok", "name": row.name, "runtime_id": str(row.runtime_id)})

    async def deregister(self, request: Request) -> Response:
        state = self.state
        body = json_object(request)
        name = require_str(body, "name")
        kind = str(optional(body, "kind", "component_type", default="worker_pool"))
        row = state.pools.get(name)
        if row is not None:
            row.status = "offline"
            row.updated_at = time.time()
        state.deregistrations.append(name)
        state._changed()
        return Response(200, {"status": "ok", "name": name, "kind": kind})

    async def list_pools(self, request: Request) -> Response:
        runtime = request.query.get("runtime")
        status = request.query.get("status")
        items = [
            _pool_json(row)
            for row in self.state.pools.values()
            if (status is None or row.status == status)
            and (runtime is None or row.runtime.get("kind") == runtime)
        ]
        return Response(200, {"items": items, "count": len(items), "runtime": runtime, "status": status})

    # ---------------------------------------------------------------- result store

    async def put_result(self, request: Request) -> Response:
        state = self.state
        execution_id = request.params["execution_id"]
        body = json_object(request)
        name = require_str(body, "name")
        if "data" not in body:
            raise BadRequest("field 'data' is required")
        scope = str(optional(body, "scope", default="execution"))
        if scope not in _SCOPES:
            return error(state, 400, f"Invalid scope {scope!r}; expected one of {list(_SCOPES)}")
        store = str(optional(body, "store", default="memory"))
        if store not in _STORES:
            return error(state, 400, f"Invalid store {store!r}; expected one of {list(_STORES)}")
        ttl = _ttl_seconds(body.get("ttl"))
        stored = state.store_result(
            execution_id=execution_id,
            name=name,
            data=body["data"],
            store=store,
            scope=scope,
            expires_at=None if ttl is None else iso(time.time() + ttl),
            source_step=body.get("source_step"),
            correlation=body.get("correlation"),
            extracted=body.get("extracted"),
        )
        return Response(
            200,
            {
                "ref": stored.ref,
                "store": stored.store,
                "scope": stored.scope,
                "expires_at": stored.expires_at,
                "bytes": stored.bytes,
                "sha256": stored.sha256,
            },
        )

    async def resolve_result(self, request: Request) -> Response:
        ref = request.query.get("ref")
        if not ref:
            raise BadRequest("query parameter 'ref' is required")
        stored = self.state.results.get(ref)
        if stored is None:
            return error(self.state, 404, f"Result not found: {ref}")
        return Response(200, stored.data)

    async def get_step_result(self, request: Request) -> Response:
        execution_id, step = request.params["execution_id"], request.params["step"]
        matches = [
            r
            for r in self.state.results.values()
            if r.execution_id == execution_id and step in (r.name, r.source_step)
        ]
        if not matches:
            return error(self.state, 404, f"No result for step {step!r} in {execution_id}")
        stored = matches[-1]
        if request.query.get("resolve", "true").lower() != "false":
            return Response(200, stored.data)
        preview = json.dumps(stored.data, separators=(",", ":"))[:256]
        return Response(
            200,
            {
                "ref": stored.ref,
                "store": stored.store,
                "scope": stored.scope,
                "name": stored.name,
                "expires_at": stored.expires_at,
                "bytes": stored.bytes,
                "sha256": stored.sha256,
                "preview": preview,
                "extracted": stored.extracted,
                "correlation": stored.correlation,
            },
        )

    # ---------------------------------------------------------------- credentials

    async def get_credential(self, request: Request) -> Response:
        alias = request.params["alias"]
        record = self.state.find_credential(alias)
        if record is None:
            return error(self.state, 404, f"Credential '{alias}' not found")
        body = dict(record)
        if not truthy(request.query.get("include_data")):
            body.pop("data")
        return Response(200, body)

    async def get_sealed_credential(self, request: Request) -> Response:
        state = self.state
        alias = request.params["alias"]
        if state.sealer is None:
            return error(state, 501, "sealed credential delivery is not enabled on this server")
        record = state.find_credential(alias)
        if record is None:
            return error(state, 404, f"Credential '{alias}' not found")
        worker_id = request.query.get("worker_id", "")
        pool = state.pools.get(worker_id)
        public_key = pool.runtime.get("worker_public_key") if pool is not None else None
        if not public_key:
            return error(state, 404, f"worker {worker_id!r} has no registered public key")
        plaintext = json.dumps(record, separators=(",", ":")).encode()
        return Response(200, state.sealer(str(public_key), plaintext))

    # ---------------------------------------------------------------- keychain

    def _cache_key(self, request: Request, body: dict[str, Any] | None) -> tuple[str, str, str]:
        catalog_id = str(path_int(request, "catalog_id"))
        name = request.params["keychain_name"]
        source: dict[str, Any] = dict(request.query)
        if body:
            source.update({k: v for k, v in body.items() if v is not None})
        execution_id = source.get("execution_id")
        default_scope = "global" if body is not None or execution_id is None else "local"
        scope = str(source.get("scope_type") or default_scope)
        if scope == "local":
            key = f"{name}:{catalog_id}:{execution_id}"
        elif scope == "shared":
            key = f"{name}:{catalog_id}:shared:{execution_id}"
        elif scope == "global":
            key = f"{name}:{catalog_id}:global"
        else:
            raise BadRequest(f"scope_type={scope!r} must be one of local, shared, global")
        return catalog_id, key, scope

    async def get_keychain(self, request: Request) -> Response:
        catalog_id, key, scope = self._cache_key(request, None)
        name = request.params["keychain_name"]
        entry = self.state.keychain.get(key)
        if entry is None:
            return Response(
                200,
                {
                    "status": "not_found",
                    "keychain_name": name,
                    "catalog_id": catalog_id,
                    "cache_key": key,
                    "scope_type": scope,
                    "token_data": None,
                },
            )
        now = time.time()
        expired = entry["expires_at_ts"] is not None and now >= entry["expires_at_ts"]
        entry["access_count"] += 1
        entry["accessed_at"] = iso(now)
        ttl_left = None if entry["expires_at_ts"] is None else max(0, int(entry["expires_at_ts"] - now))
        body = {k: v for k, v in entry.items() if k != "expires_at_ts"}
        body.update(status="expired" if expired else "success", expired=expired, ttl_seconds=ttl_left)
        return Response(200, body)

    async def put_keychain(self, request: Request) -> Response:
        body = json_object(request)
        catalog_id, key, scope = self._cache_key(request, body)
        name = request.params["keychain_name"]
        if "token_data" not in body:
            raise BadRequest("field 'token_data' is required")
        ttl = body.get("ttl_seconds")
        if ttl is None:
            ttl = 3600 if scope == "local" else 86400
        expires_ts = time.time() + float(ttl)
        auto_renew = bool(body.get("auto_renew", False))
        self.state.keychain[key] = {
            "keychain_name": name,
            "catalog_id": catalog_id,
            "cache_key": key,
            "token_data": body["token_data"],
            "credential_type": body.get("credential_type"),
            "cache_type": body.get("cache_type", "token"),
            "scope_type": scope,
            "expires_at": iso(expires_ts),
            "expires_at_ts": expires_ts,
            "accessed_at": None,
            "access_count": 0,
            "auto_renew": auto_renew,
            "renew_config": body.get("renew_config"),
        }
        self.state._changed()
        return Response(
            200,
            {
                "status": "success",
                "message": f"Keychain entry {name!r} stored",
                "keychain_name": name,
                "catalog_id": catalog_id,
                "cache_key": key,
                "expires_at": iso(expires_ts),
                "ttl_seconds": int(ttl),
                "auto_renew": auto_renew,
            },
        )

    async def delete_keychain(self, request: Request) -> Response:
        catalog_id, key, _ = self._cache_key(request, None)
        name = request.params["keychain_name"]
        found = self.state.keychain.pop(key, None) is not None
        return Response(
            200,
            {
                "status": "success" if found else "not_found",
                "message": f"Keychain entry {name!r} " + ("deleted" if found else "not found"),
                "keychain_name": name,
                "catalog_id": catalog_id,
                "cache_key": key,
            },
        )

    # ---------------------------------------------------------------- variables

    async def set_vars(self, request: Request) -> Response:
        execution_id = request.params["execution_id"]
        body = json_object(request)
        # The Rust worker posts {"<name>": value}; the Python API wraps them in "variables".
        values = body["variables"] if isinstance(body.get("variables"), dict) else body
        source_step = body.get("source_step") if values is not body else None
        store = self.state.variables.setdefault(execution_id, {})
        for name, value in values.items():
            store[name] = {
                "value": value,
                "type": "user_defined",
                "source_step": source_step,
                "updated_at": iso(time.time()),
            }
        self.state._changed()
        return Response(200, {"status": "ok", "execution_id": execution_id, "count": len(values)})

    async def get_vars(self, request: Request) -> Response:
        execution_id = request.params["execution_id"]
        variables = self.state.variables.get(execution_id, {})
        return Response(200, {"execution_id": execution_id, "variables": variables, "count": len(variables)})

    # ---------------------------------------------------------------- catalog

    async def catalog_resource(self, request: Request) -> Response:
        """One catalog entry by ``catalog_id``, or by ``path`` and ``version`` (default latest)."""
        body = json_object(request)
        entries = list(self.state.catalog.values())
        if body.get("catalog_id") is not None:
            found = [e for e in entries if e["catalog_id"] == str(body["catalog_id"])]
        elif body.get("path"):
            found = [e for e in entries if e["path"] == body["path"]]
            version = body.get("version")
            if version not in (None, "", "latest"):
                found = [e for e in found if str(e["version"]) == str(version)]
            found.sort(key=lambda e: e["version"])
        else:
            raise BadRequest("one of 'catalog_id' or 'path' is required")
        if not found:
            return Response(404, {"detail": "Catalog entry not found"})
        return Response(200, found[-1])

    # ---------------------------------------------------------------- executions

    async def execute(self, request: Request) -> Response:
        state = self.state
        body = json_object(request)
        path = body.get("path")
        catalog_id = body.get("catalog_id")
        if not path and catalog_id is None:
            raise BadRequest("one of 'path' or 'catalog_id' is required")
        parent = body.get("parent_execution_id")
        row = ExecutionRow(
            execution_id=state.next_id(),
            path=path,
            catalog_id=None if catalog_id is None else str(catalog_id),
            version=body.get("version"),
            payload=optional(body, "payload", "workload", default={}),
            parent_execution_id=None if parent is None else str(parent),
        )
        state.executions[row.execution_id] = row
        for event_type in ("playbook.initialized", "workflow.initialized"):
            state._record_event(
                execution_id=str(row.execution_id),
                event_type=event_type,
                step=path or "workflow",
                payload={"payload": row.payload},
                meta={},
                worker_id=None,
                actionable=False,
                informative=True,
                via="server",
            )
        if state.on_execute is not None:
            state.on_execute(row)
        state._changed()
        return Response(
            200,
            {"execution_id": str(row.execution_id), "status": "started", "commands_generated": 0},
        )

    async def execution_status(self, request: Request) -> Response:
        state = self.state
        execution_id = path_int(request, "execution_id")
        row = state.executions.get(execution_id)
        if row is None:
            return error(state, 404, f"Execution {execution_id} not found")
        row.polls += 1
        limit = state.auto_complete_after_polls
        if limit is not None and not row.terminal and row.polls >= limit:
            state.complete_execution(execution_id, failed=state.auto_complete_failed)
        end = row.end_time
        duration = (end if end is not None else time.time()) - row.start_time
        return Response(
            200,
            {
                "execution_id": str(row.execution_id),
                "status": row.status,
                "current_step": row.current_step,
                "completed_steps": [],
                "failed": row.status in ("FAILED", "CANCELLED"),
                "completed": row.terminal,
                "completion_inferred": False,
                "variables": {},
                "result": row.result,
                "start_time": iso(row.start_time),
                "end_time": iso(end),
                "duration_seconds": round(duration, 3),
                "duration_human": f"{duration:.1f}s",
            },
        )

    async def cancel_execution(self, request: Request) -> Response:
        state = self.state
        execution_id = path_int(request, "execution_id")
        if execution_id not in state.executions:
            return error(state, 404, f"Execution {execution_id} not found")
        state.cancel_execution(execution_id)
        state._record_event(
            execution_id=str(execution_id),
            event_type="execution.cancelled",
            step="workflow",
            payload={"reason": optional(json_object(request), "reason") if request.body else None},
            meta={},
            worker_id=None,
            actionable=False,
            informative=True,
            via="server",
        )
        return Response(200, {"execution_id": str(execution_id), "status": "CANCELLED", "cancelled": True})
