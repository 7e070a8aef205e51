"""The fork server of the ``python`` tool: the child side, run as
``python _pyrunner.py <fd> <memory-limit-mib> <scratch-root>``.

This file is executed as a standalone script by the interpreter a step asks for, so it imports
nothing from ``noetl_worker`` and only the standard library.

Protocol (one long-lived server process per interpreter; the worker side is
``tools/_forkserver.py``):

- ``<fd>`` is a ``SOCK_SEQPACKET`` unix socket to the worker. The server sets the address-space
  limit (``RLIMIT_AS``, ``<memory-limit-mib>``, 0 = none) on itself once, so every child inherits
  it, then writes ``b"R"`` once its imports are done. Each request is one packet ``b"C"``
  carrying three file descriptors (``SCM_RIGHTS``): the *call* socket, the stdout pipe and the
  stderr pipe of one call.
- For each request the server forks a child at once. The worker sends these ahead of need, so
  a child is already forked and waiting when a command arrives. The child starts a new session
  (so a kill of its process group also reaches anything it spawned), points fds 1/2 at the
  pipes, keeps the call socket on fd 3 close-on-exec and closes every other inherited
  descriptor, takes a scratch ``HOME``/``TMPDIR`` under ``<scratch-root>``, writes
  ``{"pid": …}`` on the call socket and blocks reading one JSON line (the request: code, args,
  env, cwd). It runs the code, writes one JSON line with the outcome, then ``os._exit(0)``. A
  process the step forked that returns into this code exits without writing anything.
- The environment is the server's own, which the worker starts clean (no worker secrets).
- The server reaps children on ``SIGCHLD``, removes their scratch directory and writes
  ``{"exit": <code or -signal>}`` on that child's call socket before closing it, so the worker
  learns how a crashed child ended.
- When the worker's end of ``<fd>`` closes (worker exit or tool shutdown) the server kills every
  child's process group and exits.
"""

from __future__ import annotations

import array
import base64
import builtins
import dataclasses
import datetime
import decimal
import gc
import inspect
import io
import json
import math
import os
import resource
import select
import selectors
import shutil
import signal
import socket
import sys
import traceback
import types
import uuid
from typing import Any

# Imported once here so every forked child gets them for free (copy-on-write). Not asyncio:
# it (and the ssl it pulls in) grows this server by ~4.5 MiB, and every fork and exit pays for
# the larger address space — ~0.5 ms of CPU per step; an ``async def main`` imports it itself.
import collections  # noqa: F401  # isort: skip
import hashlib  # noqa: F401  # isort: skip
import re  # noqa: F401  # isort: skip
import time  # noqa: F401  # isort: skip
import urllib.parse  # noqa: F401  # isort: skip

# Run as a script, this file's directory (the tools package) is sys.path[0]. Drop it, or the
# tool modules next to it would shadow what step code imports: tools/http.py hid the standard
# library's http (so ``import urllib.request`` and requests failed), tools/nats.py hides nats-py.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

CALL_FD = 3
# The C module under ``signal`` (which loads it): its calls take and return plain ints.
_C_SIGNAL: Any = sys.modules.get("_signal", signal)
_SIGCHLD, _SIGINT, _SIGTERM = int(signal.SIGCHLD), int(signal.SIGINT), int(signal.SIGTERM)
_SIG_DFL = int(signal.SIG_DFL)
_MAX_DEPTH = 200


def _noop(signum: int, frame: Any) -> None:
    """SIGCHLD only needs to wake the selector (via the wakeup fd)."""


def _send_line(fd: int, message: dict[str, Any]) -> None:
    # MSG_DONTWAIT per call, never O_NONBLOCK on the fd: the flag would live on the open file
    # description shared with the child, which must be able to block while sending its result.
    sock = socket.socket(fileno=fd)
    try:
        sock.send(json.dumps(message).encode() + b"\n", socket.MSG_DONTWAIT)
    except OSError:
        pass  # the worker gave up on this call (or is not reading): nothing to tell
    finally:
        sock.detach()


