"""One process's numbers from /proc, for the benchmarks (Linux)."""

from __future__ import annotations

import os
from collections.abc import Iterator

TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name: [0] state, [1] ppid, [2] pgrp, [11] utime,
    [12] stime, [13] cutime, [14] cstime. Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


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


def _status_mib(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS:")


def hwm_mib(pid: int) -> float:
    """Peak RSS of the process so far."""
    return _status_mib(pid, "VmHWM:")
