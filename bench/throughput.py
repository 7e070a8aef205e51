"""Worker throughput, CPU per command, publish→claim latency and idle cost, against the naive loop.

Run from the repository root, with the repository's venv:

    python bench/throughput.py [--commands 500] [--concurrency 16] [--rate 20] [--rounds 3] [--json]

The bench process runs an embedded nats-server and the stub control plane; the worker
(``python -m noetl_worker``, on its own stream ``bench_worker``) and the naive design-card loop
(``bench/bare_loop.py``, on the default stream) run as separate processes, both for the whole
run, so each one's CPU (utime + stime from /proc) is measured alone. Phases:

(a) idle: RSS and CPU of the ready worker over ``--idle`` s;
(b) bursts, alternating: N no-op commands published at once to the worker, then N to the naive
    loop, ``--rounds`` times; commands/s and CPU ms per command until every command is terminal
    in the stub; the ratio is taken per round (the machine's load changes between rounds);
(c) steady: ``--rate`` commands/s for ``--steady`` s to the worker; publish→claim latency = the
    stub's receive time of the claim request minus the time just before the publish (one clock:
    the bench process).

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

from procstat import WakeupLog, cpu_seconds, hwm_mib, ratio, rss_mib

from noetl_worker.testing import (
    StubCommand,
    StubState,
    open_nats_server,
    open_publisher,
    open_stub_server,
)

ROOT = Path(__file__).resolve().parent.parent


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


def child_env(src: Path = ROOT / "src", **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


WORKER_STREAM, WORKER_SUBJECT = "bench_worker", "bench.worker"  # the bare loop keeps the default ones


async def burst(
    pub: Any, state: StubState, note: Any, subject: str, pid: int, n: int
) -> tuple[float, float, float]:
    """(commands/s, CPU ms per command, load average) for n commands published at once."""
    commands = enqueue(state, n)
    payloads = [note(c) for c in commands]
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    await publish_all(pub, subject, payloads)
    await state.wait_terminal(commands, timeout=180)
    cpu1, wall1 = cpu_seconds(pid), time.monotonic()
    return n / (wall1 - wall0), 1000 * (cpu1 - cpu0) / n, os.getloadavg()[0]


async def run(args: argparse.Namespace) -> None:
    state = StubState()
    out: dict[str, Any] = {"cores": os.cpu_count()}
    async with (
        open_nats_server() as nats,
        open_stub_server(state) as stub,
        open_publisher(nats.url) as pub,
        trio.open_nursery() as nursery,
    ):
        note = lambda c: json.dumps(c.notification(stub.url)).encode()  # noqa: E731
        env = child_env(
            args.worker_src,
            NATS_URL=nats.url,
            NATS_STREAM=WORKER_STREAM,
            NATS_SUBJECT=WORKER_SUBJECT,
            NOETL_SERVER_URL=stub.url,
            WORKER_MAX_CONCURRENT=str(args.concurrency),
            WORKER_METRICS_BIND="127.0.0.1:0",
            NOETL_LOG_LEVEL=os.environ.get("BENCH_WORKER_LOG", "warning"),
        )
        command = [sys.executable, "-m", "noetl_worker"]
        if args.profile:
            command[1:1] = ["-m", "cProfile", "-o", str(args.profile)]
        worker = await nursery.start(partial_process(command, env))
        pid = worker.pid
        # Ready = a warm-up command went all the way through (imports done, pool connections up).
        warm = enqueue(state, 2 * args.concurrency)
        t0 = time.monotonic()
        with trio.fail_after(60):
            while True:  # the worker creates its stream at start; publish once it exists
                try:
                    await publish_all(pub, WORKER_SUBJECT, [note(c) for c in warm])
                    break
                except Exception:
                    await trio.sleep(0.2)
        await state.wait_terminal(warm, timeout=60)
        out["ready_s"] = time.monotonic() - t0
        bare = None
        if not args.no_floor:
            bare_cmd = [sys.executable, str(ROOT / "bench" / "bare_loop.py"), nats.url, str(args.concurrency)]
            bare = await nursery.start(partial_process(bare_cmd, child_env()))
            warm = enqueue(state, 2 * args.concurrency)
            await trio.sleep(1.0)  # its durable is created at start
            await publish_all(pub, pub.subject, [note(c) for c in warm])
            await state.wait_terminal(warm, timeout=60)
        await trio.sleep(2)  # let start-up stragglers (first heartbeat, lag poll) settle

        # (a) idle
        wakeups = WakeupLog(pid)
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        await wakeups.run(args.idle)
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        out["idle_rss_mib"] = rss_mib(pid)
        out["idle_millicores"] = 1000 * (cpu1 - cpu0) / (wall1 - wall0)
        # The same window on the scheduler's clock, threads still alive at its end only; and
        # every 50 ms in which a thread ran over 2 ms, so a high reading names when and where.
        out["idle_sched_millicores"] = wakeups.total_ns / 1e6 / (wall1 - wall0)
        out["idle_busy_periods"] = wakeups.busy
        out["idle_busy_summary"] = wakeups.summary()
        out["idle_steal_ticks"] = wakeups.steal_ticks
        out["idle_load"] = os.getloadavg()[0]

        # (b) bursts, the worker and the naive loop alternating
        rounds: list[dict[str, float]] = []
        for _ in range(args.rounds):
            rate, cpu, load = await burst(pub, state, note, WORKER_SUBJECT, pid, args.commands)
            row = {"worker_cmd_per_s": rate, "worker_cpu_ms": cpu, "worker_load": load}
            if bare is not None:
                rate, cpu, load = await burst(pub, state, note, pub.subject, bare.pid, args.commands)
                row.update(naive_cmd_per_s=rate, naive_cpu_ms=cpu, naive_load=load)
                row["ratio"] = ratio(row["worker_cpu_ms"], row["naive_cpu_ms"])
            rounds.append(row)
        out["rounds"] = rounds
        out["burst_cmd_per_s"] = statistics.median(r["worker_cmd_per_s"] for r in rounds)
        out["burst_cpu_ms_per_cmd"] = statistics.median(r["worker_cpu_ms"] for r in rounds)
        if bare is not None:
            out["naive_cpu_ms_per_cmd"] = statistics.median(r["naive_cpu_ms"] for r in rounds)
            out["naive_cmd_per_s"] = statistics.median(r["naive_cmd_per_s"] for r in rounds)
            out["ratio_worker_over_naive"] = statistics.median(r["ratio"] for r in rounds)
            out["naive_rss_mib"] = rss_mib(bare.pid)
        out["peak_rss_mib"] = hwm_mib(pid)

        # (c) steady rate: the worker, then the naive loop (its paced/burst ratio is the
        # machine's own price of waking up for every command)
        steady_n = max(1, int(args.rate * args.steady))
        lat, cpu_ms = await steady(pub, state, note, WORKER_SUBJECT, pid, steady_n, args.rate)
        out["steady_n"] = len(lat)
        out["steady_p50_ms"] = percentile(lat, 50)
        out["steady_p99_ms"] = percentile(lat, 99)
        out["steady_mean_ms"] = statistics.fmean(lat) if lat else float("nan")
        out["steady_cpu_ms_per_cmd"] = cpu_ms
        out["steady_load"] = os.getloadavg()[0]
        if bare is not None:
            _lat, naive_ms = await steady(pub, state, note, pub.subject, bare.pid, steady_n, args.rate)
            out["naive_steady_cpu_ms_per_cmd"] = naive_ms

        stopping = time.monotonic()
        worker.terminate()
        if bare is not None:
            bare.terminate()
        with trio.fail_after(90):
            await worker.wait()
        out["worker_exit"] = worker.returncode
        out["worker_exit_s"] = time.monotonic() - stopping
        nursery.cancel_scope.cancel()
    out["load_average"] = os.getloadavg()[0]
    report(args, out)


async def steady(
    pub: Any, state: StubState, note: Any, subject: str, pid: int, n: int, rate: float
) -> tuple[list[float], float]:
    """n commands published one by one at ``rate``/s: publish→claim latencies (ms) and the
    process's CPU ms per command."""
    commands = enqueue(state, n)
    published_at: dict[str, float] = {}
    start = trio.current_time()
    cpu0 = cpu_seconds(pid)
    for i, c in enumerate(commands):
        await trio.sleep_until(start + i / rate)
        published_at[f"/api/commands/{c.event_id}/claim"] = time.monotonic()
        await pub.publish(subject, note(c))
    await state.wait_terminal(commands, timeout=60)
    cpu1 = cpu_seconds(pid)
    claims = {r.path: r.received_at for r in state.request_log if r.path in published_at}
    latencies = [1000 * (claims[p] - t) for p, t in published_at.items() if p in claims]
    return latencies, 1000 * (cpu1 - cpu0) / n


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
    print(f"machine: {out['cores']} cores, load average {out['load_average']:.2f} at the end;")
    print("  nats-server and the stub control plane (bench process) share the cores with the worker")
    print(
        f"worker: concurrency {args.concurrency}; "
        f"ready (first {2 * args.concurrency} commands) in {out['ready_s']:.2f}s"
    )
    print(
        f"(a) idle {args.idle:g}s: RSS {out['idle_rss_mib']:.1f} MiB, "
        f"CPU {out['idle_millicores']:.1f} millicores (load {out['idle_load']:.2f})"
    )
    print(
        f"    scheduler clock {out['idle_sched_millicores']:.1f} millicores; host steal "
        f"{out['idle_steal_ticks']} ticks; periods over 2 ms: {out['idle_busy_summary']}"
    )
    for i, r in enumerate(out["rounds"], 1):
        line = (
            f"(b) burst {i}/{len(out['rounds'])} of {args.commands}: worker "
            f"{r['worker_cmd_per_s']:.0f} cmd/s, {r['worker_cpu_ms']:.2f} ms CPU/cmd "
            f"(load {r['worker_load']:.2f})"
        )
        if "naive_cpu_ms" in r:
            line += (
                f"; naive loop {r['naive_cmd_per_s']:.0f} cmd/s, {r['naive_cpu_ms']:.2f} ms CPU/cmd "
                f"(load {r['naive_load']:.2f}); ratio {r['ratio']:.2f}"
            )
        print(line)
    print(f"    worker peak RSS {out['peak_rss_mib']:.1f} MiB")
    print(
        f"(c) steady {args.rate:g} cmd/s x {out['steady_n']}: publish->claim p50 "
        f"{out['steady_p50_ms']:.2f} ms, p99 {out['steady_p99_ms']:.2f} ms, mean "
        f"{out['steady_mean_ms']:.2f} ms; worker CPU {out['steady_cpu_ms_per_cmd']:.2f} ms/cmd "
        f"(load {out['steady_load']:.2f})"
    )
    if "naive_steady_cpu_ms_per_cmd" in out:
        paced, burst = out["naive_steady_cpu_ms_per_cmd"], out["naive_cpu_ms_per_cmd"]
        print(
            f"    naive loop paced: {paced:.2f} ms/cmd ({ratio(paced, burst):.2f} x its burst); "
            f"worker paced {ratio(out['steady_cpu_ms_per_cmd'], out['burst_cpu_ms_per_cmd']):.2f} x its burst"
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
    parser.add_argument(
        "--worker-src",
        type=Path,
        default=ROOT / "src",
        help="the src/ directory of the worker build to measure (e.g. an exported older commit)",
    )
    parser.add_argument("--profile", type=Path, help="run the worker under cProfile, stats to this file")
    parser.add_argument("--rounds", type=int, default=3, help="alternating worker / naive-loop bursts")
    parser.add_argument("--no-floor", action="store_true", help="skip the naive loop")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
