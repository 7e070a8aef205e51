"""``task_sequence``: run a list of labelled tasks in order inside one command.

Config: ``{"tasks": [...]}`` (the Python server) or ``{"tool_config": [...]}`` (the Rust
worker's wrapping of a list ``tool_config``). A task is ``{label: {kind, ...config}}`` or
``{name: label, kind, ...config}``; unnamed tasks are called ``task_<index>``.

Each task's config is rendered when the task starts (the servers do not pre-render task lists),
against the command's variables plus everything captured so far and ``_prev`` (the previous
task's data). The tool then runs via ``tools.resolve(kind)`` with the same context (variables
extended the same way; its ``render`` is the identity because the config is already rendered,
so data containing ``{{`` is not rendered twice). A task's ``timeout`` bounds that task.

``set: {name: "{{ result.data.token }}"}`` captures values after a task succeeds; its templates
see ``result`` (the task's ToolResult as JSON) and ``output`` (``{status: ok|error, data,
error}``). A dotted name (``ctx.token``) updates a copy of that mapping. Captures only flow
forward: a task cannot see what a later task sets.

The first task that fails (status ``error``/``timeout``, or raises) stops the sequence. Result
``data``: the data of every task run, keyed by label, plus ``status`` (``ok`` or ``failed``) and,
on failure, ``failed_task`` and ``error``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from .. import templating
from ..errors import ToolConfigError, WorkerError
from . import resolve
from .base import ToolContext, ToolResult, ToolStatus

_RESERVED = frozenset({"status", "failed_task", "error"})
_KIND = "task_sequence"


@attrs.frozen
class _Task:
    label: str
    body: Mapping[str, Any]
    captures: Mapping[str, Any]


def _identity(value: Any) -> Any:
    return value


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    tasks = _parse(config)
    variables: dict[str, Any] = dict(ctx.variables)
    data: dict[str, Any] = {}
    previous: Any = None
    for task in tasks:
        scope_vars = {**variables, "_prev": previous}
        try:
            result = await _run_task(task, scope_vars, ctx)
        except Exception as exc:  # a failing task stops the sequence; earlier results are kept
            message = str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
            return _failed(data, task.label, "error", message)
        data[task.label] = result.data
        if result.status != "success":
            return _failed(data, task.label, result.status, result.error or result.status)
        previous = result.data
        if task.captures:
            try:
                _capture(task, result, scope_vars, variables)
            except WorkerError as exc:
                return _failed(data, task.label, "error", f"set: {exc}")
    return ToolResult("success", data={**data, "status": "ok"})


async def _run_task(task: _Task, scope_vars: dict[str, Any], ctx: ToolContext) -> ToolResult:
    body = templating.render(task.body, scope_vars)
    kind = body.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ToolConfigError(_KIND, f"{task.label}.kind", "a tool kind (string) is required")
    tool = resolve(kind)
    task_ctx = attrs.evolve(ctx, variables=scope_vars, render=_identity)
    timeout = _timeout(task.label, body.get("timeout"))
    with trio.move_on_after(timeout) as scope:
        result = await tool(body, task_ctx)
    if scope.cancelled_caught:
        return ToolResult("timeout", error=f"task timed out after {timeout:g}s")
    return result


def _capture(task: _Task, result: ToolResult, scope_vars: dict[str, Any], variables: dict[str, Any]) -> None:
    output = {
        "status": "ok" if result.status == "success" else "error",
        "data": result.data,
        "error": result.error,
    }
    values = templating.render(task.captures, {**scope_vars, "result": result.to_json(), "output": output})
    for name, value in values.items():
        _assign(variables, str(name).split("."), value)


def _assign(target: dict[str, Any], path: list[str], value: Any) -> None:
    head, rest = path[0], path[1:]
    if not rest:
        target[head] = value
        return
    current = target.get(head)
    # Copy on write: the command's own variables (e.g. ``ctx``) are never mutated.
    child = dict(current) if isinstance(current, Mapping) else {}
    _assign(child, rest, value)
    target[head] = child


def _failed(data: dict[str, Any], label: str, status: str, message: str) -> ToolResult:
    final_status: ToolStatus = "timeout" if status == "timeout" else "error"
    return ToolResult(
        final_status,
        data={**data, "status": "failed", "failed_task": label, "error": message},
        error=f"task {label!r} failed: {message}",
    )


def _timeout(label: str, value: Any) -> float:
    if value is None:
        return math.inf
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > 0:
        raise ToolConfigError(
            _KIND, f"{label}.timeout", f"expected a positive number of seconds, got {value!r}"
        )
    return seconds


def _parse(config: Mapping[str, Any]) -> list[_Task]:
    field = "tasks" if "tasks" in config else "tool_config"
    raw = config.get(field)
    if not isinstance(raw, list):
        raise ToolConfigError(
            _KIND,
            "tasks",
            "expected a list of tasks ({label: {kind, ...}} or {name, kind, ...}) in "
            f"'tasks' or 'tool_config', got {type(raw).__name__}",
        )
    tasks: list[_Task] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ToolConfigError(_KIND, f"tasks[{index}]", "expected a mapping")
        if len(item) == 1 and "kind" not in item and isinstance(next(iter(item.values())), Mapping):
            label, body = next(iter(item.items()))
            label = str(label)
        else:
            label = str(item.get("name") or item.get("label") or f"task_{index}")
            body = {k: v for k, v in item.items() if k not in ("name", "label")}
        if label in _RESERVED:
            raise ToolConfigError(
                _KIND, f"tasks[{index}]", f"label {label!r} is reserved ({sorted(_RESERVED)})"
            )
        if label in seen:
            raise ToolConfigError(_KIND, f"tasks[{index}]", f"duplicate label {label!r}")
        seen.add(label)
        captures = body.get("set") or {}
        if not isinstance(captures, Mapping):
            raise ToolConfigError(_KIND, f"{label}.set", "expected a mapping of name to template")
        tasks.append(_Task(label, {k: v for k, v in body.items() if k != "set"}, captures))
    return tasks
