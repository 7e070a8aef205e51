"""``python``: run a playbook's Python code in a fresh child of a warm fork server.

Config (compatible with both upstream workers):

- code: ``code`` (inline), ``code_b64`` / ``code_base64``, or ``script`` — a file path, an
  ``http(s)://`` URL, or ``{uri, source: {type: file|http|inline, path, endpoint, method,
  headers, timeout, code}}``;
- ``args`` and ``input`` (merged, ``args`` wins): every key becomes a global, ``args`` holds the
  whole dict, and ``main(**kwargs)`` gets the keys it accepts (all of them with ``**kwargs``); a
  parameter the args do not fill is looked up, as noetl's worker does, in the render context's
  ``input``, then ``data``, then its top-level names (``context`` itself is the render context).
  Strings inside are rendered with ``ctx.render``;
  A string that spells a JSON (or Python literal) object or list is parsed, as noetl's worker
  does with values the server rendered to text;
- ``libs``: ``{alias: module}`` (``import module as alias``) or ``{alias: {from, import}}``
  (``from … import … as alias``), imported before the code runs;
- ``deps``: ``sys_path`` (directories put first on ``sys.path``; missing ones are skipped, as
  noetl does) and ``venv_path`` (a virtualenv whose site-packages is added); ``packages``
  (installing at run time) is refused: install them in the image or a venv;
- ``timeout`` / ``timeout_seconds`` → status ``timeout`` (enforced: the child is killed);
  ``env`` (the step's environment, on top of a clean base: PATH, locale, TZ, a scratch
  HOME/TMPDIR — never the worker's own), ``cwd``, ``python`` (interpreter, default the worker's
  own).

Result ``data`` (as noetl's Python worker stores it): ``main``'s return value when the code
defines ``main`` (``None`` included), else the ``result`` variable the code assigned, else a
summary ``{status: success, message, locals_count, locals_keys}``. Output is captured into
``stdout``/``stderr``.
An exception in user code, a crash (``os._exit``, a segfault) or the memory limit
(``NOETL_PYTHON_MEMORY_LIMIT_MB``, address space of the child, default 1024, 0 = unlimited) give a
result with status ``error``; the worker and the next call are unaffected.
"""

from __future__ import annotations

import ast
import base64
import binascii
import glob
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import trio

from .. import procs
from ..errors import ToolConfigError, ToolError
from ._forkserver import CallCapture, ForkServerHandle
from .base import ToolContext, ToolResult

log = logging.getLogger(__name__)

MEMORY_LIMIT_ENV = "NOETL_PYTHON_MEMORY_LIMIT_MB"
DEFAULT_MEMORY_LIMIT_MB = 1024
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
_SCRIPT_TYPES = "file, http, inline"


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    code, filename = await _load_code(config)
    args = _args(config, ctx)
    timeout = _timeout(config)
    request: dict[str, Any] = {
        "code": code,
        "filename": filename,
        "args": args,
        "env": _env(config, ctx),
        "cwd": config.get("cwd"),
        "libs": _libs(config),
        "path": await _sys_path(config),
    }
    memory_limit_mb = _memory_limit_mb()
    if _uses_context(code, args):  # only ship the (possibly large) render context when it can be used
        request["context"] = dict(ctx.variables)
    payload = json.dumps(request, default=str).encode() + b"\n"
    python = config.get("python") or sys.executable
    if not isinstance(python, str):
        raise ToolConfigError("python", "python", "expected an interpreter path (string)")
    handle = await ctx.resources.get_or_create(
        _resource_key(python), lambda: _new_handle(python, memory_limit_mb), _close_handle
    )
    capture = CallCapture(max_output_bytes=MAX_OUTPUT_BYTES)
    started = time.monotonic()
    with trio.move_on_after(timeout) as scope:
        await handle.call(payload, capture)
    duration_ms = int((time.monotonic() - started) * 1000)
    if scope.cancelled_caught:
        return ToolResult(
            "timeout",
            data={"error": f"python step timed out after {timeout:g}s"},
            error=f"python step timed out after {timeout:g}s",
            stdout=capture.text("stdout"),
            stderr=capture.text("stderr"),
            duration_ms=duration_ms,
        )
    return _result(capture, duration_ms, handle.memory_limit_mb)


def _resource_key(python: str) -> str:
    return "python.forkserver" if python == sys.executable else f"python.forkserver:{python}"


async def _new_handle(python: str, memory_limit_mb: int) -> ForkServerHandle:
    # The limit is set once on the fork server, which every child inherits.
    handle = ForkServerHandle(python, memory_limit_mb=memory_limit_mb, env=procs.tool_environment())
    await handle.server()  # start now, so a bad interpreter fails this call, not a later one
    return handle


async def _close_handle(handle: ForkServerHandle) -> None:
    await handle.aclose()


