"""Both workers on the real NoETL server 4.12.1: loop and concurrent-execution throughput.

Run from the repository root (the interop venv is built by ``scripts/interop-setup``):

    .venv/bin/python bench/real_server.py [--iterations 200] [--executions 50] [--json] [--out FILE]

(``--json``: the numbers as one JSON line at the end, as ``bench/run.py`` reads them; ``--smoke``:
10 iterations and 3 executions, to check the script still runs.)

Two stacks start at once (``tests/interop/harness.py``: nats-server, a database of its own, the
real server), one with noetl's own worker (``python -m noetl.worker``, 8 commands in flight) and
one with ours (``python -m noetl_worker``, ``WORKER_MAX_CONCURRENT=8``). Each workload runs on
one stack at a time, so the two workers never compete for the cores:

(a) a python loop of ``--iterations`` items, ``mode: parallel``, ``max_in_flight: 8``;
(b) ``--executions`` executions of a three-step python playbook, started at once.

Per worker and workload: wall time (execute → ``playbook.completed`` event), step-commands/s
(``call.done`` events / wall), claim→done p50/p95 per command from the server's own event
timestamps (``command.claimed`` → ``call.done`` of the same command id), worker CPU ms per
command (utime + stime of the worker's whole process group from /proc, children included — for
ours that is the python fork server and a fresh child per step — and of the main process alone;
for ours also the fork server's own CPU and page faults and its step children's, per command),
and the worker's idle RSS and PSS (process group, after start-up and again after the workloads;
PSS counts a page the fork server shares with its waiting children once, RSS once per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procstat import TICK, cpu_seconds, fork_servers, processes, pss_mib, rss_mib  # noqa: E402
from tests.interop.harness import Proc, Run, Stack, event_result, open_stacks  # noqa: E402

LOOP = """
apiVersion: noetl.io/v2
kind: Playbook
metadata: {{name: bench_loop, path: bench/loop}}
workload:
  items: {items}
workflow:
  - step: each
    loop:
      in: "{{{{ workload.items }}}}"
      iterator: item
      spec: {{mode: parallel, max_in_flight: 8}}
    tool:
      kind: python
      input: {{v: "{{{{ iter.item }}}}"}}
      code: |
        def main(v):
            return {{"v": int(v) * 2}}
    next: {{arcs: [{{step: end}}]}}
  - step: end
    tool: {{kind: noop}}
"""

THREE_STEPS = """
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: bench_three, path: bench/three}
workflow:
  - step: one
    tool:
      kind: python
      code: |
        def main():
            return {"n": 1}
    next: {arcs: [{step: two}]}
  - step: two
    tool:
      kind: python
      input: {n: "{{ one.n }}"}
      code: |
        def main(n):
            return {"n": int(n) + 1}
    next: {arcs: [{step: three}]}
  - step: three
    tool:
      kind: python
      input: {n: "{{ two.n }}"}
      code: |
        def main(n):
            return {"n": int(n) + 1}
"""


def group_pids(pgid: int) -> list[int]:
    return [pid for pid, fields in processes() if int(fields[2]) == pgid]


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime (+ reaped children's) of every process in the worker's process group."""
    fields = [f for _pid, f in processes() if int(f[2]) == pgid]
    return sum(int(x) for f in fields for x in f[11:15]) / TICK


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process alone (its children, e.g. our python fork server, not)."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return float("nan")


def fork_server_counters(worker_pid: int) -> dict[str, float] | None:
    """Our python fork server (the worker's child running ``_pyrunner.py``): its own CPU seconds
    and page faults, and those of the step children it has reaped; None when there is none
    (noetl's worker, or ours before its first python step)."""
    found = next(fork_servers(worker_pid), None)
    if found is None:
        return None
    pid, fields = found
    return {
        "pid": pid,
        "own_s": (int(fields[11]) + int(fields[12])) / TICK,
        "children_s": (int(fields[13]) + int(fields[14])) / TICK,
        "own_faults": int(fields[7]),
        "children_faults": int(fields[8]),
    }


def _split(
    before: dict[str, float] | None, after: dict[str, float] | None, commands: int
) -> dict[str, float]:
    """Per command: the fork server's own CPU and faults, and its step children's."""
    if before is None or after is None or before["pid"] != after["pid"] or not commands:
        return {}  # no fork server, or it was restarted in between: nothing to split

    def per(key: str, scale: float) -> float:
        return round((after[key] - before[key]) * scale / commands, 2)

    return {
        "fork_server_cpu_ms_per_command": per("own_s", 1000),
        "step_children_cpu_ms_per_command": per("children_s", 1000),
        "fork_server_faults_per_command": per("own_faults", 1),
        "step_child_faults_per_command": per("children_faults", 1),
    }


def _group_mib(pgid: int, per_process: Callable[[int], float]) -> float:
    total = 0.0
    for pid in group_pids(pgid):
        try:
            total += per_process(pid)
        except OSError:
            continue
    return total


def group_rss_mib(pgid: int) -> float:
    return _group_mib(pgid, rss_mib)


