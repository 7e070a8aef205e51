"""``workbook``: run a named task from the playbook's own ``workbook:`` section.

A playbook may define reusable tasks once (``workbook: [{name, tool: {kind, ...}, args}]``) and
name them from steps (``tool: {kind: workbook, name: <task>}``, or ``task: <task>``). The server
sends only the name, so the worker looks the task up: ``POST /api/catalog/resource`` with the
command's ``catalog_id`` (a render-context variable) answers the catalog entry, whose
``payload`` is the parsed playbook (its ``content``, the YAML text, is the fallback when PyYAML
is installed). Without a ``catalog_id`` the playbook ``path`` (and ``version``, default
``latest``) from the variables or the workload is used instead, as noetl's worker does.

The task runs as its own kind with its tool config (``tool`` may also be the legacy string
form, with the config fields on the task itself). Its ``args`` are the task's ``args``, then the
step's ``args`` and ``input`` (later wins); its config's templates render against the command's
variables plus those args. Credentials and keychain references in it are resolved like a
step's (``ctx.prepare_task``). The result is that tool's result, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .. import templating
from ..errors import ControlPlaneError, HTTPStatusError, ToolConfigError
from . import resolve
from .base import ToolContext, ToolResult

KIND = "workbook"
# Fields of the legacy string form (``tool: python`` with the config on the task itself).
_LEGACY_FIELDS = (
    "code", "command", "commands", "sql", "url", "method", "endpoint", "headers", "params", "data",
    "payload", "timeout",
)  # fmt: skip


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    name = config.get("task") or config.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolConfigError(KIND, "name", "required: the name of a task in the playbook's workbook section")
    try:
        playbook = await _playbook(ctx)
    except _LookupFailed as exc:
        return ToolResult("error", error=f"workbook task {name!r}: {exc}")
    entries = playbook.get("workbook")
    tasks = [t for t in entries if isinstance(t, Mapping)] if isinstance(entries, list) else []
    task = next((t for t in tasks if t.get("name") == name), None)
    if task is None:
        available = ", ".join(str(t.get("name")) for t in tasks) or "none"
        return ToolResult("error", error=f"workbook task {name!r} not found (available: {available})")
    child = _child_config(name, task, config)
    args = child["args"]
    variables = {**ctx.variables, **args}
    child = await ctx.prepare_task(child)
    tool = resolve(child["kind"])
    child_ctx = attrs.evolve(
        ctx, variables=variables, render=lambda value: templating.render(value, variables)
    )
    return await tool(child, child_ctx)


def _child_config(name: str, task: Mapping[str, Any], step: Mapping[str, Any]) -> dict[str, Any]:
    spec = task.get("tool")
    field = f"workbook[{name}].tool"
    if isinstance(spec, Mapping):
        kind = spec.get("kind")
        child = {k: v for k, v in spec.items() if k != "kind"}
    elif isinstance(spec, str):
        kind = spec
        child = {k: task[k] for k in _LEGACY_FIELDS if k in task}
    else:
        raise ToolConfigError(KIND, field, "required: {kind, ...} (or a kind name)")
    if not isinstance(kind, str) or not kind:
        raise ToolConfigError(KIND, f"{field}.kind", "required: a tool kind")
    if kind == KIND:
        raise ToolConfigError(KIND, f"{field}.kind", "a workbook task cannot itself be a workbook call")
    args: dict[str, Any] = {}
    for source, key in ((child, "input"), (child, "args"), (task, "args"), (step, "args"), (step, "input")):
        value = source.get(key)
        if isinstance(value, Mapping):
            args.update(value)
    child.pop("input", None)
    return {**child, "kind": kind, "args": args}


class _LookupFailed(Exception):
    """The playbook could not be fetched from the catalog."""


async def _playbook(ctx: ToolContext) -> Mapping[str, Any]:
    variables = ctx.variables
    catalog_id = variables.get("catalog_id")
    if catalog_id not in (None, ""):
        body: dict[str, Any] = {"catalog_id": str(catalog_id)}
    else:
        workload = variables.get("workload")
        workload = workload if isinstance(workload, Mapping) else {}
        path = variables.get("path") or workload.get("path")
        if not isinstance(path, str) or not path:
            raise _LookupFailed("the command has no catalog_id and no playbook path to find the workbook by")
        body = {"path": path, "version": variables.get("version") or workload.get("version") or "latest"}
    try:
        entry = await ctx.server.post_json("/api/catalog/resource", body)
    except HTTPStatusError as exc:
        if exc.status == 404:
            raise _LookupFailed(f"catalog entry {body} not found (HTTP 404)") from exc
        raise _LookupFailed(f"POST /api/catalog/resource: HTTP {exc.status}: {exc.body[:200]}") from exc
    except ControlPlaneError as exc:
        raise _LookupFailed(f"POST /api/catalog/resource: {exc}") from exc
    if not isinstance(entry, Mapping):
        raise _LookupFailed("the catalog answer is not a JSON object")
    payload = entry.get("payload")
    if isinstance(payload, Mapping):
        return payload
    return _parse_content(entry.get("content"))


def _parse_content(content: Any) -> Mapping[str, Any]:
    if not isinstance(content, str) or not content.strip():
        raise _LookupFailed("the catalog entry has neither a parsed payload nor content")
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise _LookupFailed("the catalog entry has no parsed payload, and PyYAML is not installed") from None
    try:
        parsed = yaml.safe_load(content)
    except yaml.YAMLError as exc:
        raise _LookupFailed(f"the playbook's YAML does not parse: {exc}") from None
    if not isinstance(parsed, Mapping):
        raise _LookupFailed("the playbook's YAML is not a mapping")
    return parsed