def _result(capture: CallCapture, duration_ms: int, memory_limit_mb: int) -> ToolResult:
    stdout, stderr = capture.text("stdout"), capture.text("stderr")
    outcome = capture.outcome
    common: dict[str, Any] = {"stdout": stdout, "stderr": stderr, "duration_ms": duration_ms}
    if outcome is not None and outcome.get("ok"):
        return ToolResult("success", data=outcome.get("data"), exit_code=0, **common)
    if outcome is not None:
        error = str(outcome.get("error") or "python code failed")
        if error.startswith("MemoryError") and memory_limit_mb:
            error += f" (the step is limited to {memory_limit_mb} MiB by {MEMORY_LIMIT_ENV})"
        data = {"error": error, "traceback": outcome.get("traceback")}
        return ToolResult("error", data=data, error=error, exit_code=1, **common)
    error = _exit_message(capture.exit_code)
    return ToolResult(
        "error",
        data={"error": error, "exit_code": capture.exit_code},
        error=error,
        exit_code=capture.exit_code,
        **common,
    )


def _exit_message(exit_code: int | None) -> str:
    if exit_code is None:
        return "python process ended without reporting a result (fork server died?)"
    if exit_code >= 0:
        return f"python process exited with code {exit_code} before reporting a result"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    hint = ""
    if -exit_code == signal.SIGKILL:
        hint = " (killed: out of memory or an external kill)"
    return f"python process killed by {name}{hint}"


def _args(config: Mapping[str, Any], ctx: ToolContext) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for field in ("input", "args"):
        value = config.get(field)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ToolConfigError("python", field, f"expected a mapping, got {type(value).__name__}")
        merged.update(value)
    rendered = ctx.render(merged)
    return {str(k): _coerce(v) for k, v in dict(rendered).items()}


_MAIN = re.compile(r"^(?:async\s+)?def\s+main\s*\(([^)]*)\)", re.MULTILINE)


def _uses_context(code: str, args: Mapping[str, Any]) -> bool:
    """Whether the code may read the render context: it names ``context``, or ``main`` has a
    parameter the args do not fill (noetl's worker fills it from the render context)."""
    if "context" in code:
        return True
    match = _MAIN.search(code)
    if match is None:
        return False
    for part in match.group(1).split(","):
        name = part.split(":")[0].split("=")[0].strip()
        if name and not name.startswith("*") and name != "/" and name not in args:
            return True
    return False


def _coerce(value: Any) -> Any:
    """A value the server rendered to text (``"{'a': 1}"``, ``"[1, 2]"``) back to its object."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not ((text.startswith("{") and text.endswith("}")) or (text.startswith("[") and text.endswith("]"))):
        return value
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _libs(config: Mapping[str, Any]) -> list[list[str | None]]:
    """``libs`` as ``[alias, module, name-or-None]`` triples the runner imports."""
    libs = config.get("libs")
    if libs is None:
        return []
    if not isinstance(libs, Mapping):
        raise ToolConfigError(
            "python", "libs", "expected a mapping of alias to module, or alias to {from, import}"
        )
    out: list[list[str | None]] = []
    for alias, spec in libs.items():
        field = f"libs.{alias}"
        if not isinstance(alias, str) or not alias.isidentifier():
            raise ToolConfigError("python", field, "the alias must be a Python identifier")
        if isinstance(spec, str) and _MODULE.fullmatch(spec):
            out.append([alias, spec, None])
        elif (
            isinstance(spec, Mapping)
            and isinstance(spec.get("from"), str)
            and _MODULE.fullmatch(spec["from"])
            and isinstance(spec.get("import"), str)
            and spec["import"].isidentifier()
        ):
            out.append([alias, spec["from"], spec["import"]])
        else:
            raise ToolConfigError(
                "python", field, f"expected a module name or {{from: <module>, import: <name>}}, got {spec!r}"
            )
    return out


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


async def _sys_path(config: Mapping[str, Any]) -> list[str]:
    """Directories from ``deps.sys_path`` (existing ones) and ``deps.venv_path``'s site-packages."""
    deps = config.get("deps")
    if deps is None:
        return []
    if not isinstance(deps, Mapping):
        raise ToolConfigError("python", "deps", "expected a mapping with sys_path and/or venv_path")
    if deps.get("packages"):
        raise ToolConfigError(
            "python",
            "deps.packages",
            "installing packages at run time is not supported: install them in the worker image,"
            " or build a virtualenv and name it in deps.venv_path",
        )
    paths: list[str] = []
    raw = deps.get("sys_path") or []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise ToolConfigError("python", "deps.sys_path", "expected a list of directory paths")
    for path in raw:
        if await trio.Path(path).is_dir():
            paths.append(path)
        else:
            log.warning("python deps.sys_path: %r is not a directory; skipped", path)
    venv = deps.get("venv_path")
    if venv is not None:
        if not isinstance(venv, str) or not await trio.Path(venv).is_dir():
            raise ToolConfigError("python", "deps.venv_path", f"{venv!r} is not an existing directory")
        found = sorted(
            await trio.to_thread.run_sync(glob.glob, os.path.join(venv, "lib", "python*", "site-packages"))
        )
        if not found:
            raise ToolConfigError("python", "deps.venv_path", f"no lib/python*/site-packages under {venv!r}")
        paths.append(found[-1])
    return paths