def group_pss_mib(pgid: int) -> float:
    """The process group's proportional set size: the fork server and its waiting children share
    most of their pages, which the sum of their RSS counts once per process."""
    return _group_mib(pgid, pss_mib)


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["created_at"])).timestamp()


def claim_to_done(runs: list[Run]) -> list[float]:
    """Seconds from each command's ``command.claimed`` to its ``call.done``, server timestamps."""
    out: list[float] = []
    for run in runs:
        claimed: dict[str, float] = {}
        done: dict[str, float] = {}
        for e in run.events:
            context = event_result(e).get("context")
            if not isinstance(context, dict) or "command_id" not in context:
                continue
            cid = str(context["command_id"])
            if e.get("event_type") == "command.claimed":
                claimed[cid] = _ts(e)
            elif e.get("event_type") in ("call.done", "call.error"):
                done[cid] = _ts(e)
        out.extend(done[c] - claimed[c] for c in done if c in claimed)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def worker_proc(stack: Stack) -> Proc:
    return next(p for p in stack.procs if "-worker-" in p.name)


def measure(stack: Stack, label: str, runs_fn: Any) -> dict[str, Any]:
    worker = worker_proc(stack)
    cpu0, own0 = group_cpu_seconds(worker.pid), process_cpu_seconds(worker.pid)
    fork0 = fork_server_counters(worker.pid)
    started = time.monotonic()
    runs: list[Run] = runs_fn()
    wall = time.monotonic() - started
    cpu = group_cpu_seconds(worker.pid) - cpu0
    own = process_cpu_seconds(worker.pid) - own0
    fork1 = fork_server_counters(worker.pid)
    commands = sum(r.count("call.done") + r.count("call.error") for r in runs)
    latencies = claim_to_done(runs)
    outcomes = sorted({str(r.terminal) for r in runs})
    return {
        "workload": label,
        "outcomes": outcomes,
        "executions": len(runs),
        "step_commands": commands,
        "wall_s": round(wall, 2),
        "commands_per_s": round(commands / wall, 1) if wall else None,
        "claim_to_done_p50_ms": round(pct(latencies, 0.5) * 1000, 1),
        "claim_to_done_p95_ms": round(pct(latencies, 0.95) * 1000, 1),
        "worker_cpu_ms_per_command": round(cpu * 1000 / commands, 2) if commands else None,
        # the worker's main process alone: ours without its python fork server and step children
        "worker_process_cpu_ms_per_command": round(own * 1000 / commands, 2) if commands else None,
        # ours: the rest of the group, split into the fork server and the step children
        **_split(fork0, fork1, commands),
    }


def loop_runs(stack: Stack, iterations: int) -> list[Run]:
    content = LOOP.format(items=json.dumps(list(range(iterations))))
    return [stack.run(content, timeout=900, worker=stack.name)]


def concurrent_runs(stack: Stack, executions: int) -> list[Run]:
    path = stack.register(THREE_STEPS)
    ids = [stack.execute(path) for _ in range(executions)]

    def wait(eid: str) -> Run:
        terminal, events = stack.wait_terminal(eid, timeout=900)
        return Run(
            worker=stack.name,
            path=path,
            execution_id=eid,
            terminal=terminal,
            events=tuple(events),
            status={},
            wall_seconds=0.0,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(wait, ids))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--executions", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON line at the end")
    parser.add_argument("--out", type=Path, help="also write the numbers to this file")
    parser.add_argument("--smoke", action="store_true", help="10 iterations, 3 executions")
    args = parser.parse_args()
    if args.smoke:
        args.iterations, args.executions = 10, 3
    results: dict[str, Any] = {"iterations": args.iterations, "executions": args.executions, "workers": {}}
    with open_stacks(["noetl", "ours"]) as stacks:
        for name, stack in stacks.items():
            time.sleep(5)  # let start-up settle before the idle reading
            worker = worker_proc(stack)
            results["workers"][name] = {
                "idle_rss_mib_at_start": round(group_rss_mib(worker.pid), 1),
                "idle_pss_mib_at_start": round(group_pss_mib(worker.pid), 1),
            }
        for name, stack in stacks.items():
            # warm-up (first python step, connections) outside the measurement
            stack.run(THREE_STEPS, timeout=300, worker=name)
        for name, stack in stacks.items():
            row = results["workers"][name]
            row["loop"] = measure(
                stack, f"loop x{args.iterations}", lambda s=stack: loop_runs(s, args.iterations)
            )
            print(name, json.dumps(row["loop"]), flush=True)
        for name, stack in stacks.items():
            row = results["workers"][name]
            row["concurrent"] = measure(
                stack, f"{args.executions} x 3 steps", lambda s=stack: concurrent_runs(s, args.executions)
            )
            print(name, json.dumps(row["concurrent"]), flush=True)
        for name, stack in stacks.items():
            time.sleep(2)
            worker = worker_proc(stack)
            results["workers"][name]["idle_rss_mib_after"] = round(group_rss_mib(worker.pid), 1)
            results["workers"][name]["idle_pss_mib_after"] = round(group_pss_mib(worker.pid), 1)
    results["load_average"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
