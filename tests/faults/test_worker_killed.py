"""The worker process itself dies (SIGKILL) or runs as PID 1: its steps' processes do not survive
it, and orphans that come back to it are reaped."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from noetl_worker.testing import NatsServer, Publisher, StubServer, StubState

from ..conftest import PYTHON, poll_until, subprocess_env
from ..test_faults import wait_registered, worker_process
from .process_support import marked_processes, new_marker


# The dead worker's claim is given to another worker once its heartbeat is stale (the Python
# server's reclaim policy).
@pytest.mark.parametrize(
    "stub_state", [StubState(claim_lease_seconds=0.5, heartbeat_stale_seconds=2)], ids=["reclaim"]
)
async def test_worker_sigkilled_mid_step_leaves_no_survivor_and_the_side_effect_happens_once(
    nats: NatsServer, stub: StubServer, publisher: Publisher, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first_run = tmp_path / "first-run"
    marker = new_marker()
    # The side effect runs in a grandchild of the shell (PDEATHSIG on the shell alone would not
    # stop it), 30 s late on the first run — long after the test is over if it survived — and
    # at once on the rerun.
    script = (
        f"echo start >> {ledger}; "
        f"if [ -e {first_run} ]; then delay=0; else delay=30; touch {first_run}; fi; "
        f'sh -c "sleep $delay; echo effect >> {ledger}" & wait'
    )
    command = stub.state.enqueue_command(
        step="effect",
        tool_kind="shell",
        tool_config={"command": script, "env": {"NOETL_TEST_MARKER": marker}},
    )
    env = {"NOETL_WORKER_NATS_ACK_WAIT_SECONDS": "2"}
    with trio.fail_after(60):
        async with worker_process(stub, nats, tmp_path / "first.log", WORKER_ID="w-killed", **env) as first:
            await wait_registered(stub, "w-killed")
            await publisher.publish_command(command.notification(stub.url))
            await poll_until(lambda: len(marked_processes(marker)) >= 2)  # the grandchild sleeps
            first.kill()
            await first.wait()
        async with worker_process(stub, nats, tmp_path / "second.log", WORKER_ID="w-next", **env):
            await stub.state.wait_terminal([command], timeout=40)
    assert stub.state.command(command).status == "COMPLETED"
    assert ledger.read_text().split() == ["start", "start", "effect"]
    # Nothing of the first run is left to repeat the side effect later.
    assert marked_processes(marker) == []


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10
    )
    return probe.returncode == 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def _zombie_children(pid: int) -> list[int]:
    zombies = []
    for child in _children(pid):
        try:
            stat = Path(f"/proc/{child}/stat").read_bytes()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 :].split()[0] == b"Z":
            zombies.append(child)
    return zombies


@asynccontextmanager
async def worker_as_pid1(stub: StubServer, nats: NatsServer, log: Path) -> AsyncIterator[int]:
    """``python -m noetl_worker`` as PID 1 of a new PID namespace; yields its pid out here."""
    environment = subprocess_env(
        NATS_URL=nats.url,
        NOETL_SERVER_URL=stub.url,
        WORKER_METRICS_BIND="127.0.0.1:0",
        WORKER_ID="w-pid1",
        NOETL_LOG_FORMAT="json",
    )
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", PYTHON, "-m", "noetl_worker"]
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            argv, env=environment, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            await poll_until(lambda: bool(_children(process.pid)))
            yield _children(process.pid)[0]
        finally:
            process.kill()
            await process.wait()


# A python step whose grandchild exits at once and whose child exits without waiting for it:
# the grandchild's zombie is handed up to the nearest reaper — the worker.
ORPHAN_ZOMBIE = """
import os, time
child = os.fork()
if child == 0:
    if os.fork() == 0:
        os._exit(0)
    time.sleep(0.2)
    os._exit(0)
os.waitpid(child, 0)
result = {"forked": True}
"""


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare --pid (root or user namespaces)")
async def test_worker_as_pid1_reaps_orphans(
    nats: NatsServer, stub: StubServer, publisher: Publisher, tmp_path: Path
) -> None:
    command = stub.state.enqueue_command(
        step="orphans", tool_kind="python", tool_config={"code": ORPHAN_ZOMBIE}
    )
    with trio.fail_after(60):
        async with worker_as_pid1(stub, nats, tmp_path / "worker.log") as worker:
            await wait_registered(stub, "w-pid1")
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_terminal([command], timeout=30)
            assert stub.state.command(command).status == "COMPLETED"
            with trio.fail_after(10):
                await poll_until(lambda: not _zombie_children(worker))
