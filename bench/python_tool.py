"""Python tool: a trivial step (``def main(): return 1``) end to end through the tool, warm.

    python bench/python_tool.py [N] [--gap SECONDS] [--cold] [--json]

Measures N calls spaced by ``--gap`` (default 10 ms: commands arriving one after another, each
finding a child already forked and waiting) and N calls back to back (the replacement child is
still being forked when the next call comes). Reports wall time per call (p50 and mean) and the
worker process's own CPU per call (``time.process_time``: the children run in other processes).
``--cold`` adds a ``python -c`` subprocess per call, what a worker without a fork server pays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import trio
from procstat import TICK, fork_servers

from noetl_worker import templating
from noetl_worker.config import Settings
from noetl_worker.tools import resolve
from noetl_worker.tools.base import ToolContext, ToolResources

CODE = "def main():\n    return 1\n"
COLD = f"import json\nns = {{}}\nexec({CODE!r}, ns)\nprint(json.dumps({{'result': ns['main']()}}))\n"


def cold(n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, check=True)
        assert json.loads(out.stdout)["result"] == 1
    return (time.perf_counter() - started) / n * 1000


def isolation_cpu_s(children: bool = True) -> float:
    """CPU of the fork servers this process started, their reaped children included: what the
    isolation (a fresh child per step) costs on top of the worker's own CPU."""
    servers = [fields for _pid, fields in fork_servers(os.getpid())]
    return sum(sum(int(x) for x in fields[11 : 15 if children else 13]) / TICK for fields in servers)


def isolation_faults() -> tuple[int, int]:
    """Minor page faults of the fork servers this process started: (their own, their reaped
    children's). Deterministic where CPU time is not: nearly all of them are copy-on-write
    copies, the price of a fresh child per step."""
    servers = [fields for _pid, fields in fork_servers(os.getpid())]
    return sum(int(f[7]) for f in servers), sum(int(f[8]) for f in servers)  # minflt, cminflt


async def series(tool: Any, ctx: ToolContext, n: int, gap: float) -> dict[str, float]:
    walls: list[float] = []
    cpu = 0.0
    isolation0, server0 = isolation_cpu_s(), isolation_cpu_s(children=False)
    faults0 = isolation_faults()
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        result = await tool({"code": CODE}, ctx)
        walls.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
        assert result.data == 1, result
        if gap:
            await trio.sleep(gap)
    faults1 = isolation_faults()
    return {
        "p50_ms": 1000 * statistics.median(walls),
        "mean_ms": 1000 * statistics.fmean(walls),
        "cpu_ms": 1000 * cpu / n,
        "isolation_cpu_ms": 1000 * (isolation_cpu_s() - isolation0) / n,
        "fork_server_cpu_ms": 1000 * (isolation_cpu_s(children=False) - server0) / n,
        "fork_server_faults": (faults1[0] - faults0[0]) / n,
        "child_faults": (faults1[1] - faults0[1]) / n,
        "load": os.getloadavg()[0],
    }


async def warm(n: int, gap: float) -> dict[str, Any]:
    resources = ToolResources()
    ctx = ToolContext(
        execution_id=1,
        step="bench",
        command_id="c",
        worker_id="w",
        server_url="http://127.0.0.1:1",
        variables={},
        secrets={},
        server=None,  # type: ignore[arg-type]  # the python tool never calls the server
        resources=resources,
        settings=Settings.from_env({}),
        render=lambda value: templating.render(value, {}),
    )
    tool = resolve("python")
    try:
        started = time.perf_counter()
        first = await tool({"code": CODE}, ctx)  # includes starting the fork server
        out: dict[str, Any] = {"first_ms": (time.perf_counter() - started) * 1000}
        assert first.data == 1
        await trio.sleep(0.2)
        out["spaced"] = await series(tool, ctx, n, gap)
        out["back_to_back"] = await series(tool, ctx, n, 0.0)
        return out
    finally:
        await resources.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.01)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = trio.run(warm, args.n, args.gap)
    out.update(n=args.n, gap_s=args.gap, cores=os.cpu_count())
    if args.cold:
        out["cold_ms"] = cold(args.n)
    s, b = out["spaced"], out["back_to_back"]
    print(f"N={args.n} calls of `def main(): return 1` through the python tool ({os.cpu_count()} cores)")
    print(
        f"spaced {args.gap * 1000:g} ms: p50 {s['p50_ms']:.2f} ms, mean {s['mean_ms']:.2f} ms, "
        f"worker CPU {s['cpu_ms']:.2f} ms/call, fork server + children "
        f"{s['isolation_cpu_ms']:.2f} ms/call (of which the server {s['fork_server_cpu_ms']:.2f}) "
        f"(load {s['load']:.2f})"
    )
    print(
        f"back to back: p50 {b['p50_ms']:.2f} ms, mean {b['mean_ms']:.2f} ms, "
        f"worker CPU {b['cpu_ms']:.2f} ms/call, fork server + children "
        f"{b['isolation_cpu_ms']:.2f} ms/call (load {b['load']:.2f})"
    )
    print(
        f"page faults per call, spaced: fork server {s['fork_server_faults']:.0f}, "
        f"child {s['child_faults']:.0f}; back to back: {b['fork_server_faults']:.0f}, "
        f"{b['child_faults']:.0f}"
    )
    print(f"first call (starts the fork server): {out['first_ms']:.1f} ms")
    if args.cold:
        print(f"cold `python -c` subprocess per call: {out['cold_ms']:.2f} ms")
    if args.json:
        print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
