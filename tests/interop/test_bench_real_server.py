"""``bench/real_server.py --smoke`` still runs and reports its numbers (both workers on the real
server), so the real-server benchmark does not rot between full runs. No thresholds: timings
belong to the benchmark, not to a test."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent.parent


async def test_the_real_server_benchmark_runs_and_reports_both_workers() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--json", "--only", "real_server"]
    with trio.fail_after(600):
        done = await trio.run_process(
            argv, cwd=ROOT, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    results = json.loads(out.splitlines()[-1])["real_server"]
    assert (results["iterations"], results["executions"]) == (10, 3)
    for name in ("noetl", "ours"):
        worker = results["workers"][name]
        # the loop: one command per item and one for its `end` step; 3 steps per execution
        for workload, commands in (("loop", 11), ("concurrent", 9)):
            row = worker[workload]
            assert row["outcomes"] == ["playbook.completed"], (name, workload, row)
            assert row["step_commands"] == commands, (name, workload, row)
            assert row["worker_cpu_ms_per_command"] > 0 and row["claim_to_done_p50_ms"] > 0
        assert 0 < worker["idle_pss_mib_after"] <= worker["idle_rss_mib_after"]
    assert "idle PSS after the workloads, ours / noetl's" in out
    # ours runs every python step in a fresh child: the process group costs more than its main
    # process, and that difference is what the isolation row sets against the target's budget
    ours = results["workers"]["ours"]["loop"]
    assert ours["worker_cpu_ms_per_command"] > ours["worker_process_cpu_ms_per_command"]
    assert "step isolation alone / a third of noetl's CPU" in out
    # and that difference is split by process: every fork copies pages in the fork server, every
    # fresh child copies pages of its own; noetl's worker has no fork server to split
    for workload in ("loop", "concurrent"):
        row = results["workers"]["ours"][workload]
        assert row["fork_server_faults_per_command"] > 0 and row["step_child_faults_per_command"] > 0
        assert "fork_server_cpu_ms_per_command" not in results["workers"]["noetl"][workload]
