"""One process's numbers from /proc, for the benchmarks (Linux)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import trio

TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name: [0] state, [1] ppid, [2] pgrp, [11] utime,
    [12] stime, [13] cutime, [14] cstime. Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def ratio(a: float, b: float) -> float:
    """a / b, or NaN when b read zero: CPU from ``stat`` comes in 10 ms ticks, and a short run
    on a fast machine can fall under one (a smoke run's burst did)."""
    return a / b if b else float("nan")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of one process (its threads included), plus its reaped children's with
    ``children``."""
    fields = stat_fields(pid)
    return sum(int(x) for x in fields[11 : 15 if children else 13]) / TICK


def processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, stat fields) of every process still there while it is read."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), stat_fields(int(entry))
            except OSError:
                continue


def fork_servers(parent: int) -> Iterator[tuple[int, list[str]]]:
    """(pid, stat fields) of each python fork server (``_pyrunner.py``) that ``parent`` started."""
    for pid, fields in processes():
        if int(fields[1]) != parent:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"_pyrunner" in f.read():
                    yield pid, fields
        except OSError:
            continue


def _status_mib(pid: int, key: str, file: str = "status") -> float:
    """A ``Key: <n> kB`` line of ``/proc/<pid>/<file>`` in MiB (NaN when the key is absent)."""
    with open(f"/proc/{pid}/{file}") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS:")


def hwm_mib(pid: int) -> float:
    """Peak RSS of the process so far."""
    return _status_mib(pid, "VmHWM:")


def pss_mib(pid: int) -> float:
    """Proportional set size: a page shared by n processes counts 1/n in each."""
    return _status_mib(pid, "Pss:", "smaps_rollup")


def thread_runtimes(pid: int) -> dict[int, int]:
    """Nanoseconds each live thread of ``pid`` has run (``/proc/<pid>/task/*/schedstat``: the
    scheduler's own clock, not the 10 ms ticks of ``stat``). Threads that exit while it reads
    are left out."""
    runtimes: dict[int, int] = {}
    for tid, text in _thread_files(pid, "schedstat"):
        try:
            runtimes[tid] = int(text.split()[0])
        except (ValueError, IndexError):
            continue
    return runtimes


def _thread_files(pid: int, name: str) -> Iterator[tuple[int, str]]:
    """(tid, text of ``/proc/<pid>/task/<tid>/<name>``) for each live thread; threads that exit
    while it reads are left out."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                yield int(tid), f.read()
        except OSError:
            continue


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over the live threads of ``pid``: a
    voluntary one is the thread going to sleep (waiting for I/O or a timer), so per command it
    counts the wake-ups the command cost."""
    voluntary = involuntary = 0
    for _tid, text in _thread_files(pid, "status"):
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key == "voluntary_ctxt_switches":
                voluntary += int(value)
            elif key == "nonvoluntary_ctxt_switches":
                involuntary += int(value)
    return voluntary, involuntary


def machine_steal_ticks() -> int:
    """Ticks this VM's vCPUs were runnable but not run by the host (``/proc/stat`` ``steal``)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) if len(fields) > 8 else 0


class WakeupLog:
    """Samples a process's threads from outside every ``period`` s (reading /proc costs the
    process nothing) and keeps each period in which one of them ran more than ``threshold_ms``:
    when an idle reading comes out high, it says when, in which thread, and whether the host
    was stealing the vCPUs at the time."""

    def __init__(self, pid: int, threshold_ms: float = 2.0) -> None:
        self.pid = pid
        self.threshold_ns = int(threshold_ms * 1e6)
        self.busy: list[dict[str, Any]] = []
        self.total_ns = 0  # threads alive at the end of a period only
        self.steal_ticks = 0

    async def run(self, seconds: float, period: float = 0.05) -> None:
        start = time.monotonic()
        before, steal0 = thread_runtimes(self.pid), machine_steal_ticks()
        steal = steal0
        while time.monotonic() - start < seconds:
            await trio.sleep(period)
            now, steal_now = thread_runtimes(self.pid), machine_steal_ticks()
            for tid, ns in now.items():
                ran = ns - before.get(tid, 0)
                self.total_ns += ran
                if ran > self.threshold_ns:
                    self.busy.append(
                        {
                            "at_s": round(time.monotonic() - start, 3),
                            "thread": tid,
                            "main": tid == self.pid,
                            "ms": round(ran / 1e6, 2),
                            "steal_ticks": steal_now - steal,
                        }
                    )
            before, steal = now, steal_now
        self.steal_ticks = steal - steal0

    def summary(self, top: int = 5) -> str:
        worst = sorted(self.busy, key=lambda b: -b["ms"])[:top]
        parts = []
        for b in worst:
            where = "main" if b["main"] else f"thread {int(b['thread'])}"
            steal = f", steal {int(b['steal_ticks'])}" if b["steal_ticks"] else ""
            parts.append(f"{b['ms']:.1f} ms at {b['at_s']:.2f}s ({where}{steal})")
        return ", ".join(parts) if parts else "none"
