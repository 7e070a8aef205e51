"""``shell``: run a command (``command`` string) or a list of commands (``cmds``) with a shell.

Config: ``command`` | ``cmds`` (aliases ``cmd``; a string or a list), ``shell`` (default ``sh``),
``cwd``, ``env`` (added to the worker's environment), ``timeout``/``timeout_seconds`` (applied by
dispatch as the command deadline; the process group is killed when it expires).
Result data ``{exit_code, stdout, stderr}`` (plus ``commands`` with one entry per command for a
list); status ``error`` on the first non-zero exit (later commands do not run).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

import trio

from ..errors import ToolConfigError
from .base import ToolContext, ToolResult

MAX_OUTPUT = 4 * 1024 * 1024  # per stream; beyond it the output is truncated with a marker


def _commands(config: Mapping[str, Any]) -> list[str]:
    for key in ("cmds", "command", "cmd", "commands"):
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if isinstance(value, str):
            if not value.strip():
                raise ToolConfigError("shell", key, "must not be empty")
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return list(value)
        raise ToolConfigError("shell", key, "accepted: a string or a non-empty list of strings")
    raise ToolConfigError(
        "shell", "command", "missing: give `command` (a string) or `cmds` (a list of strings)"
    )


def _env(config: Mapping[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    extra = config.get("env") or {}
    if not isinstance(extra, Mapping):
        raise ToolConfigError("shell", "env", "accepted: a mapping of variable names to values")
    for key, value in extra.items():
        env[str(key)] = "" if value is None else str(value)
    return env


def _decode(data: bytes) -> str:
    text = data[:MAX_OUTPUT].decode(errors="replace")
    return text + ("\n[output truncated]" if len(data) > MAX_OUTPUT else "")


async def _run_one(argv: list[str], cwd: str | None, env: dict[str, str]) -> tuple[int, str, str]:
    def kill_group(process: trio.Process) -> None:
        # The shell may have started children: kill the whole process group, not just sh.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def deliver_cancel(process: trio.Process) -> None:
        kill_group(process)

    completed = await trio.run_process(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        start_new_session=True,
        deliver_cancel=deliver_cancel,
    )
    return completed.returncode, _decode(completed.stdout), _decode(completed.stderr)


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    commands = ctx.render(_commands(config))
    shell = config.get("shell") or "sh"
    if not isinstance(shell, str):
        raise ToolConfigError("shell", "shell", "accepted: an interpreter name or path such as sh or bash")
    cwd = config.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not await trio.Path(cwd).is_dir()):
        raise ToolConfigError("shell", "cwd", f"accepted: an existing directory, got {cwd!r}")
    env = _env(ctx.render(dict(config)) if config.get("env") else config)
    outputs: list[dict[str, Any]] = []
    try:
        for command in commands:
            code, out, err = await _run_one([shell, "-c", str(command)], cwd, env)
            outputs.append({"command": command, "exit_code": code, "stdout": out, "stderr": err})
            if code != 0:
                break
    except FileNotFoundError:
        raise ToolConfigError("shell", "shell", f"interpreter {shell!r} not found") from None
    stdout = "".join(o["stdout"] for o in outputs)
    stderr = "".join(o["stderr"] for o in outputs)
    code = outputs[-1]["exit_code"]
    data: dict[str, Any] = {
        "exit_code": code,
        "stdout": stdout,
        "stderr": stderr,
        "returncode": code,
    }
    if len(commands) > 1:
        data["commands"] = outputs
    return ToolResult(
        "success" if code == 0 else "error",
        data=data,
        stdout=stdout,
        stderr=stderr,
        exit_code=code,
        error=None if code == 0 else f"command exited with code {code}",
    )
