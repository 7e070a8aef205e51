"""task_sequence: ordered tasks, run-time rendering, set/input chaining, stop at first failure."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import trio

from noetl_worker import templating
from noetl_worker.errors import ToolConfigError, ToolError
from noetl_worker.tools import register, resolve
from noetl_worker.tools.base import ToolContext, ToolResources, ToolResult

from ..tool_support import make_ctx

VARIABLES: dict[str, Any] = {"workload": {"base": 10}, "user": "ada"}
CALLS: list[str] = []
FETCH_CODE = "def main(token, n, prev):\n    return {'auth': token, 'n': n + 1, 'prev': prev}"


async def _record(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    CALLS.append(str(config.get("tag")))
    return ToolResult("success", data={"tag": config.get("tag")})


async def _explode(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    raise ToolError("exploded on purpose")


async def _sleepy(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


register("test_record", _record)
register("test_explode", _explode)
register("test_sleepy", _sleepy)


@pytest.fixture
async def ctx() -> AsyncIterator[ToolContext]:
    CALLS.clear()
    resources = ToolResources()
    try:
        yield make_ctx(
            resources, variables=VARIABLES, render=lambda value: templating.render(value, VARIABLES)
        )
    finally:
        await resources.aclose()


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    with trio.fail_after(30):
        return await resolve("task_sequence")(config, ctx)


async def test_results_prev_and_named_results_flow_forward(ctx: ToolContext) -> None:
    tasks = [
        {"name": "first", "kind": "noop", "result": {"v": "{{ workload.base }}"}},
        {"name": "second", "kind": "noop", "result": {"prev": "{{ _prev.v }}", "first": "{{ first.v }}"}},
        {"name": "third", "kind": "noop", "result": {"via_results": "{{ results.second.prev }}"}},
    ]
    result = await run({"tasks": tasks}, ctx)
    assert result.status == "success", result
    data = result.data
    assert data["status"] == "ok"
    assert data["results"] == {
        "first": {"v": 10},
        "second": {"prev": 10, "first": 10},
        "third": {"via_results": 10},
    }
    assert data["_prev"] == {"via_results": 10}
    assert data["ctx"] == {}
    assert data["metrics"]["task_count"] == 3
    assert [t["name"] for t in data["metrics"]["tasks"]] == ["first", "second", "third"]


async def test_set_captures_flow_into_later_inputs(ctx: ToolContext) -> None:
    tasks = [
        {
            "login": {
                "kind": "noop",
                "result": {"token": "t-{{ user }}", "n": "{{ workload.base }}"},
                "set": {"token": "{{ result.data.token }}", "ctx.n": "{{ output.data.n }}"},
            }
        },
        {
            "fetch": {
                "kind": "python",
                "code": FETCH_CODE,
                "input": {"token": "{{ token }}", "n": "{{ ctx.n }}", "prev": "{{ _prev }}"},
            }
        },
    ]
    result = await run({"tasks": tasks}, ctx)
    assert result.status == "success", result
    assert result.data["results"] == {
        "login": {"token": "t-ada", "n": 10},
        "fetch": {"auth": "t-ada", "n": 11, "prev": {"token": "t-ada", "n": 10}},
    }
    assert result.data["ctx"] == {"n": 10}
    assert "ctx" not in VARIABLES  # captures never mutate the command's own variables


async def test_captures_only_flow_forward(ctx: ToolContext) -> None:
    tasks = [
        {"name": "early", "kind": "noop", "result": {"seen": "{{ later }}"}},
        {"name": "late", "kind": "noop", "result": {"v": 1}, "set": {"later": "set-late"}},
    ]
    result = await run({"tasks": tasks}, ctx)
    assert result.data["results"]["early"] == {"seen": None}


async def test_tool_config_list_form_and_unnamed_tasks(ctx: ToolContext) -> None:
    tasks = [{"kind": "test_record", "tag": "a"}, {"kind": "test_record", "tag": "{{ user }}"}]
    result = await run({"tool_config": tasks, "kind": "task_sequence"}, ctx)
    assert result.data["results"] == {"task_0": {"tag": "a"}, "task_1": {"tag": "ada"}}
    assert CALLS == ["a", "ada"]


@pytest.mark.parametrize(
    ("failing", "status", "message"),
    [
        ({"kind": "python", "code": "raise KeyError('k')"}, "error", "KeyError"),
        ({"kind": "test_explode"}, "error", "exploded on purpose"),
        ({"kind": "no_such_kind"}, "error", "Tool not found"),
        ({"kind": "noop", "result": "{{ bad syntax"}, "error", "Template error"),
        ({"kind": "test_sleepy", "timeout": 0.2}, "timeout", "timed out"),
    ],
)
async def test_stops_at_the_first_failing_task(
    ctx: ToolContext, failing: dict[str, Any], status: str, message: str
) -> None:
    tasks = [
        {"one": {"kind": "test_record", "tag": "1"}},
        {"two": failing},
        {"three": {"kind": "test_record", "tag": "3"}},
    ]
    result = await run({"tasks": tasks}, ctx)
    assert result.status == status
    assert CALLS == ["1"]  # task three never ran
    assert result.data["results"] == {"one": {"tag": "1"}}
    assert result.data["status"] == "failed"
    assert result.data["failed_task"] == "two"
    assert message in result.data["error"]["message"]
    assert result.error is not None and "'two'" in result.error and message in result.error


async def test_bad_task_lists_name_the_field(ctx: ToolContext) -> None:
    with pytest.raises(ToolConfigError, match="tasks"):
        await run({"tasks": "not a list"}, ctx)
    result = await run({"tasks": [{"name": "a", "result": 1}]}, ctx)
    assert result.status == "error" and "a.kind" in (result.error or "")
