"""Soak: a steady command rate for a long time; RSS and open fds of the worker sampled; growth
reported.

Run from the repository root:

    .venv/bin/python bench/soak.py                      # 30 minutes at 50 commands/s
    .venv/bin/python bench/soak.py --minutes 1 --rate 20   # a smoke run

The bench process runs an embedded nats-server and the stub control plane; the worker is a
separate process (``python -m noetl_worker``). The mix: mostly ``noop``, some ``shell`` and
``python`` steps (processes and pipes), and a few poison notifications (bad JSON, a Unicode-digit
id, a foreign server_url) that must be terminated without cost. RSS and the number of open fds
(``/proc/<pid>/fd``) are sampled every ``--sample`` seconds; the report compares the first sample
after the warm-up (the first 10% of the run, at least 20 s) with the last, and gives the slope of
a least-squares line over the samples after the warm-up. The stub forgets finished commands as it
goes, so the bench process itself stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from procstat import rss_mib

from noetl_worker.testing import StubCommand, StubState, open_nats_server, open_publisher, open_stub_server

ROOT = Path(__file__).resolve().parent.parent


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def make_command(state: StubState, rng: random.Random) -> StubCommand:
    pick = rng.random()
    if pick < 0.1:
        return state.enqueue_command(step="sh", tool_kind="shell", tool_config={"command": "echo soak"})
    if pick < 0.2:
        code = "def main(n):\n    return {'n': n * 2}\n"
        return state.enqueue_command(
            step="py", tool_kind="python", tool_config={"code": code}, input={"n": rng.randint(0, 99)}
        )
    return state.enqueue_command(step="noop", tool_kind="noop", tool_config={})


POISON = [
    b"{not json",
    json.dumps({"execution_id": 1, "event_id": "\u00b2", "command_id": "c", "step": "s"}).encode(),
    json.dumps(
        {"execution_id": 1, "event_id": 7, "command_id": "c", "step": "s", "server_url": "http://x.invalid"}
    ).encode(),
]


async def publish_batch(pub: Any, payloads: list[bytes]) -> None:
    """One bridge crossing per batch (publish_async, then wait for the stream's acks): a publish
    awaited one by one would cap the rate below 50/s on a busy machine."""
    if not payloads:
        return
    js = pub.bus.js

    async def inner() -> None:
        import asyncio

        futures = [await js.publish_async(pub.subject, data) for data in payloads]
        await asyncio.gather(*futures)

    await trio_asyncio.aio_as_trio(inner)()


def forget_finished(state: StubState) -> None:
    """Drop finished commands and the logs from the stub (a bench over hours would fill it)."""
    for event_id in [e for e, c in state.commands.items() if c.terminal]:
        command = state.commands.pop(event_id)
        state._by_command_id.pop(str(command.command_id), None)
    state.events.clear()
    state.request_log.clear()
    state._event_index.clear()
    state.results.clear()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    state = StubState()
    rng = random.Random(args.seed)
    samples: list[tuple[float, float, int]] = []
    published = finished = poison = 0
    async with (
        open_nats_server() as nats,
        open_stub_server(state) as stub,
        open_publisher(nats.url) as pub,
        trio.open_nursery() as nursery,
    ):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        env.update(
            NATS_URL=nats.url,
            NOETL_SERVER_URL=stub.url,
            WORKER_MAX_CONCURRENT=str(args.concurrency),
            WORKER_METRICS_BIND="127.0.0.1:0",
            NOETL_LOG_LEVEL="error",
        )
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-worker-{os.getpid()}.log"
        log_file = log_path.open("wb")
        worker = await trio.lowlevel.open_process(
            [sys.executable, "-m", "noetl_worker"], env=env, cwd=ROOT, stdout=log_file, stderr=log_file
        )
        nursery.start_soon(worker.wait)
        try:
            warm = [make_command(state, rng) for _ in range(20)]
            for command in warm:
                await pub.publish_command(command.notification(stub.url))
            await state.wait_terminal(warm, timeout=120)

            start = time.monotonic()
            end = start + args.minutes * 60
            next_sample = start
            tick = 0.1
            outstanding: list[StubCommand] = []
            while time.monotonic() < end:
                per_tick = args.rate * tick
                count = int(per_tick) + (1 if rng.random() < per_tick - int(per_tick) else 0)
                batch: list[bytes] = []
                for _ in range(count):
                    if rng.random() < 0.02:
                        batch.append(rng.choice(POISON))
                        poison += 1
                        continue
                    command = make_command(state, rng)
                    batch.append(json.dumps(command.notification(stub.url)).encode())
                    outstanding.append(command)
                    published += 1
                await publish_batch(pub, batch)
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((now - start, rss_mib(worker.pid), open_fds(worker.pid)))
                    next_sample += args.sample
                    done = [c for c in outstanding if c.terminal]
                    finished += len(done)
                    outstanding = [c for c in outstanding if not c.terminal]
                    forget_finished(state)
                await trio.sleep(max(0.0, tick - (time.monotonic() - now)))
            elapsed = time.monotonic() - start
            await state.wait_for(lambda: all(c.terminal for c in outstanding), 120)
            finished += len(outstanding)
            samples.append((time.monotonic() - start, rss_mib(worker.pid), open_fds(worker.pid)))
            alive = worker.returncode is None
        finally:
            if worker.returncode is None:
                worker.terminate()
            nursery.cancel_scope.cancel()
            log_file.close()
    warmup = max(20.0, 0.1 * args.minutes * 60)
    steady = [s for s in samples if s[0] >= warmup] or samples[-2:]
    first, last = steady[0], steady[-1]
    return {
        "minutes": args.minutes,
        "rate_per_s": args.rate,
        "concurrency": args.concurrency,
        "commands": published,
        "achieved_rate_per_s": round((published + poison) / elapsed, 1),
        "completed": finished,
        "poison_published": poison,
        "worker_alive_at_end": alive,
        "rss_mib_first": round(first[1], 1),
        "rss_mib_last": round(last[1], 1),
        "rss_mib_growth": round(last[1] - first[1], 1),
        "rss_mib_per_minute": round(slope_per_minute([(t, r) for t, r, _ in steady]), 3),
        "fds_first": first[2],
        "fds_last": last[2],
        "fds_per_minute": round(slope_per_minute([(t, float(f)) for t, _, f in steady]), 3),
        "samples": len(samples),
        "load_average": round(os.getloadavg()[0], 2),
        "worker_log": str(log_path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=50.0, help="commands per second")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = trio.run(run, args)
    print(json.dumps(result, indent=2))
    ok = (
        result["worker_alive_at_end"]
        and result["completed"] == result["commands"]
        and result["fds_last"] - result["fds_first"] <= 5
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
