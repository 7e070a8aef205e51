"""Start the real MCP test server (``mcp_server.py``) in its own process, from trio code."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from noetl_worker.testing import free_port

SERVER = Path(__file__).with_name("mcp_server.py")


async def _accepts(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def _start(mode: str) -> tuple[trio.Process, str]:
    """The server (``mode`` ``json`` or ``sse`` answers) and its MCP URL, once it accepts.

    It runs in its own process: it is asyncio (uvicorn) code, and the tests run trio."""
    port = free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(SERVER), str(port), mode], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    with trio.fail_after(60):
        while not await _accepts(port):
            if proc.poll() is not None:
                raise RuntimeError(f"MCP test server exited with {proc.returncode}")
            await trio.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}/mcp"


async def _stop(proc: trio.Process) -> None:
    proc.terminate()
    with trio.fail_after(10):
        await proc.wait()


@asynccontextmanager
async def open_mcp_server(mode: str = "json") -> AsyncIterator[str]:
    """``async with open_mcp_server() as url:`` — the server runs for the block."""
    proc, url = await _start(mode)
    try:
        yield url
    finally:
        await _stop(proc)
