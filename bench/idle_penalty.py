"""What waking up from idle costs this machine: the same unit of Python work, back to back and paced.

    python bench/idle_penalty.py [--units 50] [--rounds 12] [--gap-ms 50] [--loops 10] [--sweep] [--json]

A worker that is paced (one command every 50 ms at 20/s) sleeps between commands; one in a burst
never does. `bench/throughput.py` finds a paced command costing 1.8 to 2.5 times a burst one, and
the naive loop 1.5 to 1.6 times its own — so how much of that is the program, and how much the machine?
This measures the machine: one fixed unit of pure-Python work (JSON encode/decode of a
claim-sized document, building a few dicts and strings, the kind of work a command does; no I/O,
no other process involved) run ``--units`` times back to back, then ``--units`` times with a
``--gap-ms`` sleep before each, alternating for ``--rounds`` rounds. CPU per unit is
``time.thread_time`` around the unit alone, so the sleep and the wake-up themselves are not
counted, only how much slower the same instructions run right after one.

``--sweep`` also runs gaps of 1, 5, 20 and 50 ms. ``--json`` prints the numbers as one JSON line
at the end (`bench/run.py` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

_DOC = {
    "status": "ok",
    "command_id": "614025361772414449",
    "execution_id": "614025361772414450",
    "step": "each",
    "tool": {"kind": "python", "code": "def main(v):\n    return v * 2\n", "input": {"v": "3"}},
    "context": {"workload": {"items": list(range(20))}, "iter": {"item": 3}, "vars": {"a": "x" * 40}},
}


LOOPS = 10


def unit(loops: int = LOOPS) -> int:
    """One unit of work: about what the worker's own code does between two waits of a command
    (one of: the message arriving, the claim answer, the event batch's answer), in size."""
    total = 0
    for i in range(loops):
        text = json.dumps(_DOC)
        doc = json.loads(text)
        event = {"event_type": "call.done", "node_name": doc["step"], "seq": i, "data": doc["tool"]}
        line = f"POST /api/events/batch HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(text)}\r\n"
        total += len(line.encode()) + len(event)
    return total


def measure(units: int, gap: float, loops: int = LOOPS) -> list[float]:
    """CPU seconds of each unit, with ``gap`` seconds of sleep before each (0: back to back)."""
    out = []
    for _ in range(units):
        if gap:
            time.sleep(gap)
        start = time.thread_time()
        unit(loops)
        out.append(time.thread_time() - start)
    return out


def compare(units: int, rounds: int, gap: float, loops: int) -> dict[str, Any]:
    burst: list[float] = []
    paced: list[float] = []
    for _ in range(rounds):
        burst += measure(units, 0.0, loops)
        paced += measure(units, gap, loops)
    b, p = statistics.median(burst), statistics.median(paced)
    return {
        "gap_ms": gap * 1000,
        "back_to_back_us": b * 1e6,
        "paced_us": p * 1e6,
        "penalty": p / b,
        "extra_us_per_wakeup": (p - b) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=50, help="units per block")
    parser.add_argument("--rounds", type=int, default=12, help="alternating back-to-back / paced blocks")
    parser.add_argument("--gap-ms", type=float, default=50.0, help="sleep before each paced unit")
    parser.add_argument("--loops", type=int, default=LOOPS, help="size of a unit (10: ~0.25 ms here)")
    parser.add_argument("--sweep", action="store_true", help="also gaps of 1, 5, 20 and 50 ms")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON line at the end")
    args = parser.parse_args()
    measure(20, 0.0, args.loops)  # warm the code paths up
    main_result = compare(args.units, args.rounds, args.gap_ms / 1000, args.loops)
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "load": os.getloadavg()[0],
        "units": args.units,
        "loops": args.loops,
        "rounds": args.rounds,
        **main_result,
    }
    m = main_result
    print(
        f"same Python work, {args.rounds} x {args.units} units each way ({os.cpu_count()} cores, "
        f"load {results['load']:.2f}): back to back {m['back_to_back_us']:.0f} us CPU per unit, "
        f"after a {args.gap_ms:g} ms sleep {m['paced_us']:.0f} us: {m['penalty']:.2f} x, "
        f"{m['extra_us_per_wakeup']:.0f} us more per wake-up"
    )
    if args.sweep:
        results["sweep"] = []
        for gap_ms in (1, 5, 20, 50):
            row = compare(args.units, args.rounds, gap_ms / 1000, args.loops)
            results["sweep"].append(row)
            print(
                f"  gap {gap_ms:>2} ms: {row['paced_us']:.0f} us per unit, "
                f"{row['penalty']:.2f} x back to back, {row['extra_us_per_wakeup']:.0f} us more"
            )
    if args.json:
        print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
