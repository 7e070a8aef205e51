"""The python tool's isolation from the worker: its environment, its result channel and the
processes a step leaves behind (a real fork server, real children)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from noetl_worker.config import Settings
from noetl_worker.tools import resolve
from noetl_worker.tools.base import ToolContext, ToolResources, ToolResult

from ..conftest import poll_until
from ..tool_support import make_ctx, process_alive

CANARY = "canary-4f1d9c"


@pytest.fixture
async def ctx(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ToolContext]:
    # Worker secrets in the worker's own environment, set before the fork server starts.
    monkeypatch.setenv("NOETL_INTERNAL_API_TOKEN", CANARY)
    monkeypatch.setenv("NATS_PASSWORD", CANARY)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    resources = ToolResources()
    try:
        yield make_ctx(resources)
    finally:
        with trio.fail_after(20):
            await resources.aclose()


async def run(config: Mapping[str, Any], ctx: ToolContext, limit: float = 20) -> ToolResult:
    with trio.fail_after(limit):
        return await resolve("python")(config, ctx)


async def _gone(pid: int) -> None:
    with trio.fail_after(10):
        await poll_until(lambda: not process_alive(pid), 0.02)


async def test_a_step_sees_a_clean_environment_not_the_workers(ctx: ToolContext) -> None:
    code = (
        "import os, tempfile\n"
        "def main():\n"
        "    os.makedirs(os.path.join(os.environ['HOME'], 'a', 'b'))\n"
        "    open(os.path.join(os.environ['HOME'], 'a', 'b', 'probe'), 'w').write('x')\n"
        "    return {'env': dict(os.environ), 'tmp': tempfile.gettempdir()}\n"
    )
    result = await run({"code": code, "env": {"GREETING": "hi"}}, ctx)
    assert result.status == "success", result.error
    env = result.data["env"]
    assert CANARY not in env.values()
    assert "NOETL_INTERNAL_API_TOKEN" not in env and "NATS_PASSWORD" not in env
    assert env["GREETING"] == "hi"
    assert env["PATH"] and env["LC_ALL"] == "C.UTF-8"
    # A scratch HOME/TMPDIR of its own, not the worker's, removed after the step.
    assert env["HOME"] == env["TMPDIR"] == result.data["tmp"]
    assert env["HOME"] != os.environ.get("HOME")
    with trio.fail_after(10):
        await poll_until(lambda: not os.path.exists(env["HOME"]), 0.02)
    second = await run({"code": code}, ctx)
    assert second.data["env"]["HOME"] != env["HOME"]
    # A step that leaves its scratch directory empty (the common case) loses it too.
    empty = await run({"code": "import os\ndef main():\n    return os.environ['HOME']\n"}, ctx)
    assert empty.status == "success", empty.error
    with trio.fail_after(10):
        await poll_until(lambda: not os.path.exists(empty.data), 0.02)


async def test_a_forked_process_neither_holds_the_step_nor_takes_its_result(
    ctx: ToolContext, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    code = (
        "import os, time\n"
        "def main():\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        return 'from the fork'\n"
        f"    open({str(pid_file)!r}, 'w').write(str(pid))\n"
        "    return 'from the step'\n"
    )
    # A deadline far beyond the test's own bound: the step must end when its code ends.
    result = await run({"code": code, "timeout_seconds": 300}, ctx, limit=15)
    assert result.status == "success", result.error
    assert result.data == "from the step"
    await _gone(int(pid_file.read_text()))


async def test_a_spawned_program_does_not_hold_the_step_and_is_killed(
    ctx: ToolContext, tmp_path: Path
) -> None:
    code = "import os\ndef main():\n    return os.spawnlp(os.P_NOWAIT, 'sleep', 'sleep', '60')\n"
    result = await run({"code": code, "timeout_seconds": 300}, ctx, limit=15)
    assert result.status == "success", result.error
    await _gone(int(result.data))


async def test_processes_left_behind_by_a_successful_step_are_killed(ctx: ToolContext) -> None:
    code = (
        "import subprocess\n"
        "def main():\n"
        "    return subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL).pid\n"
    )
    result = await run({"code": code}, ctx)
    assert result.status == "success", result.error
    await _gone(int(result.data))


async def test_a_child_is_forked_and_waiting_before_the_next_step(ctx: ToolContext) -> None:
    from noetl_worker.tools._forkserver import ForkServerHandle

    await run({"code": "result = 1"}, ctx)

    async def never() -> ForkServerHandle:
        raise AssertionError("the fork server should exist already")

    server = await (await ctx.resources.get_or_create("python.forkserver", never)).server()
    with trio.fail_after(10):
        await poll_until(lambda: server.spares >= 1, 0.01)
    # The waiting child exists before the request; the step runs in it.
    pid = server.process.pid
    children = (await trio.Path(f"/proc/{pid}/task/{pid}/children").read_text()).split()
    assert children
    result = await run({"code": "import os\ndef main(): return os.getpid()"}, ctx)
    assert str(result.data) in children


async def test_keychain_allowlisted_values_reach_a_step_by_name_only(ctx: ToolContext) -> None:
    """``NOETL_KEYCHAIN_ENV_VARS`` values reach a python step by their own names, as they reach a
    shell step; other command secrets (a credential's token) never become variables."""
    settings = Settings.from_env({"NOETL_KEYCHAIN_ENV_VARS": "PARTNER_KEY"})
    step_ctx = attrs.evolve(
        ctx, settings=settings, secrets={"PARTNER_KEY": "pk-123", "bearer_token": "tok-456"}
    )
    code = "import os\ndef main():\n    return dict(os.environ)\n"
    result = await run({"code": code, "env": {"PARTNER_KEY_COPY": "declared"}}, step_ctx)
    assert result.status == "success", result.error
    assert result.data["PARTNER_KEY"] == "pk-123"
    assert result.data["PARTNER_KEY_COPY"] == "declared"
    assert "tok-456" not in result.data.values() and "bearer_token" not in result.data
