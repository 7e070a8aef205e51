"""The worker side of the ``python`` tool's fork server (the child side is ``_pyrunner.py``).

One long-lived helper process per interpreter pre-imports the standard library once and forks a
fresh child per call, so a call costs a ``fork`` instead of an interpreter start, and user code
never leaks state into the next call. The fork happens *ahead* of the call: the server keeps
spare children forked and waiting (one per execution slot that has run a python step, grown on
demand), and each finished call orders its replacement, so the fork and the child's set-up are
off the critical path. The address-space limit is set once on the server, which the children
inherit. Crashes, infinite loops and memory bombs stay in the child: once a call has its outcome,
or is cancelled (deadline, shutdown), the worker kills the child's process group, so nothing the
step started outlives it; a cancelled call waits, shielded and bounded, until the server has
reaped the child.

All I/O here is trio I/O on non-blocking descriptors; nothing blocks the trio thread.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from ..errors import ToolConfigError, ToolError

__all__ = ["CallCapture", "ForkServer", "ForkServerHandle"]

RUNNER = str(Path(__file__).with_name("_pyrunner.py"))
_START_TIMEOUT = 30.0
# Bounded wait after a cancelled call's child was killed, for the server's exit report.
_REAP_GRACE = 5.0
# Spare children never exceed this many, whatever the concurrency.
MAX_SPARES = 64


class ServerGone(ToolError):
    """The fork server is not running any more (the caller starts a new one)."""


@attrs.define(eq=False)
class CallCapture:
    """What one call produced; filled while it runs, so a timed-out call still has its output."""

    max_output_bytes: int
    pid: int | None = None
    outcome: dict[str, Any] | None = None
    exit_code: int | None = None
    stdout: bytearray = attrs.field(factory=bytearray)
    stderr: bytearray = attrs.field(factory=bytearray)
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    def text(self, which: str) -> str:
        buf: bytearray = getattr(self, which)
        dropped: int = getattr(self, f"{which}_dropped")
        text = buf.decode("utf-8", errors="replace")
        if dropped:
            text += f"\n[… {dropped} more bytes of {which} dropped]"
        return text


class _LineReader:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._scanned = 0
        self._eof = False

    async def readline(self) -> bytes | None:
        """The next line without its newline, or ``None`` at end of stream."""
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if self._eof:
                return None
            try:
                chunk = await self._sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
            self._buf += chunk


@attrs.define(eq=False)
class _Spare:
    """A child forked and waiting for its request: the worker's ends of its call and pipes."""

    sock: trio.socket.SocketType
    out: int  # non-blocking read ends of the child's stdout / stderr pipes
    err: int
    reader: _LineReader

    @classmethod
    def wrap(cls, sock: socket.socket, out_r: int, err_r: int) -> _Spare:
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        tsock = trio.socket.from_stdlib_socket(sock)
        return cls(tsock, out_r, err_r, _LineReader(tsock))

    def close(self) -> None:
        self.sock.close()  # a child still waiting reads EOF and exits
        for fd in (self.out, self.err):
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


@attrs.define(eq=False)
class ForkServer:
    """One running fork-server process, its control socket and its spare children."""

    python: str
    process: trio.Process
    control: trio.socket.SocketType
    _raw: socket.socket  # the same socket, for sends that must not wait
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _spares: deque[_Spare] = attrs.field(factory=deque)
    _busy: int = 0
    _peak: int = 1

    @classmethod
    async def start(
        cls, python: str, *, memory_limit_mb: int = 0, env: Mapping[str, str] | None = None
    ) -> ForkServer:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [python, RUNNER, str(child.fileno()), str(memory_limit_mb), tempfile.gettempdir()]
        try:
            process = await trio.lowlevel.open_process(
                argv,
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=None if env is None else dict(env),
            )
        except OSError as exc:
            parent.close()
            raise ToolConfigError("python", "python", f"cannot start interpreter {python!r}: {exc}") from exc
        finally:
            child.close()
        control = trio.socket.from_stdlib_socket(parent)
        server = cls(python=python, process=process, control=control, raw=parent)
        try:
            with trio.fail_after(_START_TIMEOUT):
                ready = await control.recv(1)
        except trio.TooSlowError:
            ready = b""
        if ready != b"R":
            await server.aclose()
            raise ToolError(f"python fork server ({python}) failed to start")
        server._order_spare()
        return server

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def spares(self) -> int:
        return len(self._spares)

    def _order_spare(self) -> bool:
        """Have the server fork one more waiting child now. Never blocks: if the control socket
        is busy or gone the order is skipped (False) and a later call forks on demand."""
        if not self.alive or self._send_lock.locked():
            return False
        try:
            self._spares.append(_open_call(lambda fds: self._raw.sendmsg([b"C"], [_rights(fds)])))
        except OSError:
            return False
        return True

    async def _fork_now(self) -> _Spare:
        """A child for a call that found no spare (the first calls at a new concurrency)."""
        call_parent, call_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            async with self._send_lock:
                await self.control.sendmsg([b"C"], [_rights((call_child.fileno(), out_w, err_w))])
        except OSError as exc:
            _close_all(call_parent, out_r, err_r)
            raise ServerGone(f"python fork server is gone: {exc}") from exc
        finally:
            _close_all(call_child, out_w, err_w)
        return _Spare.wrap(call_parent, out_r, err_r)

    async def call(self, request: bytes, capture: CallCapture) -> None:
        """Run one request in a waiting child, filling ``capture``; kills the child's process
        group once the outcome is in, or if cancelled."""
        spare = self._spares.popleft() if self._spares else await self._fork_now()
        self._busy += 1
        self._peak = min(MAX_SPARES, max(self._peak, self._busy))
        try:
            await _run(spare, request, capture)
        finally:
            self._busy -= 1
            # Replacements are ordered once the outcome is in (after this task hands the result
            # on), never while a step runs: one spare per slot that has run a python step, plus
            # one so back-to-back steps find one ready.
            trio.lowlevel.current_trio_token().run_sync_soon(self._refill)

    def _refill(self) -> None:
        while len(self._spares) + self._busy <= self._peak and self._order_spare():
            pass

    async def aclose(self) -> None:
        """Close the control socket (the server then kills its children and exits)."""
        spares, self._spares = list(self._spares), deque()
        for spare in spares:
            spare.close()
        self.control.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_REAP_GRACE):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