def _write_all(sock: socket.socket, data: bytes) -> None:
    """sendall that also copes with a socket someone made non-blocking (wait, don't fail)."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            select.select([], [sock], [])
            continue
        view = view[sent:]


def _reap(children: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _remove_scratch(pid)
        fd = children.pop(pid, None)
        if fd is not None:
            _send_line(fd, {"exit": os.waitstatus_to_exitcode(status)})
            os.close(fd)


def _shutdown(children: dict[int, int]) -> None:
    for pid in list(children):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid, fd in list(children.items()):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        _remove_scratch(pid)
        os.close(fd)


_SCRATCH_ROOT = "/tmp"
_SERVER_PID = 0


def _scratch_dir(pid: int) -> str:
    """The child's scratch HOME/TMPDIR (made by the child, removed by the server on reaping)."""
    return f"{_SCRATCH_ROOT}/noetl-py-{_SERVER_PID}-{pid}"


def _remove_scratch(pid: int) -> None:
    """Most steps leave their scratch directory empty: one rmdir then, instead of rmtree's
    dozen calls (open, stat, scandir, …) for every step."""
    path = _scratch_dir(pid)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass  # the child died before making it
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _limit_memory(limit_mb: int) -> None:
    """Once, in the server: every child inherits the limit (setting it per child cost ~2.5 ms)."""
    if limit_mb <= 0:
        return
    limit = limit_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def serve(control_fd: int, memory_limit_mb: int = 0, scratch_root: str = "/tmp") -> None:
    global _SCRATCH_ROOT, _SERVER_PID
    _SCRATCH_ROOT, _SERVER_PID = scratch_root.rstrip("/"), os.getpid()
    _limit_memory(memory_limit_mb)
    control = socket.socket(fileno=control_fd)
    control.setblocking(True)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, _noop)
    # The worker's SIGINT (Ctrl-C in a terminal reaches the whole foreground group) must not kill
    # the server; the worker closes the control socket when it wants us gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children: dict[int, int] = {}
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    streams = _streams()
    # The request path once here too: what it creates on first use (caches, interned names)
    # then exists before the fork, instead of being allocated in every child (~15 page faults).
    _warm_up()
    # Objects that exist now are never collected: keeps the GC from touching (and so copying)
    # the pre-imported modules' pages in every forked child.
    gc.freeze()
    control.sendall(b"R")
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            fds = array.array("i")
            msg, ancdata, _flags, _addr = control.recvmsg(16, socket.CMSG_SPACE(3 * fds.itemsize))
            if not msg:
                _shutdown(children)
                return
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
            if len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                continue
            call_fd, out_fd, err_fd = fds
            os.set_inheritable(call_fd, False)
            pid = os.fork()
            if pid == 0:
                try:
                    _child(call_fd, out_fd, err_fd, streams)
                finally:
                    os._exit(70)
            os.close(out_fd)
            os.close(err_fd)
            children[pid] = call_fd
        _reap(children)


