"""The embedded nats-server launcher: real process, real TCP, kill and restart on one port."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
import trio

from noetl_worker.testing import NatsServer, NatsServerError, find_nats_server, open_nats_server


async def read_info(server: NatsServer) -> dict[str, object]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        line = await stream.receive_some(8192)
    assert line.startswith(b"INFO ")
    info: dict[str, object] = json.loads(line[5:].split(b"\r\n")[0])
    return info


def test_binary_comes_from_the_wheel_next_to_the_interpreter() -> None:
    assert find_nats_server() == Path(sys.executable).parent / "nats-server"


async def test_started_server_speaks_nats_with_jetstream_and_monitoring() -> None:
    with trio.fail_after(20):
        async with open_nats_server(monitor=True) as server:
            assert server.url == f"nats://127.0.0.1:{server.port}"
            info = await read_info(server)
            assert info["port"] == server.port
            assert info["jetstream"] is True
            assert server.monitor_url is not None
            async with httpx.AsyncClient() as client:
                jsz = await client.get(f"{server.monitor_url}/jsz")
            assert jsz.status_code == 200
            assert jsz.json()["config"]["store_dir"].startswith(str(server.store_dir))
            store_root = server.store_dir.parent if server.store_dir else None
        assert server.process is not None and server.process.returncode is not None
        assert store_root is not None and not store_root.exists()


async def test_kill_then_restart_on_the_same_port_and_store() -> None:
    with trio.fail_after(30):
        async with open_nats_server() as server:
            port, store = server.port, server.store_dir
            server.kill()
            assert await server.wait() != 0
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            await server.restart()
            assert (server.port, server.store_dir) == (port, store)
            assert (await read_info(server))["port"] == port
            # restart() of a running server also keeps the port.
            await server.restart()
            assert (await read_info(server))["port"] == port


async def test_a_server_that_cannot_start_is_reported_with_its_log() -> None:
    with trio.fail_after(20):
        async with open_nats_server() as first:
            clash = NatsServer(port=first.port, ready_timeout=5)
            with pytest.raises(NatsServerError, match="exited"):
                await clash.start()
            await clash.stop()
