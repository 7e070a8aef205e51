"""``task_sequence``: run a list of named tasks in order inside one command, with policy rules.

The Python server sends one when a step's ``tool:`` is a list of tasks, or a single tool with
``spec.policy`` (the command's step is then ``<step>:task_sequence``). Config: ``{"tasks":
[...]}`` (the Python server) or ``{"tool_config": [...]}`` (the Rust worker's wrapping). A task
is ``{name, kind, ...config}``, an unnamed ``{kind, ...}`` (called ``task_<index>``), or the Rust
worker's ``{<name>: {kind, ...}}``.

**Each task, when it starts:** its config (without ``kind``, ``spec``, ``output``, ``set``) is
rendered against the command's variables plus: every earlier task's result under its name,
``_task``, ``_prev`` (the previous task's result), ``_attempt``, ``output`` (the previous
outcome), ``results``, and ``ctx`` / ``iter`` merged with what the sequence set so far. Then
its credentials and keychain references are resolved (``ctx.prepare_task``, the same code the
command's own config went through), and the tool runs via ``tools.resolve(kind)`` with its
``render`` the identity (the config is rendered once). A task's ``timeout`` bounds that task.

**Its outcome** ``output`` is ``{status: ok, data}`` or ``{status: error, error: {kind,
retryable, code, status_code, message}}``, plus ``meta {attempt, duration_ms}`` and ``http
{status, headers}`` / ``pg {code, sqlstate}`` / ``py {exception, traceback}`` by tool kind.
An HTTP 429 or 5xx (and a task timeout) is ``retryable``. A result that itself says ``status:
error`` (a python ``main`` returning ``{"status": "error", ...}``) is an error, as in noetl.

**Policy** (``spec.policy.rules`` of the task): the first rule whose ``when`` renders true (or
an ``else:`` rule, or a rule without ``when``) decides ``then: {do, attempts (3), backoff
(none | linear | exponential), delay (1 s), to, set}``:
``continue`` (next task), ``retry`` (run the task again, at most ``attempts`` runs in all, after
``delay`` times 1, the retry number, or 2^(retry-1)), ``break`` (stop, successfully, with the tasks not
run in ``remaining_actions``), ``jump`` (go on at the task named ``to``, or ``previous``),
``fail`` (stop, failed). Without a matching rule: ``continue`` after ok, ``fail`` after an
error. ``then.set`` writes ``ctx.<k>`` / ``step.<k>`` / bare keys into the sequence's ``ctx`` and
``iter.<k>`` into its ``iter``. A task's own ``set`` (the Rust worker's captures) is applied
after it succeeds: ``ctx.*`` / ``iter.*`` as above, other names become variables of later tasks;
its templates also see ``result`` (the task's ToolResult as JSON).

**Result** ``data`` (as noetl's Python worker stores it): ``{status: ok | break | failed, _prev,
results: {task: result}, ctx, metrics}`` plus ``error`` and ``failed_task`` when failed, and
``remaining_actions`` after a break. A failed sequence is status ``error`` (``timeout`` when the
failing task timed out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from .. import templating
from ..errors import CredentialError, ToolConfigError, WorkerError
from . import resolve
from .base import ToolContext, ToolResult, ToolStatus

_KIND = "task_sequence"
ACTIONS = ("continue", "retry", "break", "jump", "fail")
BACKOFFS = ("none", "linear", "exponential")
_PREVIOUS = frozenset({"previous", "prev", "_previous", "@previous"})
_NOT_RENDERED = frozenset({"kind", "spec", "output", "set"})


@attrs.frozen
class _Task:
    name: str
    body: Mapping[str, Any]
    rules: tuple[Any, ...]
    captures: Mapping[str, Any]
    raw: Any  # as written, for ``remaining_actions``


@attrs.frozen
class _Action:
    do: str
    to: str | None = None
    attempts: int = 3
    backoff: str = "none"
    delay: float = 1.0
    set: Mapping[str, Any] | None = None


@attrs.define
class _State:
    prev: Any = None
    task: str = ""
    attempt: int = 1
    output: dict[str, Any] = attrs.field(factory=dict)
    results: dict[str, Any] = attrs.field(factory=dict)
    ctx: dict[str, Any] = attrs.field(factory=dict)
    iter: dict[str, Any] = attrs.field(factory=dict)
    variables: dict[str, Any] = attrs.field(factory=dict)  # the Rust form's bare ``set`` names
    timings: list[dict[str, Any]] = attrs.field(factory=list)
    failed_status: ToolStatus = "error"


def _identity(value: Any) -> Any:
    return value


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    tasks = _parse(config)
    base = dict(ctx.variables)
    state = _State()
    if isinstance(base.get("iter"), Mapping):
        state.iter.update(base["iter"])
    retries: dict[str, int] = {}
    index = 0
    while index < len(tasks):
        await trio.lowlevel.checkpoint()  # a jump loop of instant tasks must stay cancellable
        task = tasks[index]
        state.task = task.name
        state.attempt = retries.get(task.name, 0) + 1
        scope = _scope(base, state)
        result = await _attempt(task, scope, ctx, state)
        eval_scope = {**scope, **_view(state)}
        action = _decide(task, eval_scope, state.output)
        if result is not None and result.status == "success" and task.captures:
            try:
                values = templating.render(task.captures, {**eval_scope, "result": result.to_json()})
            except WorkerError as exc:
                return _failed(state, task.name, {"kind": "config", "message": f"set: {exc}"})
            _apply_set(state, values, bare_to_ctx=False)
        if action.set:
            _apply_set(state, _render_set(action.set, eval_scope), bare_to_ctx=True)
        if action.do == "continue":
            index += 1
        elif action.do == "retry":
            retries[task.name] = retries.get(task.name, 0) + 1
            if retries[task.name] >= action.attempts:
                return _failed(state, task.name, state.output.get("error"))
            delay = _delay(action, retries[task.name])
            if delay > 0:
                await trio.sleep(delay)
        elif action.do == "jump":
            target = _jump_target(tasks, index, action.to)
            if target is None:
                message = f"jump target {action.to!r} not found" if action.to else "jump needs 'to'"
                return _failed(state, task.name, {"kind": "config", "message": message})
            index = target
        elif action.do == "break":
            remaining = [t.raw for t in tasks[index + 1 :]]
            return ToolResult("success", data={**_summary("break", state), "remaining_actions": remaining})
        else:
            return _failed(state, task.name, state.output.get("error"))
    data = _summary("ok", state)
    if config.get("remaining_actions"):
        data["remaining_actions"] = config["remaining_actions"]
    return ToolResult("success", data=data)


def _scope(base: Mapping[str, Any], state: _State) -> dict[str, Any]:
    scope = dict(base)
    scope.update(state.results)
    scope.update(state.variables)
    scope.update(_view(state))
    base_ctx = base.get("ctx")
    base_iter = base.get("iter")
    scope["ctx"] = {**(base_ctx if isinstance(base_ctx, Mapping) else {}), **state.ctx}
    scope["iter"] = {**(base_iter if isinstance(base_iter, Mapping) else {}), **state.iter}
    return scope


def _view(state: _State) -> dict[str, Any]:
    output = state.output
    view: dict[str, Any] = {}
    if output:
        view = {
            "status": output.get("status", "ok"),
            "data": output.get("data"),
            "ref": output.get("ref"),
            "error": output.get("error"),
        }
        view.update((k, output[k]) for k in ("http", "pg", "py", "meta") if k in output)
    return {
        "_task": state.task,
        "_prev": state.prev,
        "_attempt": state.attempt,
        "output": view,
        "results": state.results,
    }


async def _attempt(task: _Task, scope: dict[str, Any], ctx: ToolContext, state: _State) -> ToolResult | None:
    """Run one attempt of a task; record its outcome in ``state``. ``None`` if it raised."""
    kind = task.body.get("kind")
    started = time.monotonic()
    render_ms = tool_ms = 0
    result: ToolResult | None = None
    try:
        if not isinstance(kind, str) or not kind:
            raise ToolConfigError(_KIND, f"{task.name}.kind", "a tool kind (string) is required")
        config = {k: v for k, v in task.body.items() if k not in _NOT_RENDERED}
        config = templating.render(config, scope)
        render_ms = int((time.monotonic() - started) * 1000)
        config = await ctx.prepare_task({**config, "kind": kind})
        tool = resolve(kind)
        task_ctx = attrs.evolve(ctx, variables=scope, render=_identity)
        timeout = _timeout(task.name, task.body.get("timeout"))
        began = time.monotonic()
        with trio.move_on_after(timeout) as deadline:
            done = await tool(config, task_ctx)
        tool_ms = int((time.monotonic() - began) * 1000)
        if deadline.cancelled_caught:
            done = ToolResult("timeout", error=f"task {task.name!r} timed out after {timeout:g}s")
        if done.status == "success" and _says_error(done.data):
            # noetl's worker counts a result that says ``status: error`` as the task failing.
            message = done.data.get("error") or done.data.get("message") or "Tool returned error status"
            done = attrs.evolve(done, status="error", error=str(message))
        result = done
        error = None if done.status == "success" else _tool_error(done)
    except Exception as exc:
        error = _exception_error(exc)
    duration_ms = int((time.monotonic() - started) * 1000)
    kind_name = kind if isinstance(kind, str) else "unknown"
    if error is None and result is not None:
        state.output = _outcome("ok", kind_name, duration_ms, state.attempt, data=result.data)
        state.prev = result.data
        state.results[task.name] = result.data
        state.failed_status = "error"  # a rule may still fail this ok outcome: that is no timeout
    else:
        state.output = _outcome("error", kind_name, duration_ms, state.attempt, error=error, result=result)
        state.failed_status = "timeout" if result is not None and result.status == "timeout" else "error"
    state.timings.append(
        {
            "name": task.name,
            "kind": kind_name,
            "attempt": state.attempt,
            "status": state.output["status"],
            "duration_ms": duration_ms,
            "render_ms": render_ms,
            "tool_ms": tool_ms,
        }
    )
    return result


def _says_error(data: Any) -> bool:
    return isinstance(data, Mapping) and data.get("status") == "error"


def _tool_error(result: ToolResult) -> dict[str, Any]:
    data = result.data if isinstance(result.data, Mapping) else {}
    status_code = data.get("status_code")
    if not isinstance(status_code, int) or isinstance(status_code, bool):
        status_code = None
    timed_out = result.status == "timeout"
    retryable = timed_out or (status_code is not None and (status_code == 429 or status_code >= 500))
    info: dict[str, Any] = {
        "kind": "timeout" if timed_out else "tool_error",
        "retryable": retryable,
        "code": f"HTTP_{status_code}" if status_code is not None else ("TIMEOUT" if timed_out else None),
        "status_code": status_code,
        "message": result.error or f"tool returned status {result.status}",
    }
    if data.get("sqlstate") is not None:
        info["sqlstate"] = data["sqlstate"]
    if data.get("traceback") is not None:
        info["traceback"] = data["traceback"]
    return info


def _exception_error(exc: Exception) -> dict[str, Any]:
    message = str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
    retryable = isinstance(exc, CredentialError) and exc.retryable
    kind = "config" if isinstance(exc, ToolConfigError) else "tool_error"
    return {"kind": kind, "retryable": retryable, "code": None, "status_code": None, "message": message}


def _outcome(
    status: str,
    kind: str,
    duration_ms: int,
    attempt: int,
    *,
    data: Any = None,
    error: dict[str, Any] | None = None,
    result: ToolResult | None = None,
) -> dict[str, Any]:
    output: dict[str, Any] = {"status": status, "meta": {"attempt": attempt, "duration_ms": duration_ms}}
    if status == "ok":
        output["data"] = data
    else:
        output["error"] = error
    if kind == "http":
        source = data if status == "ok" else (result.data if result is not None else None)
        source = source if isinstance(source, Mapping) else {}
        code = (error or {}).get("status_code") or source.get("status_code")
        output["http"] = {"status": code, "headers": source.get("headers", {})}
    elif kind == "postgres":
        output["pg"] = {"code": (error or {}).get("code"), "sqlstate": (error or {}).get("sqlstate")}
    elif kind == "python":
        output["py"] = {
            "exception": (error or {}).get("message"),
            "traceback": (error or {}).get("traceback"),
        }
    return output


def _decide(task: _Task, scope: dict[str, Any], output: Mapping[str, Any]) -> _Action:
    failed = output.get("status") == "error"
    for number, rule in enumerate(task.rules):
        field = f"{task.name}.spec.policy.rules[{number}]"
        if not isinstance(rule, Mapping):
            continue
        if "else" in rule:
            other = rule["else"]
            if isinstance(other, Mapping) and "then" in other:
                return _parse_then(other["then"], f"{field}.else.then")
            continue
        if "expr" in rule:
            raise ToolConfigError(_KIND, f"{field}.expr", "not accepted: write the condition as 'when'")
        if "when" not in rule or rule["when"] is None:
            if "then" in rule:
                return _parse_then(rule["then"], f"{field}.then")
            continue
        if _matches(rule["when"], scope):
            if "then" not in rule:
                raise ToolConfigError(_KIND, f"{field}.then", "required: a rule with 'when' needs 'then'")
            return _parse_then(rule["then"], f"{field}.then")
    return _Action("fail" if failed else "continue")


def _matches(condition: Any, scope: Mapping[str, Any]) -> bool:
    if isinstance(condition, bool):
        return condition
    try:
        value = templating.render(condition, scope)
    except WorkerError:
        return False  # noetl's worker treats an unrenderable condition as not matching
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes")


def _parse_then(then: Any, field: str) -> _Action:
    if not isinstance(then, Mapping):
        raise ToolConfigError(_KIND, field, "expected an object {do: continue|retry|break|jump|fail, ...}")
    if "set_vars" in then:
        raise ToolConfigError(_KIND, f"{field}.set_vars", "not accepted: write it as 'set'")
    do = then.get("do")
    if do not in ACTIONS:
        raise ToolConfigError(
            _KIND, f"{field}.do", f"{do!r} is not accepted: expected one of {', '.join(ACTIONS)}"
        )
    attempts = then.get("attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int | float | str):
        raise ToolConfigError(_KIND, f"{field}.attempts", f"expected a whole number, got {attempts!r}")
    try:
        attempts = int(attempts)
    except ValueError:
        raise ToolConfigError(
            _KIND, f"{field}.attempts", f"expected a whole number, got {attempts!r}"
        ) from None
    backoff = str(then.get("backoff", "none")).lower()
    if backoff not in BACKOFFS:
        raise ToolConfigError(
            _KIND, f"{field}.backoff", f"{backoff!r} is not accepted: expected one of {', '.join(BACKOFFS)}"
        )
    try:
        delay = float(then.get("delay", 1.0))
    except (TypeError, ValueError):
        delay = 1.0  # noetl's worker falls back to 1 s
    if not math.isfinite(delay) or delay < 0:
        raise ToolConfigError(_KIND, f"{field}.delay", f"expected seconds >= 0, got {then.get('delay')!r}")
    to = then.get("to")
    captures = then.get("set")
    if captures is not None and not isinstance(captures, Mapping):
        raise ToolConfigError(_KIND, f"{field}.set", "expected a mapping of name to value")
    return _Action(do, None if to is None else str(to), attempts, backoff, delay, captures)


def _delay(action: _Action, retry: int) -> float:
    if action.backoff == "linear":
        return action.delay * retry
    if action.backoff == "exponential":
        return float(action.delay * 2 ** (retry - 1))
    return 0.0


def _jump_target(tasks: list[_Task], index: int, to: str | None) -> int | None:
    if not to:
        return None
    if to in _PREVIOUS:
        return max(index - 1, 0)
    for position, task in enumerate(tasks):
        if task.name == to:
            return position
    return None


def _render_set(values: Mapping[str, Any], scope: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str) and "{{" in value:
            try:
                value = templating.render(value, scope)
            except WorkerError:
                pass  # noetl's worker keeps the text when a set value does not render
        out[str(key)] = value
    return out


def _apply_set(state: _State, values: Mapping[str, Any], *, bare_to_ctx: bool) -> None:
    for key, value in values.items():
        name = str(key)
        if name.startswith("ctx."):
            _assign(state.ctx, name[4:].split("."), value)
        elif name.startswith("step."):
            _assign(state.ctx, name[5:].split("."), value)
        elif name.startswith("iter."):
            _assign(state.iter, name[5:].split("."), value)
        elif bare_to_ctx:
            state.ctx[name] = value
        else:
            _assign(state.variables, name.split("."), value)


def _assign(target: dict[str, Any], path: list[str], value: Any) -> None:
    head, rest = path[0], path[1:]
    if not rest:
        target[head] = value
        return
    current = target.get(head)
    # Copy on write: mappings from the command's own variables are never mutated.
    child = dict(current) if isinstance(current, Mapping) else {}
    _assign(child, rest, value)
    target[head] = child


def _summary(status: str, state: _State) -> dict[str, Any]:
    return {
        "status": status,
        "_prev": state.prev,
        "results": state.results,
        "ctx": state.ctx,
        "metrics": _metrics(state.timings),
    }


def _failed(state: _State, name: str, error: Any) -> ToolResult:
    data = {**_summary("failed", state), "error": error, "failed_task": name}
    message = error.get("message") if isinstance(error, Mapping) else None
    return ToolResult(state.failed_status, data=data, error=f"task {name!r} failed: {message or 'failed'}")


def _metrics(timings: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    by_name: dict[str, dict[str, int]] = {}
    for item in timings:
        for bucket, key in ((by_kind, item["kind"]), (by_name, item["name"])):
            slot = bucket.setdefault(
                key, {"count": 0, "error_count": 0, "duration_ms": 0, "render_ms": 0, "tool_ms": 0}
            )
            slot["count"] += 1
            slot["error_count"] += item["status"] == "error"
            for field in ("duration_ms", "render_ms", "tool_ms"):
                slot[field] += item[field]
    return {
        "task_count": len(timings),
        "duration_ms": sum(t["duration_ms"] for t in timings),
        "render_ms": sum(t["render_ms"] for t in timings),
        "tool_ms": sum(t["tool_ms"] for t in timings),
        "by_kind": by_kind,
        "by_name": by_name,
        "tasks": timings,
    }


def _timeout(name: str, value: Any) -> float:
    if value is None:
        return math.inf
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > 0:
        raise ToolConfigError(
            _KIND, f"{name}.timeout", f"expected a positive number of seconds, got {value!r}"
        )
    return seconds


def _parse(config: Mapping[str, Any]) -> list[_Task]:
    field = "tasks" if "tasks" in config else "tool_config"
    raw = config.get(field)
    if not isinstance(raw, list):
        raise ToolConfigError(
            _KIND,
            "tasks",
            "expected a list of tasks ({name, kind, ...}, {kind, ...} or {name: {kind, ...}}) in "
            f"'tasks' or 'tool_config', got {type(raw).__name__}",
        )
    tasks: list[_Task] = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ToolConfigError(_KIND, f"tasks[{index}]", "expected a mapping")
        if len(item) == 1 and "kind" not in item and isinstance(next(iter(item.values())), Mapping):
            label, body = next(iter(item.items()))
            name = str(label)
        else:
            given = item.get("name") or item.get("label")
            name = str(given) if given else f"task_{index}"
            body = {k: v for k, v in item.items() if k not in ("name", "label")}
        spec = body.get("spec")
        policy = spec.get("policy") if isinstance(spec, Mapping) else None
        rules = policy.get("rules") if isinstance(policy, Mapping) else None
        if rules is not None and not isinstance(rules, list):
            raise ToolConfigError(_KIND, f"{name}.spec.policy.rules", "expected a list of rules")
        captures = body.get("set") or {}
        if not isinstance(captures, Mapping):
            raise ToolConfigError(_KIND, f"{name}.set", "expected a mapping of name to template")
        tasks.append(_Task(name, body, tuple(rules or ()), captures, item))
    return tasks