def _child(
    call_fd: int, out_fd: int, err_fd: int, streams: tuple[io.TextIOWrapper, io.TextIOWrapper]
) -> None:
    os.setsid()
    signal.set_wakeup_fd(-1)
    # The C module's own call: signal.signal converts to and from enums in Python, which a
    # fresh child would run for the first time (~30 page faults).
    for signum in (_SIGCHLD, _SIGINT, _SIGTERM):
        _C_SIGNAL.signal(signum, _SIG_DFL)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    # The result channel must not reach programs the step starts (os.spawn*, subprocess): they
    # would hold the call open after the step ended. (A plain os.fork() still shares it; such a
    # process exits below without writing, and the worker stops reading at the outcome.)
    if call_fd != CALL_FD:
        os.dup2(call_fd, CALL_FD, inheritable=False)
    else:
        os.set_inheritable(CALL_FD, False)
    # Other calls' sockets must not stay open in this child, or their EOF would wait for it.
    os.closerange(CALL_FD + 1, 1 << 20)
    me = os.getpid()
    scratch = _scratch_dir(me)
    try:
        os.mkdir(scratch, 0o700)
    except FileExistsError:  # left by an earlier server of the same pid that was killed
        shutil.rmtree(scratch, ignore_errors=True)
        os.mkdir(scratch, 0o700)
    os.environ["HOME"] = os.environ["TMPDIR"] = scratch  # set for the step, not read
    sys.stdout, sys.stderr = streams
    call = socket.socket(fileno=CALL_FD)
    call.setblocking(True)
    _warm_up()
    call.sendall(json.dumps({"pid": me}).encode() + b"\n")
    line = _read_line(call)
    if not line:
        os._exit(0)  # the worker went away before sending the request
    request = json.loads(line)
    outcome = _execute(request)
    if os.getpid() != me:
        os._exit(0)  # a process the step forked came back here: only the child reports
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    try:
        payload = _encode(outcome).encode()
    except Exception as exc:
        payload = json.dumps(_error_outcome(exc, "encoding the result")).encode()
    _write_all(call, payload + b"\n")
    os._exit(0)


def _text_stream(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
        line_buffering=True,
    )  # fmt: skip


