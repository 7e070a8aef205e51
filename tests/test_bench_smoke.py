"""The benchmarks still run: ``bench/run.py --smoke`` (tiny N, no thresholds), as CI runs it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent


async def test_every_benchmark_runs_and_reports_its_numbers() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    argv = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        "--smoke",
        "--json",
        "--only",
        "idle_penalty",
        "throughput",
        "python",
        "result",
        "transfer",
    ]
    with trio.fail_after(900):
        done = await trio.run_process(
            argv, cwd=ROOT, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    table = out.splitlines()
    assert table[0].startswith("machine: ") and "cores, load average" in table[0]
    results = json.loads(table[-1])
    assert results["idle_penalty"]["back_to_back_us"] > 0 and results["idle_penalty"]["paced_us"] > 0
    assert "over the machine's idle penalty" in out  # the paced row divided by it
    assert results["throughput"]["ratio_worker_over_naive"] > 0
    assert results["throughput"]["steady_n"] > 0
    # a command published only after the one before it is done, or one every 200 ms, finds the
    # worker asleep: it has to wake up for each, and the benchmark counts those wake-ups
    assert results["throughput"]["serial_sleeps_per_cmd"] >= 1
    assert results["throughput"]["steady_sleeps_per_cmd"] >= 1
    assert "paced / one at a time: worker" in out and "paced / one at a time: naive loop" in out
    assert results["python"]["spaced"]["p50_ms"] > 0
    assert results["python"]["spaced"]["child_faults"] > 0  # every fresh child copies pages
    # the idle window read on the scheduler's clock too (0.5 s: the worker may not wake in it)
    assert isinstance(results["throughput"]["idle_sched_millicores"], float)
    assert isinstance(results["throughput"]["idle_busy_periods"], list)
    assert "busiest 50 ms of the idle window" in out
    assert results["result"]["json_mib"] > 0 and results["result"]["cpu_s"] > 0
    transfer = results["transfer"]
    assert (transfer["rows"], transfer["chunks"]) == (2000, 4) and transfer["rows_per_s"] > 0
    assert transfer["rss_peak_mib"] >= transfer["rss_start_mib"] > 0
    labels = (
        "burst: worker / naive loop CPU",
        "trivial step, warm, p50",
        "50 MB tabular result, wall",
        "transfer 1M rows postgres → duckdb",
        "  peak RSS above the start",
    )
    for label in labels:
        assert any(line.startswith(label) for line in table), label