def _env(config: Mapping[str, Any], ctx: ToolContext) -> dict[str, str]:
    """What a call adds to the fork server's clean base environment (``procs.tool_environment``):
    the keychain-allowlisted values by name, then the step's declared ``env``, which wins."""
    added = procs.allowlisted(ctx.settings.keychain_env_vars, ctx.secrets)
    env = config.get("env")
    if env is None:
        return added
    if not isinstance(env, Mapping):
        raise ToolConfigError("python", "env", "expected a mapping of variable name to value")
    return {**added, **{str(k): "" if v is None else str(v) for k, v in ctx.render(dict(env)).items()}}


def _timeout(config: Mapping[str, Any]) -> float:
    for field in ("timeout_seconds", "timeout"):
        value = config.get(field)
        if value is None:
            continue
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not seconds > 0:
            raise ToolConfigError("python", field, f"expected a positive number of seconds, got {value!r}")
        return seconds
    return math.inf


def _memory_limit_mb() -> int:
    raw = os.environ.get("NOETL_PYTHON_MEMORY_LIMIT_MB")
    if raw is None or not raw.strip():
        return DEFAULT_MEMORY_LIMIT_MB
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ToolError(
            f"{MEMORY_LIMIT_ENV}={raw!r} is invalid: expected a whole number of MiB (0 = no limit)"
        )
    return value


async def _load_code(config: Mapping[str, Any]) -> tuple[str, str]:
    """The code to run and the file name its tracebacks show."""
    code = config.get("code")
    if code is not None:
        if not isinstance(code, str):
            raise ToolConfigError("python", "code", "expected a string of Python source")
        return code, "<python step>"
    for field in ("code_b64", "code_base64"):
        encoded = config.get(field)
        if encoded is not None:
            return _b64(field, encoded), "<python step>"
    script = config.get("script")
    if script is not None:
        return await _load_script(script)
    raise ToolConfigError("python", "code", "one of code, code_b64 / code_base64 or script is required")


def _b64(field: str, encoded: Any) -> str:
    if not isinstance(encoded, str):
        raise ToolConfigError("python", field, "expected a base64 string")
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ToolConfigError("python", field, f"not valid base64 of UTF-8 text: {exc}") from exc


async def _load_script(script: Any) -> tuple[str, str]:
    if isinstance(script, str):
        if script.startswith(("http://", "https://")):
            return await _fetch(script, "GET", {}, 30.0), script
        return await _read_file(script), script
    if not isinstance(script, Mapping):
        raise ToolConfigError("python", "script", "expected a path, a URL or {uri, source}")
    source = script.get("source") or {}
    if not isinstance(source, Mapping):
        raise ToolConfigError("python", "script.source", "expected a mapping")
    uri = script.get("uri") or script.get("path")
    kind = source.get("type")
    if kind is None:
        if source.get("code") is not None:
            kind = "inline"
        elif isinstance(uri, str) and uri.startswith(("http://", "https://")):
            kind = "http"
        else:
            kind = "file"
    if kind == "inline":
        code = source.get("code", script.get("content"))
        if not isinstance(code, str):
            raise ToolConfigError("python", "script.source.code", "expected a string")
        return code, "<python script>"
    if kind == "file":
        path = source.get("path") or uri
        if not isinstance(path, str) or not path:
            raise ToolConfigError("python", "script.uri", "a file path is required")
        return await _read_file(path.removeprefix("file://")), path
    if kind == "http":
        url = source.get("endpoint") or source.get("url") or uri
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ToolConfigError("python", "script.source.endpoint", "an http(s) URL is required")
        method = str(source.get("method") or "GET").upper()
        headers = source.get("headers") or {}
        timeout = float(source.get("timeout") or 30.0)
        return await _fetch(url, method, dict(headers), timeout), url
    raise ToolConfigError("python", "script.source.type", f"unsupported {kind!r}; accepted: {_SCRIPT_TYPES}")


async def _read_file(path: str) -> str:
    try:
        return await trio.Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ToolError(f"python script {path!r} could not be read: {exc}") from exc


async def _fetch(url: str, method: str, headers: dict[str, Any], timeout: float) -> str:
    import httpx

    try:
        with trio.fail_after(timeout):
            async with httpx.AsyncClient(follow_redirects=True, timeout=timeout) as client:
                response = await client.request(method, url, headers=headers)
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        raise ToolError(f"python script {url} could not be fetched: {exc!r}") from exc
    if response.status_code // 100 != 2:
        raise ToolError(f"python script {url} could not be fetched: HTTP {response.status_code}")
    return response.text