def _streams() -> tuple[io.TextIOWrapper, io.TextIOWrapper]:
    """The steps' sys.stdout/sys.stderr, made once in the server: they write to fds 1 and 2 by
    number, which each child points at its own pipes, and nothing is ever written to them in the
    server. An fd the server was started without (a worker whose stderr is closed) gets
    /dev/null first, or the stream could not be made."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    return _text_stream(1), _text_stream(2)


# One encoder for every outcome: json.dumps with an argument builds a new JSONEncoder per call.
_encode = json.JSONEncoder(allow_nan=False).encode


def _read_line(sock: socket.socket) -> bytes:
    """One line (the request) from a blocking socket; b"" if it closed before a whole line.
    Plain recv calls: a makefile reader is more Python to run for the first time in every child."""
    chunks = []
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b""
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)


_WARM_SOURCE = "def main(x):\n    return [x, {'k': 1.5}]\n"
_WARM_UP: dict[str, Any] = {"code": _WARM_SOURCE, "args": {"x": "y"}}


# Compiled once, in the server: compiling it again in every child cost ~0.1 ms of CPU per step.
_WARM_CODE = compile(_WARM_SOURCE, "<warm-up>", "exec")


def _warm_up() -> None:
    """Run the request path once on a trivial step while still waiting for the real one: the
    copy-on-write page faults a first run takes (~1 ms here) then happen before, not during,
    the step."""
    json.loads(json.dumps(_WARM_UP))
    _encode(_execute(_WARM_UP, _WARM_CODE))


def _execute(request: dict[str, Any], compiled: types.CodeType | None = None) -> dict[str, Any]:
    try:
        os.environ.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
        if request.get("cwd"):
            os.chdir(request["cwd"])
        if request.get("path"):
            sys.path[:0] = [str(p) for p in request["path"]]
        args: dict[str, Any] = request.get("args") or {}
        namespace: dict[str, Any] = {
            "__name__": "__main__",
            "__builtins__": builtins,
            "__file__": request.get("filename", "<python step>"),
            "json": json,
            "os": os,
            "datetime": datetime,
            "uuid": uuid,
            "context": request.get("context", {}),
        }
        namespace.update((k, v) for k, v in args.items() if k.isidentifier())
        namespace["args"] = args
        _import_libs(namespace, request.get("libs") or [])
        before = dict(namespace)
        code = compiled
        if code is None:
            code = compile(request["code"], request.get("filename", "<python step>"), "exec")
        try:
            exec(code, namespace)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise
        return {"ok": True, "has_value": True, "data": to_jsonable(_step_value(namespace, before, args))}
    except BaseException as exc:
        return _error_outcome(exc, None)


def _import_libs(namespace: dict[str, Any], libs: list[Any]) -> None:
    """The step's ``libs``: ``[alias, module, name]`` → ``import module as alias`` (``name`` None)
    or ``from module import name as alias``. A missing module fails the step, naming it."""
    import importlib

    for alias, module, name in libs:
        imported = importlib.import_module(module)
        if name and not hasattr(imported, name):
            imported = importlib.import_module(f"{module}.{name}")  # a submodule, as ``from`` allows
            namespace[alias] = imported
            continue
        namespace[alias] = getattr(imported, name) if name else imported


def _step_value(namespace: dict[str, Any], before: dict[str, Any], args: dict[str, Any]) -> Any:
    """What noetl's worker stores: ``main()``'s return value (``None`` included) when the code
    defines ``main``; else the ``result`` the code assigned; else a summary of what it defined."""
    main = namespace.get("main")
    if callable(main) and main is not before.get("main"):
        value = main(**_accepted_kwargs(main, args, namespace.get("context")))
        if inspect.isawaitable(value):
            import asyncio

            value = asyncio.run(_await(value))
        return value
    if "result" in namespace and namespace["result"] is not before.get("result", _UNSET):
        return namespace["result"]
    defined = [k for k in namespace if not k.startswith("__") and namespace[k] is not before.get(k, _UNSET)]
    return {
        "status": "success",
        "message": "Code executed without explicit result variable",
        "locals_count": len(defined),
        "locals_keys": defined,
    }


_UNSET = object()


async def _await(value: Any) -> Any:
    return await value


def _parameters(main: Any) -> tuple[set[str], bool] | None:
    """The names ``main`` takes by keyword, and whether it takes ``**kwargs``; None if unknown.
    A plain function's code object says it directly: inspect.signature builds Parameter objects
    through a good deal of Python, whose first run in each fresh child cost page faults."""
    plain = type(main) is types.FunctionType and not hasattr(main, "__wrapped__")
    if plain and not hasattr(main, "__signature__"):
        code = main.__code__
        first = code.co_posonlyargcount
        last = code.co_argcount + code.co_kwonlyargcount
        return set(code.co_varnames[first:last]), bool(code.co_flags & inspect.CO_VARKEYWORDS)
    try:
        parameters = inspect.signature(main).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _accepted_kwargs(main: Any, args: dict[str, Any], context: Any = None) -> dict[str, Any]:
    found = _parameters(main)
    if found is None:
        return dict(args)
    names, takes_any = found
    chosen = dict(args) if takes_any else {k: v for k, v in args.items() if k in names}
    if "context" in names and "context" not in chosen:
        chosen["context"] = context if context is not None else {}  # noetl passes the render context
    if isinstance(context, dict):
        # noetl's worker fills the rest from the render context: its input, data, then top level.
        sources = [s for s in (context.get("input"), context.get("data"), context) if isinstance(s, dict)]
        for name in names - chosen.keys():
            for source in sources:
                if name in source:
                    chosen[name] = source[name]
                    break
    return chosen


def _error_outcome(exc: BaseException, during: str | None) -> dict[str, Any]:
    detail = str(exc)
    message = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if during:
        message = f"{message} (while {during})"
    # The runner's own frames say nothing to the playbook author; start at the user's code.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return {
        "ok": False,
        "error": message,
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
    }


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """Convert a user result into JSON-compatible data; unknown objects become their repr."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _depth > _MAX_DEPTH:
        return repr(value)
    if isinstance(value, dict):
        return {_key(k): to_jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [to_jsonable(v, _depth + 1) for v in items]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return int(value)
        as_float = float(value)
        return as_float if decimal.Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), _depth + 1)
    return repr(value)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    return str(key)


if __name__ == "__main__":
    if len(sys.argv) != 4 or not sys.argv[1].isdigit() or not sys.argv[2].isdigit():
        sys.exit(f"usage: {sys.argv[0]} <control-fd> <memory-limit-mib> <scratch-root>")
    serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
