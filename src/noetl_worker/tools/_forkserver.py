"""The worker side of the ``python`` tool's fork server (the child side is ``_pyrunner.py``).

One long-lived helper process per interpreter pre-imports the standard library once and forks a
fresh child per call, so a call costs a ``fork`` instead of an interpreter start, and user code
never leaks state into the next call. Crashes, infinite loops and memory bombs stay in that child:
the worker kills the child's process group when a call is cancelled (deadline, shutdown) and
waits, shielded and bounded, until the server has reaped it, so no process is left behind.

All I/O here is trio I/O on non-blocking descriptors; nothing blocks the trio thread.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import attrs
import trio

from ..errors import ToolConfigError, ToolError

__all__ = ["CallCapture", "ForkServer", "ForkServerHandle"]

RUNNER = str(Path(__file__).with_name("_pyrunner.py"))
_START_TIMEOUT = 30.0
# Bounded waits after the child is gone / was killed: a grandchild that escaped the process
# group could hold the output pipes open forever.
_DRAIN_GRACE = 1.0
_REAP_GRACE = 5.0


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
class ForkServer:
    """One running fork-server process and its control socket."""

    python: str
    process: trio.Process
    control: trio.socket.SocketType
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)

    @classmethod
    async def start(cls, python: str) -> ForkServer:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await trio.lowlevel.open_process(
                [python, RUNNER, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent.close()
            raise ToolConfigError("python", "python", f"cannot start interpreter {python!r}: {exc}") from exc
        finally:
            child.close()
        control = trio.socket.from_stdlib_socket(parent)
        server = cls(python=python, process=process, control=control)
        try:
            with trio.fail_after(_START_TIMEOUT):
                ready = await control.recv(1)
        except trio.TooSlowError:
            ready = b""
        if ready != b"R":
            await server.aclose()
            raise ToolError(f"python fork server ({python}) failed to start")
        return server

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def call(self, request: bytes, capture: CallCapture) -> None:
        """Run one request in a fresh child, filling ``capture``; kills the child if cancelled."""
        call_parent, call_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            async with self._send_lock:
                await self.control.sendmsg(
                    [b"C"],
                    [
                        (
                            socket.SOL_SOCKET,
                            socket.SCM_RIGHTS,
                            array.array("i", [call_child.fileno(), out_w, err_w]),
                        )
                    ],
                )
        except OSError as exc:
            call_parent.close()
            os.close(out_r)
            os.close(err_r)
            raise ServerGone(f"python fork server is gone: {exc}") from exc
        finally:
            call_child.close()
            os.close(out_w)
            os.close(err_w)
        sock = trio.socket.from_stdlib_socket(call_parent)
        out_stream = trio.lowlevel.FdStream(out_r)
        err_stream = trio.lowlevel.FdStream(err_r)
        reader = _LineReader(sock)
        finished = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, out_stream, capture, "stdout")
                nursery.start_soon(_drain, err_stream, capture, "stderr")
                nursery.start_soon(_send_all, sock, request)
                while (line := await reader.readline()) is not None:
                    _record(capture, line)
                finished = True
                # The child is gone; stragglers it spawned would hold the pipes open.
                _kill_group(capture.pid)
                nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_GRACE
        finally:
            if not finished:
                with trio.CancelScope(shield=True), trio.move_on_after(_REAP_GRACE):
                    while capture.pid is None:
                        line = await reader.readline()
                        if line is None:
                            break
                        _record(capture, line)
                    _kill_group(capture.pid)
                    # Wait for the server's exit report: the child is then reaped, not a zombie.
                    while (line := await reader.readline()) is not None:
                        _record(capture, line)
            sock.close()
            with trio.CancelScope(shield=True):
                await out_stream.aclose()
                await err_stream.aclose()

    async def aclose(self) -> None:
        """Close the control socket (the server then kills its children and exits)."""
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
                self._server = await ForkServer.start(self.python)
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


def _record(capture: CallCapture, line: bytes) -> None:
    try:
        message = json.loads(line)
    except ValueError:
        return
    if not isinstance(message, dict):
        return
    if "pid" in message and len(message) == 1:
        capture.pid = int(message["pid"])
    elif "exit" in message and len(message) == 1:
        capture.exit_code = int(message["exit"])
    else:
        capture.outcome = message


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _drain(stream: trio.lowlevel.FdStream, capture: CallCapture, which: str) -> None:
    buf: bytearray = getattr(capture, which)
    while chunk := await stream.receive_some(65536):
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
