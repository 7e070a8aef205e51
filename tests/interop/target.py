"""A tiny HTTP server the interop playbooks call (loopback, a thread of the test process).

Routes:
- ``GET /json``: a fixed JSON document (nested dict, list, scalars).
- ``POST /echo``: ``{"method", "received": <the JSON body>, "query": {...}}``.
- ``GET /secure``: 200 ``{"authorized": true}`` only with ``Authorization: Bearer <token>``, else 401.
- ``GET /status/<code>``: answers that status with ``{"code": <code>}``.

Beside it, a real MCP server (``tests/tools/mcp_server.py``, streamable HTTP, its own process):
``Target.mcp_url``; and a websocket echo server (trio-websocket, a thread of the test process
running its own trio loop): ``Target.ws_url`` sends every message back as it came and records it
in ``Target.ws_messages``.

Every request's path and ``Authorization`` header are recorded, so a test can prove a credential
reached the target (and then that it appears nowhere in the server's records).
"""

from __future__ import annotations

import json
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

FIXED = {"name": "target", "nested": {"x": 42, "label": "deep"}, "items": [1, 2, 3], "ok": True}


@attrs.define
class Target:
    url: str
    token: str
    mcp_url: str = ""
    ws_url: str = ""
    requests: list[tuple[str, str, str | None]] = attrs.field(factory=list)  # (method, path, auth)
    ws_messages: list[str | bytes] = attrs.field(factory=list)  # what the echo server received
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def seen(self, path: str) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.requests if r[1].split("?")[0] == path]


def _handler(target: Target) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> None:
            with target.lock:
                target.requests.append((self.command, self.path, self.headers.get("Authorization")))

        def do_GET(self) -> None:
            self._record()
            parts = urlsplit(self.path)
            if parts.path == "/json":
                self._send(200, FIXED)
            elif parts.path == "/secure":
                if self.headers.get("Authorization") == f"Bearer {target.token}":
                    self._send(200, {"authorized": True, "user": "interop"})
                else:
                    self._send(401, {"authorized": False})
            elif parts.path.startswith("/status/"):
                code = int(parts.path.rsplit("/", 1)[1])
                self._send(code, {"code": code})
            else:
                self._send(404, {"error": "no such route"})

        def do_POST(self) -> None:
            self._record()
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            self._send(200, {"method": "POST", "received": body, "query": query})

    return Handler


MCP_SERVER = Path(__file__).resolve().parent.parent / "tools" / "mcp_server.py"


@contextmanager
def _mcp_server() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(MCP_SERVER), str(port), "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the MCP server did not start (exit {proc.poll()})") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


_WsStarted = tuple[int, trio.lowlevel.TrioToken, trio.Event]


async def _serve_websocket(target: Target, started: queue.Queue[_WsStarted | BaseException]) -> None:
    async def echo(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                with target.lock:
                    target.ws_messages.append(message)
                await ws.send_message(message)
        except ConnectionClosed:
            pass

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, echo, "127.0.0.1", 0, None)
        started.put((server.port, trio.lowlevel.current_trio_token(), stop))
        await stop.wait()
        nursery.cancel_scope.cancel()


@contextmanager
def _websocket_server(target: Target) -> Iterator[str]:
    started: queue.Queue[_WsStarted | BaseException] = queue.Queue()

    def run() -> None:
        try:
            trio.run(_serve_websocket, target, started)
        except BaseException as exc:  # reported to the waiting test thread
            started.put(exc)

    thread = threading.Thread(target=run, name="interop-websocket", daemon=True)
    thread.start()
    first = started.get(timeout=30)
    if isinstance(first, BaseException):
        raise RuntimeError(f"the websocket echo server did not start: {first!r}") from first
    port, token, stop = first
    try:
        yield f"ws://127.0.0.1:{port}/"
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout=10)


@contextmanager
def open_target() -> Iterator[Target]:
    target = Target(url="", token=f"tok-{secrets.token_hex(12)}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(target))
    server.daemon_threads = True
    target.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="interop-target", daemon=True)
    thread.start()
    try:
        with _mcp_server() as mcp_url, _websocket_server(target) as ws_url:
            target.mcp_url = mcp_url
            target.ws_url = ws_url
            yield target
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
