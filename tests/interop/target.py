"""A tiny HTTP server the interop playbooks call (loopback, a thread of the test process).

Routes:
- ``GET /json``: a fixed JSON document (nested dict, list, scalars).
- ``POST /echo``: ``{"method", "received": <the JSON body>, "query": {...}}``.
- ``GET /secure``: 200 ``{"authorized": true}`` only with ``Authorization: Bearer <token>``, else 401.
- ``GET /status/<code>``: answers that status with ``{"code": <code>}``.

Beside it, a real MCP server (``tests/tools/mcp_server.py``, streamable HTTP, its own process):
``Target.mcp_url``.

Every request's path and ``Authorization`` header are recorded, so a test can prove a credential
reached the target (and then that it appears nowhere in the server's records).
"""

from __future__ import annotations

import json
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

FIXED = {"name": "target", "nested": {"x": 42, "label": "deep"}, "items": [1, 2, 3], "ok": True}


@attrs.define
class Target:
    url: str
    token: str
    mcp_url: str = ""
    requests: list[tuple[str, str, str | None]] = attrs.field(factory=list)  # (method, path, auth)
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


@contextmanager
def open_target() -> Iterator[Target]:
    target = Target(url="", token=f"tok-{secrets.token_hex(12)}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(target))
    server.daemon_threads = True
    target.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="interop-target", daemon=True)
    thread.start()
    try:
        with _mcp_server() as mcp_url:
            target.mcp_url = mcp_url
            yield target
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
