"""Worker throughput, CPU per command, publish→claim latency and idle cost (targets in docs/performance.md).

Run from the repository root:

    .venv/bin/python bench/throughput.py [--commands 500] [--concurrency 16] [--rate 20]

The bench process runs an embedded nats-server and the stub control plane; the worker runs as a
separate process (``python -m noetl_worker``) so its CPU (utime + stime from /proc) is measured
alone. Phases:

(a) idle: RSS and CPU of the ready worker over 10 s;
(b) burst: N no-op commands published at once (one bridge crossing, publish_async + gather);
    commands/s and worker CPU ms per command until every command is terminal in the stub;
(c) steady: ``--rate`` commands/s for ~10 s; publish→claim latency = the stub's receive time of
    the claim request minus the time just before the publish (one clock: the bench process);
(d) the floor: ``bench/bare_loop.py`` (nats-py fetch(1) + httpx claim + one /api/events/batch
    + ack, same concurrency) against the same NATS and stub, on the same durable consumer.

The stub's HTTP server and nats-server share the machine with the worker; the stub's CPU is not
counted, but it competes for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from noetl_worker.testing import (
    StubCommand,
    StubState,
    open_nats_server,
    open_publisher,
    open_stub_server,
)

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (own threads included, children excluded)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


def enqueue(state: StubState, n: int) -> list[StubCommand]:
    return [state.enqueue_command(step="bench", tool_kind="noop", tool_config={}) for _ in range(n)]


async def publish_all(pub: Any, subject: str, payloads: list[bytes]) -> None:
    """Publish every payload with one bridge crossing (publish_async, then wait for the acks)."""
    js = pub.bus.js

    async def inner() -> None:
        import asyncio

        futures = [await js.publish_async(subject, data) for data in payloads]
        await asyncio.gather(*futures)

    await trio_asyncio.aio_as_trio(inner)()


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


async def run(args: argparse.Namespace) -> None:
    state = StubState()
    out: dict[str, Any] = {}
    async with (
        open_nats_server() as nats,
        open_stub_server(state) as stub,
        open_publisher(nats.url) as pub,
        trio.open_nursery() as nursery,
    ):
        note = lambda c: json.dumps(c.notification(stub.url)).encode()  # noqa: E731
        env = child_env(
            NATS_URL=nats.url,
            NOETL_SERVER_URL=stub.url,
            WORKER_MAX_CONCURRENT=str(args.concurrency),
            WORKER_METRICS_BIND="127.0.0.1:0",
            NOETL_LOG_LEVEL=os.environ.get("BENCH_WORKER_LOG", "warning"),
        )
        command = [sys.executable, "-m", "noetl_worker"]
        worker = await nursery.start(partial_process(command, env))
        pid = worker.pid
        # Ready = a warm-up command went all the way through (imports done, pool connections up).
        warm = enqueue(state, 2 * args.concurrency)
        t0 = time.monotonic()
        await publish_all(pub, pub.subject, [note(c) for c in warm])
        await state.wait_terminal(warm, timeout=60)
        out["ready_s"] = time.monotonic() - t0
        await trio.sleep(2)  # let start-up stragglers (first heartbeat, lag poll) settle

        # (a) idle
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        await trio.sleep(args.idle)
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        out["idle_rss_mib"] = rss_mib(pid)
        out["idle_millicores"] = 1000 * (cpu1 - cpu0) / (wall1 - wall0)

        # (b) burst
        burst = enqueue(state, args.commands)
        payloads = [note(c) for c in burst]
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        await publish_all(pub, pub.subject, payloads)
        published = time.monotonic()
        await state.wait_terminal(burst, timeout=120)
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        out["burst_publish_s"] = published - wall0
        out["burst_wall_s"] = wall1 - wall0
        out["burst_cmd_per_s"] = args.commands / (wall1 - wall0)
        out["burst_cpu_ms_per_cmd"] = 1000 * (cpu1 - cpu0) / args.commands
        out["rss_after_burst_mib"] = rss_mib(pid)

        # (c) steady rate
        steady_n = int(args.rate * args.steady)
        steady = enqueue(state, steady_n)
        published_at: dict[str, float] = {}
        start = trio.current_time()
        cpu0 = cpu_seconds(pid)
        for i, c in enumerate(steady):
            await trio.sleep_until(start + i / args.rate)
            published_at[f"/api/commands/{c.event_id}/claim"] = time.monotonic()
            await pub.publish(pub.subject, note(c))
        await state.wait_terminal(steady, timeout=60)
        cpu1 = cpu_seconds(pid)
        claims = {r.path: r.received_at for r in state.request_log if r.path in published_at}
        latencies = [1000 * (claims[p] - t) for p, t in published_at.items() if p in claims]
        out["steady_n"] = len(latencies)
        out["steady_p50_ms"] = percentile(latencies, 50)
        out["steady_p99_ms"] = percentile(latencies, 99)
        out["steady_mean_ms"] = statistics.fmean(latencies)
        out["steady_cpu_ms_per_cmd"] = 1000 * (cpu1 - cpu0) / steady_n

        stopping = time.monotonic()
        worker.terminate()
        with trio.fail_after(90):
            await worker.wait()
        out["worker_exit"] = worker.returncode
        out["worker_exit_s"] = time.monotonic() - stopping

        # (d) the floor: same calls in a bare loop, same consumer, same concurrency
        if not args.no_floor:
            floor = enqueue(state, args.commands)
            bare = await nursery.start(
                partial_process(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "bare_loop.py"),
                        nats.url,
                        stub.url,
                        str(args.commands),
                        str(args.concurrency),
                    ],
                    child_env(),
                )
            )
            await trio.sleep(1.0)  # interpreter start-up and connect, outside the measurement
            cpu0, wall0 = cpu_seconds(bare.pid), time.monotonic()
            await publish_all(pub, pub.subject, [note(c) for c in floor])
            await state.wait_terminal(floor, timeout=120)
            cpu1, wall1 = cpu_seconds(bare.pid), time.monotonic()
            out["floor_cmd_per_s"] = args.commands / (wall1 - wall0)
            out["floor_cpu_ms_per_cmd"] = 1000 * (cpu1 - cpu0) / args.commands
            out["floor_rss_mib"] = rss_mib(bare.pid)
            with trio.fail_after(20):
                await bare.wait()
            out["ratio_worker_over_floor"] = out["burst_cpu_ms_per_cmd"] / out["floor_cpu_ms_per_cmd"]
        nursery.cancel_scope.cancel()
    report(args, out)


def partial_process(command: list[str], env: dict[str, str]) -> Any:
    async def start(task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED) -> None:
        process = await trio.lowlevel.open_process(command, env=env, cwd=ROOT)
        try:
            task_status.started(process)
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()

    return start


def report(args: argparse.Namespace, out: dict[str, Any]) -> None:
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end;")
    print("  nats-server and the stub control plane (bench process) share the cores with the worker")
    print(
        f"worker: concurrency {args.concurrency}; "
        f"ready (first {2 * args.concurrency} commands) in {out['ready_s']:.2f}s"
    )
    print(
        f"(a) idle {args.idle:g}s: RSS {out['idle_rss_mib']:.1f} MiB, "
        f"CPU {out['idle_millicores']:.1f} millicores"
    )
    print(
        f"(b) burst of {args.commands}: {out['burst_cmd_per_s']:.0f} cmd/s "
        f"({out['burst_wall_s']:.2f}s, publishing took {out['burst_publish_s']:.2f}s), "
        f"worker CPU {out['burst_cpu_ms_per_cmd']:.2f} ms/cmd, RSS after {out['rss_after_burst_mib']:.1f} MiB"
    )
    print(
        f"(c) steady {args.rate:g} cmd/s x {out['steady_n']}: publish->claim p50 "
        f"{out['steady_p50_ms']:.2f} ms, p99 {out['steady_p99_ms']:.2f} ms, mean "
        f"{out['steady_mean_ms']:.2f} ms; worker CPU {out['steady_cpu_ms_per_cmd']:.2f} ms/cmd"
    )
    if "floor_cpu_ms_per_cmd" in out:
        print(
            f"(d) floor (bare_loop.py): {out['floor_cmd_per_s']:.0f} cmd/s, CPU "
            f"{out['floor_cpu_ms_per_cmd']:.2f} ms/cmd, RSS {out['floor_rss_mib']:.1f} MiB; "
            f"worker/bare CPU ratio {out['ratio_worker_over_floor']:.2f}"
        )
    print(f"worker exit code after SIGTERM: {out['worker_exit']} (after {out['worker_exit_s']:.2f}s)")
    if args.json:
        print(json.dumps(out, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=20.0, help="commands/s in the steady phase")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of the steady phase")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle phase")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-loop floor")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
