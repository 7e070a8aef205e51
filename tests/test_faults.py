"""Fault injection with real parts: nothing is lost and nothing runs twice.

Each command appends its name to a ledger file *after* its work, so a line appearing twice means
a command ran to completion twice, and a missing line means it was lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from noetl_worker.config import Settings
from noetl_worker.errors import BusError
from noetl_worker.testing import NatsServer, Publisher, StubCommand, StubServer, StubState, open_worker

from .conftest import PYTHON, poll_until, subprocess_env
from .test_integration import worker_events


def ledger_commands(
    stub: StubServer, ledger: Path, prefix: str, n: int, work: str = "true"
) -> list[StubCommand]:
    return [
        stub.state.enqueue_command(
            step=f"{prefix}{i}",
            tool_kind="shell",
            tool_config={"command": f"{work}; echo {prefix}{i} >> {ledger}"},
        )
        for i in range(n)
    ]


async def publish_all(publisher: Publisher, stub: StubServer, commands: list[StubCommand]) -> None:
    for command in commands:
        # The publisher's own connection may still be reconnecting after a nats-server restart.
        while True:
            try:
                await publisher.publish_command(command.notification(stub.url))
                break
            except BusError:
                await trio.sleep(0.1)


def assert_each_ran_once(stub: StubServer, ledger: Path, commands: list[StubCommand]) -> None:
    lines = ledger.read_text().split()
    assert sorted(lines) == sorted(c.step for c in commands), "a command was lost or ran twice"
    for command in commands:
        types = worker_events(stub, command)
        assert types.count("command.completed") == 1, (command.step, types)


async def test_nats_server_killed_and_restarted_mid_run(
    nats: NatsServer,
    stub: StubServer,
    publisher: Publisher,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger"
    settings = make_settings(WORKER_MAX_CONCURRENT="4", NOETL_WORKER_NATS_ACK_WAIT_SECONDS="2")
    with trio.fail_after(90):
        async with open_worker(settings) as worker:
            before = ledger_commands(stub, ledger, "a", 12, work="sleep 0.2")
            await publish_all(publisher, stub, before)
            await stub.state.wait_for(lambda: sum(c.terminal for c in before) >= 3, 20)

            nats.kill()
            await nats.wait()
            await poll_until(lambda: not worker.readiness()[0])
            assert worker.readiness() == (False, "nats not connected")
            await trio.sleep(1.0)  # a real outage, not a blip

            await nats.restart()
            after = ledger_commands(stub, ledger, "b", 6)
            await publish_all(publisher, stub, after)
            await stub.state.wait_terminal(before + after, timeout=60)
            await poll_until(lambda: worker.readiness()[0])
    assert_each_ran_once(stub, ledger, before + after)


@asynccontextmanager
async def worker_process(
    stub: StubServer, nats: NatsServer, log: Path, *, own_session: bool = False, **env: str
) -> AsyncIterator[trio.Process]:
    """``python -m noetl_worker`` as a real child process (SIGTERM is delivered to it for real).
    ``own_session``: in a session of its own, and on the way out killed with every process below
    it (tool processes run in sessions of their own)."""
    environment = subprocess_env(
        NATS_URL=nats.url,
        NOETL_SERVER_URL=stub.url,
        WORKER_METRICS_BIND="127.0.0.1:0",
        WORKER_HEARTBEAT_INTERVAL="1",
        NOETL_LOG_FORMAT="json",
        **env,
    )
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [PYTHON, "-m", "noetl_worker"],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                if own_session:
                    kill_tree(process.pid)
                else:
                    process.kill()
                await process.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants at once (found by walking /proc by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, found = [pid], []
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    for victim in found:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def wait_registered(stub: StubServer, worker_id: str) -> None:
    await stub.state.wait_for(lambda: any(r.get("name") == worker_id for r in stub.state.registrations), 30)


@pytest.mark.parametrize("stub_state", [StubState(claim_lease_seconds=0.5)], ids=["short-lease"])
async def test_sigterm_under_load_drains_and_exits_0(
    nats: NatsServer,
    stub: StubServer,
    publisher: Publisher,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger"
    quick = ledger_commands(stub, ledger, "quick", 6, work="sleep 0.3")
    slow = ledger_commands(stub, ledger, "slow", 2, work="sleep 8")
    with trio.fail_after(90):
        async with worker_process(
            stub,
            nats,
            tmp_path / "worker.log",
            WORKER_ID="w-sigterm",
            WORKER_MAX_CONCURRENT="4",
            NOETL_WORKER_SHUTDOWN_GRACE_SECONDS="2",
        ) as process:
            await wait_registered(stub, "w-sigterm")
            await publish_all(publisher, stub, slow + quick)
            await stub.state.wait_for(
                lambda: (
                    all("command.started" in stub.state.event_types(c) for c in slow)
                    and sum(c.terminal for c in quick) >= 2
                ),
                30,
            )
            signalled = trio.current_time()
            process.send_signal(signal.SIGTERM)
            code = await process.wait()
            drained_in = trio.current_time() - signalled
        log = (tmp_path / "worker.log").read_text()
        assert code == 0, log
        assert drained_in < 2 + 6, f"drain took {drained_in:.1f}s"
        assert "w-sigterm" in stub.state.deregistrations
        assert not any(c.terminal for c in slow), "slow commands were cancelled at the drain deadline"

        # Another worker takes over what the first one handed back (nak'd at its deadline).
        async with open_worker(make_settings(WORKER_MAX_CONCURRENT="4", WORKER_ID="w-second")):
            await stub.state.wait_terminal(quick + slow, timeout=40)
    assert_each_ran_once(stub, ledger, quick + slow)


async def test_several_worker_processes_on_one_durable_consumer_run_each_command_once(
    nats: NatsServer,
    stub: StubServer,
    publisher: Publisher,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger"
    commands = ledger_commands(stub, ledger, "c", 45)
    ids = [f"w-{i}" for i in range(3)]
    with trio.fail_after(120):
        async with (
            worker_process(
                stub, nats, tmp_path / "w0.log", WORKER_ID=ids[0], WORKER_MAX_CONCURRENT="2"
            ) as p0,
            worker_process(
                stub, nats, tmp_path / "w1.log", WORKER_ID=ids[1], WORKER_MAX_CONCURRENT="2"
            ) as p1,
            worker_process(
                stub, nats, tmp_path / "w2.log", WORKER_ID=ids[2], WORKER_MAX_CONCURRENT="2"
            ) as p2,
        ):
            for worker_id in ids:
                await wait_registered(stub, worker_id)
            await publish_all(publisher, stub, commands)
            await stub.state.wait_terminal(commands, timeout=90)
            for process in (p0, p1, p2):
                process.send_signal(signal.SIGTERM)
            codes = [await p.wait() for p in (p0, p1, p2)]
    assert codes == [0, 0, 0]
    assert_each_ran_once(stub, ledger, commands)
    workers = {stub.state.command(c.event_id).worker_id for c in commands}  # type: ignore[union-attr]
    assert workers <= set(ids)


async def test_ctrl_c_on_a_local_run_drains_and_exits_0_quickly(
    nats: NatsServer, stub: StubServer, publisher: Publisher, tmp_path: Path
) -> None:
    """SIGINT (Ctrl-C in a terminal) takes the same drain path as SIGTERM, without a long wait."""
    command = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
    with trio.fail_after(60):
        async with worker_process(stub, nats, tmp_path / "worker.log", WORKER_ID="w-int") as process:
            await wait_registered(stub, "w-int")
            await publish_all(publisher, stub, [command])
            await stub.state.wait_terminal([command], timeout=30)
            interrupted = trio.current_time()
            process.send_signal(signal.SIGINT)
            code = await process.wait()
            took = trio.current_time() - interrupted
    assert code == 0, (tmp_path / "worker.log").read_text()
    assert stub.state.deregistrations == ["w-int"]
    assert took < 3, f"an idle worker took {took:.1f}s to stop"