@attrs.define(eq=False)
class ForkServerHandle:
    """The shared resource: the current fork server of one interpreter, restarted when it died."""

    python: str
    memory_limit_mb: int = 0
    env: Mapping[str, str] | None = None  # the children's base environment (None: inherit)
    _server: ForkServer | None = None
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def server(self) -> ForkServer:
        server = self._server
        if server is not None and server.alive:
            return server
        async with self._lock:
            if self._server is not None and not self._server.alive:
                dead, self._server = self._server, None
                await dead.aclose()
            if self._server is None:
                self._server = await ForkServer.start(
                    self.python, memory_limit_mb=self.memory_limit_mb, env=self.env
                )
            return self._server

    async def call(self, request: bytes, capture: CallCapture) -> None:
        server = await self.server()
        try:
            await server.call(request, capture)
        except ServerGone:
            # It died between the liveness check and the send: one fresh start, then give up.
            if server.alive:
                server.process.kill()
            server = await self.server()
            await server.call(request, capture)

    async def aclose(self) -> None:
        async with self._lock:
            server, self._server = self._server, None
            if server is not None:
                await server.aclose()


def _open_call(send: Callable[[tuple[int, int, int]], object]) -> _Spare:
    """Make one call's socket and pipes and ``send`` the child's ends (then closed here)."""
    call_parent, call_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        send((call_child.fileno(), out_w, err_w))
    except BaseException:
        _close_all(call_parent, out_r, err_r)
        raise
    finally:
        _close_all(call_child, out_w, err_w)
    return _Spare.wrap(call_parent, out_r, err_r)


def _rights(fds: tuple[int, ...]) -> tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def _close_all(sock: socket.socket, *fds: int) -> None:
    sock.close()
    for fd in fds:
        os.close(fd)


async def _run(spare: _Spare, request: bytes, capture: CallCapture) -> None:
    reader = spare.reader
    finished = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, spare.out, capture, "stdout")
            nursery.start_soon(_drain, spare.err, capture, "stderr")
            await _send_all(spare.sock, request)
            # Stop at the outcome (or the exit report of a crash), never wait for EOF: a process
            # the step forked may hold the socket open.
            while (line := await reader.readline()) is not None:
                if _record(capture, line) in ("outcome", "exit"):
                    break
            finished = True
            # Kill what the step left behind; whatever the child printed before its outcome is
            # already in the pipes (it flushes first), so read that and stop the drains.
            _kill_group(capture.pid)
            nursery.cancel_scope.cancel()
        _read_rest(spare.out, capture, "stdout")
        _read_rest(spare.err, capture, "stderr")
    finally:
        if not finished:
            with trio.CancelScope(shield=True), trio.move_on_after(_REAP_GRACE):
                while capture.pid is None:
                    line = await reader.readline()
                    if line is None:
                        break
                    _record(capture, line)
                _kill_group(capture.pid)
                # Wait for the server's exit report: the child is then reaped, not a zombie;
                # and for the pipes to close: what the step started is gone too.
                while (line := await reader.readline()) is not None:
                    if _record(capture, line) == "exit":
                        break
                await _drain(spare.out, capture, "stdout")
                await _drain(spare.err, capture, "stderr")
        spare.close()


def _record(capture: CallCapture, line: bytes) -> str | None:
    """Store one message of the child's; says which kind it was (pid, exit, outcome)."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    if "pid" in message and len(message) == 1:
        capture.pid = int(message["pid"])
        return "pid"
    if "exit" in message and len(message) == 1:
        capture.exit_code = int(message["exit"])
        return "exit"
    capture.outcome = message
    return "outcome"


def _read_rest(fd: int, capture: CallCapture, which: str) -> None:
    """What is left in a pipe now, without waiting (its writers may live on)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return
        if not chunk:
            return
        _keep(capture, which, chunk)


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _drain(fd: int, capture: CallCapture, which: str) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        if not chunk:
            return
        _keep(capture, which, chunk)


def _keep(capture: CallCapture, which: str, chunk: bytes) -> None:
    buf: bytearray = getattr(capture, which)
    room = capture.max_output_bytes - len(buf)
    if room > 0:
        buf += chunk[:room]
    if len(chunk) > room:
        dropped = len(chunk) - max(room, 0)
        setattr(capture, f"{which}_dropped", getattr(capture, f"{which}_dropped") + dropped)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            sent = await sock.send(view)
            view = view[sent:]
    except OSError:
        pass  # the child died before reading its request; its exit status tells the story
