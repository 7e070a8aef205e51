"""task_sequence policy rules (continue, retry with backoff, break, jump, fail) and per-task
preparation (credentials and keychain references resolved for each task as it starts)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import pytest
import trio

from noetl_worker import templating
from noetl_worker.errors import CredentialError, ToolConfigError
from noetl_worker.tools import register, resolve
from noetl_worker.tools.base import ToolContext, ToolResources, ToolResult

from ..tool_support import make_ctx

VARIABLES: dict[str, Any] = {"workload": {"cred": "pg_main"}, "ctx": {"from_step": 1}}
CALLS: list[str] = []
FAILURES_LEFT: dict[str, int] = {}


async def _flaky(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    """Fails with the configured HTTP status while ``FAILURES_LEFT[tag]`` lasts, then succeeds."""
    tag = str(config.get("tag"))
    CALLS.append(tag)
    if FAILURES_LEFT.get(tag, 0) > 0:
        FAILURES_LEFT[tag] -= 1
        code = int(config.get("code", 500))
        return ToolResult("error", data={"status_code": code, "headers": {}}, error=f"HTTP {code}")
    return ToolResult("success", data={"tag": tag, "attempt": len(CALLS)})


async def _echo(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    CALLS.append(str(config.get("tag")))
    return ToolResult("success", data=dict(config))


register("test_flaky", _flaky)
register("test_echo", _echo)


@pytest.fixture
async def ctx() -> AsyncIterator[ToolContext]:
    CALLS.clear()
    FAILURES_LEFT.clear()
    resources = ToolResources()
    try:
        yield make_ctx(
            resources, variables=VARIABLES, render=lambda value: templating.render(value, VARIABLES)
        )
    finally:
        await resources.aclose()


async def run(tasks: list[Any], ctx: ToolContext) -> ToolResult:
    with trio.fail_after(60):
        return await resolve("task_sequence")({"tasks": tasks}, ctx)


def _flaky_task(name: str, *rules: Any, code: int = 500) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "test_flaky",
        "tag": name,
        "code": code,
        "spec": {"policy": {"rules": list(rules)}},
    }


RETRY = {"when": "{{ output.status == 'error' }}", "then": {"do": "retry", "attempts": 3, "delay": 2}}


@pytest.mark.parametrize(
    ("backoff", "waited"),
    [("none", 0.0), ("linear", 2.0 + 4.0), ("exponential", 2.0 + 4.0)],
)
async def test_retry_reruns_the_task_with_its_backoff(
    ctx: ToolContext, autojump_clock: trio.abc.Clock, backoff: str, waited: float
) -> None:
    FAILURES_LEFT["fetch"] = 2
    rule = {**RETRY, "then": {**RETRY["then"], "backoff": backoff}}
    started = trio.current_time()
    result = await run(
        [_flaky_task("fetch", rule), {"name": "after", "kind": "test_echo", "tag": "after"}], ctx
    )
    assert result.status == "success", result.error
    assert CALLS == ["fetch", "fetch", "fetch", "after"]
    assert result.data["results"]["fetch"] == {"tag": "fetch", "attempt": 3}
    assert trio.current_time() - started == pytest.approx(waited)
    attempts = [t["attempt"] for t in result.data["metrics"]["tasks"] if t["name"] == "fetch"]
    assert attempts == [1, 2, 3]


async def test_exponential_backoff_doubles(ctx: ToolContext, autojump_clock: trio.abc.Clock) -> None:
    FAILURES_LEFT["fetch"] = 3
    rule = {
        "when": "{{ output.status == 'error' }}",
        "then": {"do": "retry", "attempts": 4, "backoff": "exponential", "delay": 1},
    }
    started = trio.current_time()
    result = await run([_flaky_task("fetch", rule)], ctx)
    assert result.status == "success"
    assert trio.current_time() - started == pytest.approx(1 + 2 + 4)


async def test_retry_gives_up_after_attempts_runs(ctx: ToolContext) -> None:
    FAILURES_LEFT["fetch"] = 10
    result = await run([_flaky_task("fetch", {**RETRY, "then": {"do": "retry", "attempts": 3}})], ctx)
    assert result.status == "error"
    assert CALLS == ["fetch"] * 3
    assert result.data["status"] == "failed"
    assert result.data["failed_task"] == "fetch"
    assert result.data["error"]["status_code"] == 500
    assert result.data["error"]["retryable"] is True
    assert result.data["error"]["code"] == "HTTP_500"


async def test_retryable_is_429_and_5xx_only(ctx: ToolContext) -> None:
    FAILURES_LEFT.update({"busy": 1, "missing": 1})
    retry_if_retryable = {"when": "{{ output.error.retryable }}", "then": {"do": "retry", "attempts": 5}}
    busy = await run([_flaky_task("busy", retry_if_retryable, code=429)], ctx)
    assert busy.status == "success" and CALLS == ["busy", "busy"]
    CALLS.clear()
    missing = await run([_flaky_task("missing", retry_if_retryable, code=404)], ctx)
    assert missing.status == "error" and CALLS == ["missing"]  # no rule matched an error: fail


async def test_continue_past_an_error(ctx: ToolContext) -> None:
    FAILURES_LEFT["optional"] = 1
    keep_going = {
        "when": "{{ output.status == 'error' }}",
        "then": {"do": "continue", "set": {"ctx.skipped": "{{ _task }}"}},
    }
    tasks = [
        _flaky_task("optional", keep_going),
        {"name": "next", "kind": "test_echo", "tag": "{{ ctx.skipped }}"},
    ]
    result = await run(tasks, ctx)
    assert result.status == "success"
    assert result.data["status"] == "ok"
    assert "optional" not in result.data["results"]
    assert result.data["results"]["next"]["tag"] == "optional"
    assert result.data["ctx"] == {"skipped": "optional"}


async def test_break_stops_successfully_with_the_remaining_tasks(ctx: ToolContext) -> None:
    stop = {"when": "{{ output.data.tag == 'page' }}", "then": {"do": "break"}}
    later = {"name": "later", "kind": "test_echo", "tag": "later"}
    result = await run([_flaky_task("page", stop), later], ctx)
    assert result.status == "success"
    assert result.data["status"] == "break"
    assert result.data["remaining_actions"] == [later]
    assert CALLS == ["page"]


async def test_jump_back_until_a_condition_holds(ctx: ToolContext) -> None:
    again = {
        "when": "{{ (ctx.rounds | default(0)) < 2 }}",
        "then": {"do": "jump", "to": "work", "set": {"ctx.rounds": "{{ (ctx.rounds | default(0)) + 1 }}"}},
    }
    tasks = [
        {"name": "work", "kind": "test_echo", "tag": "work"},
        {"name": "check", "kind": "test_echo", "tag": "check", "spec": {"policy": {"rules": [again]}}},
        {"name": "done", "kind": "test_echo", "tag": "done"},
    ]
    result = await run(tasks, ctx)
    assert result.status == "success"
    assert CALLS == ["work", "check", "work", "check", "work", "check", "done"]
    assert result.data["ctx"] == {"rounds": 2}


async def test_jump_to_previous_and_to_an_unknown_task(ctx: ToolContext) -> None:
    once = {
        "when": "{{ _attempt == 1 and not ctx.get('again') }}",
        "then": {"do": "jump", "to": "previous", "set": {"again": True}},
    }
    tasks = [
        {"name": "a", "kind": "test_echo", "tag": "a"},
        {"name": "b", "kind": "test_echo", "tag": "b", "spec": {"policy": {"rules": [once]}}},
    ]
    result = await run(tasks, ctx)
    assert CALLS == ["a", "b", "a", "b"]
    assert result.data["ctx"] == {"again": True}  # a bare set key lands in ctx
    CALLS.clear()
    lost = {"else": {"then": {"do": "jump", "to": "nowhere"}}}
    bad = await run(
        [{"name": "x", "kind": "test_echo", "tag": "x", "spec": {"policy": {"rules": [lost]}}}], ctx
    )
    assert bad.status == "error"
    assert "nowhere" in bad.data["error"]["message"]


async def test_fail_on_a_successful_output(ctx: ToolContext) -> None:
    reject = {"when": "{{ output.data.tag == 'x' }}", "then": {"do": "fail"}}
    tasks = [
        {"name": "x", "kind": "test_echo", "tag": "x", "spec": {"policy": {"rules": [reject]}}},
        {"name": "y", "kind": "test_echo", "tag": "y"},
    ]
    result = await run(tasks, ctx)
    assert result.status == "error"
    assert result.data["failed_task"] == "x"
    assert CALLS == ["x"]


async def test_single_tool_with_policy_arrives_as_one_task(ctx: ToolContext) -> None:
    # ``tool: {kind: python, ..., spec: {policy: ...}}`` reaches the worker as a one-task sequence.
    code = "def main():\n    return {'ok': 1}"
    tasks = [
        {
            "kind": "python",
            "code": code,
            "spec": {"policy": {"rules": [{"else": {"then": {"do": "continue"}}}]}},
        }
    ]
    result = await run(tasks, ctx)
    assert result.status == "success", result.error
    assert result.data["results"] == {"task_0": {"ok": 1}}
    assert result.data["_prev"] == {"ok": 1}


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"when": "true", "then": {"do": "explode"}}, "rules[0].then.do"),
        ({"expr": "true", "then": {"do": "continue"}}, "rules[0].expr"),
        ({"when": "true"}, "rules[0].then"),
        ({"when": "true", "then": {"do": "retry", "backoff": "random"}}, "rules[0].then.backoff"),
        ({"when": "true", "then": {"do": "retry", "attempts": "many"}}, "rules[0].then.attempts"),
    ],
)
async def test_bad_rules_name_the_field(ctx: ToolContext, rule: dict[str, Any], field: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        await run([{"name": "t", "kind": "test_echo", "spec": {"policy": {"rules": [rule]}}}], ctx)
    assert info.value.field == f"t.spec.policy.{field}"


async def test_each_task_is_prepared_after_rendering(ctx: ToolContext) -> None:
    """Credentials are resolved per task, on the rendered config (``auth: "{{ … }}"`` works)."""
    prepared: list[dict[str, Any]] = []

    async def prepare(task: Mapping[str, Any]) -> dict[str, Any]:
        prepared.append(dict(task))
        if task.get("auth") == "pg_main":
            return {k: v for k, v in task.items() if k != "auth"} | {"host": "db.internal"}
        if task.get("auth") == "broken":
            raise CredentialError("credential 'broken' not found (HTTP 404)")
        return dict(task)

    ctx = attrs.evolve(ctx, prepare_task=prepare)
    tasks = [
        {"name": "plain", "kind": "test_echo", "tag": "p"},
        {"name": "db", "kind": "test_echo", "tag": "d", "auth": "{{ workload.cred }}"},
    ]
    result = await run(tasks, ctx)
    assert result.status == "success"
    assert prepared[1] == {"kind": "test_echo", "tag": "d", "auth": "pg_main"}
    assert result.data["results"]["db"] == {"kind": "test_echo", "tag": "d", "host": "db.internal"}
    failing = await run([{"name": "db", "kind": "test_echo", "auth": "broken"}], ctx)
    assert failing.status == "error"
    assert "broken" in failing.data["error"]["message"]


async def test_a_result_saying_error_is_a_failed_task(ctx: ToolContext) -> None:
    code = "def main():\n    return {'status': 'error', 'error': 'upstream said no'}"
    retry_once = {"when": "{{ output.status == 'error' and _attempt < 2 }}", "then": {"do": "retry"}}
    tasks = [{"name": "p", "kind": "python", "code": code, "spec": {"policy": {"rules": [retry_once]}}}]
    result = await run(tasks, ctx)
    assert result.status == "error"
    assert result.data["error"]["message"] == "upstream said no"
    assert result.data["metrics"]["task_count"] == 2
