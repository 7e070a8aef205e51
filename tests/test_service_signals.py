"""SIGTERM on a real ``python -m noetl_worker`` process: drain, deregister, exit 0."""

from __future__ import annotations

import json
import signal

import trio

from noetl_worker.testing import NatsServer, Publisher, StubServer

from .conftest import PYTHON, subprocess_env


async def test_sigterm_drains_deregisters_and_exits(
    nats: NatsServer, stub: StubServer, publisher: Publisher
) -> None:
    env = subprocess_env(
        NATS_URL=nats.url,
        NOETL_SERVER_URL=stub.url,
        WORKER_METRICS_BIND="127.0.0.1:0",
        NOETL_LOG_LEVEL="warning",
    )
    process = await trio.lowlevel.open_process([PYTHON, "-m", "noetl_worker"], env=env)
    try:
        with trio.fail_after(30):
            command = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
            await publisher.publish(publisher.subject, json.dumps(command.notification(stub.url)).encode())
            await stub.state.wait_terminal([command], timeout=30)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0
    assert len(stub.state.deregistrations) == 1
