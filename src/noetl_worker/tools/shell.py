"""``shell``: run a command or a list of commands with a shell, one after another.

Config: ``cmds`` | ``cmd`` | ``command`` | ``commands`` (a string or a list of strings; first
present wins), ``shell`` (default ``sh``), ``cwd``, ``env`` (the step's variables),
``timeout``/``timeout_seconds`` (applied by dispatch as the command deadline).

Result ``data`` (as noetl's Python worker stores it): ``{returncode, stdout, stderr, commands,
duration_ms}`` — ``returncode`` of the last command run, ``stdout``/``stderr`` the non-empty
outputs joined by newlines, ``commands`` one ``{cmd_preview, returncode, stdout, stderr,
duration_ms}`` per command run. The first non-zero exit stops the list and gives status
``error`` with the same data. (``exit_code``, the Rust worker's field, is on the ToolResult.)

Process handling is ``procs``' (see there): each command runs in a clean environment (``PATH``,
``LANG``/``LC_*``, a scratch ``HOME``/``TMPDIR`` removed after the step, the keychain-allowlisted
values by name, the step's ``env``), as the head of a contained tree that is killed as soon as
the command exits, times out or is cancelled; each stream keeps ``MAX_OUTPUT`` bytes and reports
how many more it dropped.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from typing import Any

import trio

from .. import procs
from ..errors import ToolConfigError
from .base import ToolContext, ToolResult

MAX_OUTPUT = 4 * 1024 * 1024  # per stream; beyond it the output is truncated with a marker


_COMMAND_FIELDS = ("cmds", "cmd", "command", "commands")


def _commands(config: Mapping[str, Any]) -> list[str]:
    for key in _COMMAND_FIELDS:
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
        "shell", "cmds", f"missing: give one of {', '.join(_COMMAND_FIELDS)} (a string or a list of strings)"
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
    started = time.monotonic()
    async with procs.open_scratch(f"shell-{ctx.step}") as scratch:
        env = procs.tool_environment(declared, scratch=scratch, keychain=keychain)
        if shutil.which(shell, path=env["PATH"]) is None:
            raise ToolConfigError("shell", "shell", f"interpreter {shell!r} not found")
        for command in commands:
            began = time.monotonic()
            code, out, err = await _run_one([shell, "-c", str(command)], cwd, env)
            outputs.append(_command_entry(str(command), code, out, err, time.monotonic() - began))
            if code != 0:
                break
    return _result(outputs, time.monotonic() - started)


def _command_entry(command: str, code: int, stdout: str, stderr: str, seconds: float) -> dict[str, Any]:
    lines = command.strip().splitlines()
    return {
        "cmd_preview": lines[0][:120] if lines else "",
        "returncode": code,
        "stdout": stdout,
        "stderr": stderr,
        "duration_ms": int(seconds * 1000),
    }


def _result(outputs: list[dict[str, Any]], seconds: float) -> ToolResult:
    """noetl's shape: outputs joined by newlines, per-command entries, the last return code."""
    stdout = "\n".join(o["stdout"] for o in outputs if o["stdout"])
    stderr = "\n".join(o["stderr"] for o in outputs if o["stderr"])
    last = outputs[-1]
    code = last["returncode"]
    duration_ms = int(seconds * 1000)
    data = {
        "returncode": code,
        "stdout": stdout,
        "stderr": stderr,
        "commands": outputs,
        "duration_ms": duration_ms,
    }
    return ToolResult(
        "success" if code == 0 else "error",
        data=data,
        stdout=stdout,
        stderr=stderr,
        exit_code=code,
        duration_ms=duration_ms,
        error=None if code == 0 else f"shell command exited with returncode={code}: {last['cmd_preview']}",
    )
