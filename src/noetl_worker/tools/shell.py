"""``shell``: run a command (``command`` string) or a list of commands (``cmds``) with a shell.

Config: ``command`` | ``cmds`` (aliases ``cmd``; a string or a list), ``shell`` (default ``sh``),
``cwd``, ``env`` (the step's variables), ``timeout``/``timeout_seconds`` (applied by dispatch as the
command deadline).
Result data ``{exit_code, stdout, stderr}`` (plus ``commands`` with one entry per command for a
list); status ``error`` on the first non-zero exit (later commands do not run).

Process handling is ``procs``' (see there): each command runs in a clean environment (``PATH``,
``LANG``/``LC_*``, a scratch ``HOME``/``TMPDIR`` removed after the step, the keychain-allowlisted
values by name, the step's ``env``), as the head of a contained tree that is killed as soon as
the command exits, times out or is cancelled; each stream keeps ``MAX_OUTPUT`` bytes and reports
how many more it dropped.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any

import trio

from .. import procs
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


def _declared_env(config: Mapping[str, Any]) -> dict[str, str]:
    extra = config.get("env") or {}
    if not isinstance(extra, Mapping):
        raise ToolConfigError("shell", "env", "accepted: a mapping of variable names to values")
    return {str(key): "" if value is None else str(value) for key, value in extra.items()}


async def _run_one(argv: list[str], cwd: str | None, env: dict[str, str]) -> tuple[int, str, str]:
    completed = await procs.run_contained(argv, env=env, cwd=cwd, max_output=MAX_OUTPUT)
    return completed.returncode, completed.stdout.text(), completed.stderr.text()


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    commands = ctx.render(_commands(config))
    shell = config.get("shell") or "sh"
    if not isinstance(shell, str):
        raise ToolConfigError("shell", "shell", "accepted: an interpreter name or path such as sh or bash")
    cwd = config.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not await trio.Path(cwd).is_dir()):
        raise ToolConfigError("shell", "cwd", f"accepted: an existing directory, got {cwd!r}")
    declared = _declared_env(ctx.render(dict(config)) if config.get("env") else config)
    keychain = procs.allowlisted(ctx.settings.keychain_env_vars, ctx.secrets)
    outputs: list[dict[str, Any]] = []
    async with procs.open_scratch(f"shell-{ctx.step}") as scratch:
        env = procs.tool_environment(declared, scratch=scratch, keychain=keychain)
        if shutil.which(shell, path=env["PATH"]) is None:
            raise ToolConfigError("shell", "shell", f"interpreter {shell!r} not found")
        for command in commands:
            code, out, err = await _run_one([shell, "-c", str(command)], cwd, env)
            outputs.append({"command": command, "exit_code": code, "stdout": out, "stderr": err})
            if code != 0:
                break
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
