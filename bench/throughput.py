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
(c) one at a time: N/5 commands to the worker, each published once the one before it is
    terminal, then the same to the naive loop. A command then shares no fetch, event batch or
    ack flush with another, as at a low rate, but the process never idles long before it: the
    figure between the burst's and the paced one;
(d) steady: ``--rate`` commands/s for ``--steady`` s to the worker, then to the naive loop;
    publish→claim latency = the stub's receive time of the claim request minus the time just
    before the publish (one clock: the bench process). Voluntary context switches per command
    count how often the worker went to sleep for one.

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

from procstat import WakeupLog, context_switches, cpu_seconds, hwm_mib, ratio, rss_mib

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

        # (c) one at a time, back to back: no batching to share, no idle gap either; between the
        # burst and the paced figure, it says how much of the paced cost is each
        out["serial_n"] = n = max(1, args.commands // 5)
        out["serial_cpu_ms_per_cmd"], switches = await serial(pub, state, note, WORKER_SUBJECT, pid, n)
        out["serial_sleeps_per_cmd"] = switches[0]
        if bare is not None:
            out["naive_serial_cpu_ms_per_cmd"], _ = await serial(pub, state, note, pub.subject, bare.pid, n)

        # (d) steady rate: the worker, then the naive loop (which batches nothing: its paced over
        # its one-at-a-time figure is a second reading of what the idle gap costs)
        steady_n = max(1, int(args.rate * args.steady))
        lat, cpu_ms, switches = await steady(pub, state, note, WORKER_SUBJECT, pid, steady_n, args.rate)
        out["steady_n"] = len(lat)
        out["steady_p50_ms"] = percentile(lat, 50)
        out["steady_p99_ms"] = percentile(lat, 99)
        out["steady_mean_ms"] = statistics.fmean(lat) if lat else float("nan")
        out["steady_cpu_ms_per_cmd"] = cpu_ms
        out["steady_sleeps_per_cmd"], out["steady_preempted_per_cmd"] = switches
        out["steady_load"] = os.getloadavg()[0]
        if bare is not None:
            _lat, naive_ms, naive_switches = await steady(
                pub, state, note, pub.subject, bare.pid, steady_n, args.rate
            )
            out["naive_steady_cpu_ms_per_cmd"] = naive_ms
            out["naive_steady_sleeps_per_cmd"] = naive_switches[0]

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
) -> tuple[list[float], float, tuple[float, float]]:
    """n commands published one by one at ``rate``/s: publish→claim latencies (ms), the
    process's CPU ms per command, and its (voluntary, involuntary) context switches per command
    (voluntary: times its threads went to sleep, each a wake-up the machine charges for)."""
    commands = enqueue(state, n)
    published_at: dict[str, float] = {}
    start = trio.current_time()
    cpu0, switches0 = cpu_seconds(pid), context_switches(pid)
    for i, c in enumerate(commands):
        await trio.sleep_until(start + i / rate)
        published_at[f"/api/commands/{c.event_id}/claim"] = time.monotonic()
        await pub.publish(subject, note(c))
    await state.wait_terminal(commands, timeout=60)
    cpu1, switches1 = cpu_seconds(pid), context_switches(pid)
    claims = {r.path: r.received_at for r in state.request_log if r.path in published_at}
    latencies = [1000 * (claims[p] - t) for p, t in published_at.items() if p in claims]
    return latencies, 1000 * (cpu1 - cpu0) / n, per_command(switches0, switches1, n)


async def serial(
    pub: Any, state: StubState, note: Any, subject: str, pid: int, n: int
) -> tuple[float, tuple[float, float]]:
    """n commands one at a time, each published once the one before is terminal: a command that
    finds nothing to share its batches with, as a paced one, but without the idle gap before it.
    CPU ms and (voluntary, involuntary) context switches per command."""
    commands = enqueue(state, n)
    cpu0, switches0 = cpu_seconds(pid), context_switches(pid)
    for c in commands:
        await pub.publish(subject, note(c))
        await state.wait_terminal([c], timeout=60)
    cpu1, switches1 = cpu_seconds(pid), context_switches(pid)
    return 1000 * (cpu1 - cpu0) / n, per_command(switches0, switches1, n)


def per_command(before: tuple[int, int], after: tuple[int, int], n: int) -> tuple[float, float]:
    return (after[0] - before[0]) / n, (after[1] - before[1]) / n


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
    serial_naive = out.get("naive_serial_cpu_ms_per_cmd")
    print(
        f"(c) one at a time x {out['serial_n']}: worker {out['serial_cpu_ms_per_cmd']:.2f} ms CPU/cmd, "
        f"sleeps {out['serial_sleeps_per_cmd']:.2f} times per command"
        + ("" if serial_naive is None else f"; naive loop {serial_naive:.2f} ms CPU/cmd")
    )
    print(
        f"(d) steady {args.rate:g} cmd/s x {out['steady_n']}: publish->claim p50 "
        f"{out['steady_p50_ms']:.2f} ms, p99 {out['steady_p99_ms']:.2f} ms, mean "
        f"{out['steady_mean_ms']:.2f} ms; worker CPU {out['steady_cpu_ms_per_cmd']:.2f} ms/cmd "
        f"(load {out['steady_load']:.2f})"
    )
    sleeps_naive = out.get("naive_steady_sleeps_per_cmd")
    print(
        f"    worker sleeps {out['steady_sleeps_per_cmd']:.2f} times per command "
        f"(preempted {out['steady_preempted_per_cmd']:.2f})"
        + ("" if sleeps_naive is None else f"; naive loop {sleeps_naive:.2f}")
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
