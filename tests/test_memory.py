"""The worker's heap: settled (start-up garbage freed, the rest frozen) once the worker process
is ready; freed memory given back once it has gone quiet, once per quiet period."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from noetl_worker import memory
from noetl_worker.testing import NatsServer, Publisher, StubServer

from .conftest import PYTHON, subprocess_env
from .test_faults import publish_all, wait_registered, worker_process

# Run in a child interpreter: freezing pytest's own heap would outlive the test.
SETTLE = """
import gc, json, weakref
from noetl_worker import memory

class Node:
    pass

cycle = Node(); cycle.me = cycle                 # start-up garbage: only a collection frees it
gone = weakref.ref(cycle); del cycle
kept = {"long": ["lived"]}
gc.disable()                                     # nothing collects before settle() does
before = len(gc.get_objects())
frozen = memory.settle()
after = gc.get_objects()
print(json.dumps({
    "garbage_freed": gone() is None,
    "frozen": frozen,
    "scanned_before": before,
    "scanned_after": len(after),
    "kept_frozen": not any(o is kept for o in after),
}))
"""


def test_settle_frees_start_up_garbage_and_takes_the_rest_out_of_the_collectors_reach() -> None:
    out = subprocess.run(
        [PYTHON, "-c", SETTLE], env=subprocess_env(), capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(out.stdout)
    assert result["garbage_freed"], "a cycle left by start-up was frozen instead of freed"
    assert result["kept_frozen"], "a live start-up object is still scanned by every full collection"
    assert result["frozen"] >= 0.9 * result["scanned_before"] - 50
    assert result["scanned_after"] < 50, result


async def test_the_worker_process_settles_its_heap_once_when_ready(
    nats: NatsServer, stub: StubServer, publisher: Publisher, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    command = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
    with trio.fail_after(60):
        async with worker_process(stub, nats, log, WORKER_ID="w-settle", NOETL_LOG_LEVEL="debug") as process:
            await wait_registered(stub, "w-settle")
            await publish_all(publisher, stub, [command])
            await stub.state.wait_terminal([command], timeout=30)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    settled = [line for line in lines if line["msg"].startswith("start-up heap settled")]
    assert len(settled) == 1, log.read_text()[-3000:]
    assert int(settled[0]["msg"].split(": ")[1].split()[0]) > 10_000  # the imported modules' objects


async def test_trims_once_per_quiet_stretch_never_while_busy(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    trims: list[float] = []
    monkeypatch.setattr(memory, "trim", lambda: trims.append(trio.current_time()))
    started, running = 0, 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory.trim_when_quiet, lambda: started, lambda: running, 5.0)
        await trio.sleep(12)  # start-up, then quiet: one trim, not one per poll
        assert len(trims) == 1
        for _ in range(6):  # steady work: a command starts between every two polls
            started += 1
            await trio.sleep(4)
        assert len(trims) == 1
        running = 1  # a long command: nothing new starts, but it still holds its memory
        await trio.sleep(20)
        assert len(trims) == 1
        running = 0
        await trio.sleep(11)  # quiet again: one more trim
        assert len(trims) == 2
        nursery.cancel_scope.cancel()


def test_trim_runs_here() -> None:
    memory.trim()  # glibc's malloc_trim where present; must never raise
