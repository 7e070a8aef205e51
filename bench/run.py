"""Every benchmark, one table: measured against target, with the machine's cores and load.

    python bench/run.py [--json] [--smoke] [--only NAME ...]

Runs each benchmark in its own process (the repository's interpreter) and reads the JSON line it
prints with ``--json``:

- ``idle_penalty`` bench/idle_penalty.py: the machine's own cost of waking up — the same unit
  of pure-Python work back to back and after a 50 ms sleep (what a paced worker does), which the
  paced/burst row is then divided by;
- ``throughput``  bench/throughput.py: the worker and the naive design-card loop alternating
  (bursts of 500 at concurrency 16), one command at a time back to back, paced 20/s, idle;
- ``python``      bench/python_tool.py: a trivial python step through the tool, warm;
- ``result``      bench/result_reference.py: a 50 MB tabular result, scrub + PUT + shared memory;
- ``transfer``    bench/transfer.py: the transfer tool moving 1,000,000 rows from PostgreSQL
  (``NOETL_TEST_PG_DSN``, default the local trust one) into DuckDB — rows/s and peak RSS, no
  target;
- ``real_server`` bench/real_server.py, when present: ours and noetl's own worker on the real
  NoETL server.

``--smoke`` runs each with a tiny N and checks no threshold (CI runs it so the benchmarks never
rot); the numbers then mean nothing. On a shared machine wall times are noisy: the CPU figures
and the ratios measured in one run are the ones to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from procstat import ratio  # bench/, sys.path[0] when run as a script

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@attrs.frozen
class Check:
    label: str
    value: Callable[[dict[str, Any]], float]
    target: str
    ok: Callable[[float, dict[str, Any]], bool]
    unit: str = ""
    needs: str = ""  # another benchmark whose results this row reads (``out["_<name>"]``)


@attrs.frozen
class Bench:
    name: str
    script: str
    args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    checks: tuple[Check, ...]
    optional: bool = False


def info(label: str, value: Callable[[dict[str, Any]], float], unit: str = "", needs: str = "") -> Check:
    """A row with no target: a number to read next to the ones that have one."""
    return Check(label, value, "-", lambda v, o: True, unit, needs)


def _paced_over_burst(o: dict[str, Any]) -> float:
    return ratio(float(o["steady_cpu_ms_per_cmd"]), float(o["burst_cpu_ms_per_cmd"]))


def _real(workload: str, field: str) -> Callable[[dict[str, Any]], float]:
    """ours / noetl's for one number of one real-server workload."""

    def ours_over_noetl(o: dict[str, Any]) -> float:
        workers = o["workers"]
        return ratio(float(workers["ours"][workload][field]), float(workers["noetl"][workload][field]))

    return ours_over_noetl


def _isolation_over_budget(workload: str) -> Callable[[dict[str, Any]], float]:
    """What our python fork server and step children cost per command (the process group less
    the main process), over the whole per-command budget the ≤ 1/3 target leaves: above 1, the
    isolation alone is over it, before the worker has done any work of its own."""

    def isolation_over_budget(o: dict[str, Any]) -> float:
        ours, noetl = o["workers"]["ours"][workload], o["workers"]["noetl"][workload]
        group, main = ours["worker_cpu_ms_per_command"], ours["worker_process_cpu_ms_per_command"]
        isolation = float(group) - float(main)
        return ratio(isolation, float(noetl["worker_cpu_ms_per_command"]) / 3)

    return isolation_over_budget


def _real_server_checks() -> list[Check]:
    checks = []
    for workload, label in (("loop", "loop x200"), ("concurrent", "50 x 3 steps")):
        checks += [
            Check(
                f"real server {label}: worker CPU ours / noetl's",
                _real(workload, "worker_cpu_ms_per_command"),
                "≤ 0.33",
                lambda v, o: v <= 1 / 3,
            ),
            Check(
                "  main process alone (ours without step isolation)",
                _real(workload, "worker_process_cpu_ms_per_command"),
                "≤ 0.33",
                lambda v, o: v <= 1 / 3,
            ),
            info(
                "  ours: step isolation alone / a third of noetl's CPU",
                _isolation_over_budget(workload),
            ),
            Check("  wall ours / noetl's", _real(workload, "wall_s"), "< 1", lambda v, o: v < 1),
            info(
                "  claim→done p50 ours / noetl's",
                _real(workload, "claim_to_done_p50_ms"),
            ),
        ]
    checks.append(
        info(
            "real server: idle PSS after the workloads, ours / noetl's (process groups)",
            lambda o: ratio(
                float(o["workers"]["ours"]["idle_pss_mib_after"]),
                float(o["workers"]["noetl"]["idle_pss_mib_after"]),
            ),
        )
    )
    return checks


BENCHES = (
    Bench(
        "idle_penalty",
        "idle_penalty.py",
        (),
        ("--units", "5", "--rounds", "1"),
        (
            info(
                "machine: same Python work after a 50 ms sleep / back to back",
                lambda o: o["penalty"],
            ),
            info("  extra CPU per wake-up", lambda o: o["extra_us_per_wakeup"], "us"),
        ),
    ),
    Bench(
        "throughput",
        "throughput.py",
        (),
        (
            "--commands",
            "40",  # 8 cost the worker less than one 10 ms tick of CPU on a fast machine
            "--concurrency",
            "4",
            "--rounds",
            "1",
            "--idle",
            "0.5",
            "--steady",
            "1",
            "--rate",
            "5",
        ),
        (
            Check(
                "burst: worker / naive loop CPU",
                lambda o: o["ratio_worker_over_naive"],
                "≤ 0.6",
                lambda v, o: v <= 0.6,
            ),
            info(
                "burst: worker CPU per command",
                lambda o: o["burst_cpu_ms_per_cmd"],
                "ms",
            ),
            info(
                "burst: naive loop CPU per command",
                lambda o: o["naive_cpu_ms_per_cmd"],
                "ms",
            ),
            Check(
                "burst: throughput", lambda o: o["burst_cmd_per_s"], "≥ 300", lambda v, o: v >= 300, "cmd/s"
            ),
            Check("paced 20/s: CPU per command / burst", _paced_over_burst, "≤ 1.2", lambda v, o: v <= 1.2),
            info(
                "  … over the machine's idle penalty (1.0: all of it the machine's)",
                lambda o: ratio(_paced_over_burst(o), float(o["_idle_penalty"]["penalty"])),
                needs="idle_penalty",
            ),
            info(
                "one at a time, back to back: worker CPU per command",
                lambda o: o["serial_cpu_ms_per_cmd"],
                "ms",
            ),
            info(
                "  paced / one at a time: worker (what the idle gap alone costs)",
                lambda o: ratio(float(o["steady_cpu_ms_per_cmd"]), float(o["serial_cpu_ms_per_cmd"])),
            ),
            info(
                "  paced / one at a time: naive loop",
                lambda o: ratio(
                    float(o["naive_steady_cpu_ms_per_cmd"]), float(o["naive_serial_cpu_ms_per_cmd"])
                ),
            ),
            info("  paced: worker sleeps per command", lambda o: o["steady_sleeps_per_cmd"]),
            Check(
                "paced 20/s: publish→claim p50", lambda o: o["steady_p50_ms"], "< 5", lambda v, o: v < 5, "ms"
            ),
            Check(
                "paced 20/s: publish→claim p99",
                lambda o: o["steady_p99_ms"],
                "< 25",
                lambda v, o: v < 25,
                "ms",
            ),
            Check("idle RSS", lambda o: o["idle_rss_mib"], "≤ 45", lambda v, o: v <= 45, "MiB"),
            Check("idle CPU", lambda o: o["idle_millicores"], "< 5", lambda v, o: v < 5, "millicores"),
            info("  on the scheduler's clock", lambda o: o["idle_sched_millicores"], "millicores"),
            info(
                "  busiest 50 ms of the idle window",
                lambda o: max([b["ms"] for b in o["idle_busy_periods"]], default=0.0),
                "ms",
            ),
            Check(
                "peak RSS (16-wide bursts)", lambda o: o["peak_rss_mib"], "≤ 80", lambda v, o: v <= 80, "MiB"
            ),
        ),
    ),
    Bench(
        "python",
        "python_tool.py",
        ("200",),
        ("5",),
        (
            Check(
                "trivial step, warm, p50",
                lambda o: o["spaced"]["p50_ms"],
                "≤ 2.0",
                lambda v, o: v <= 2.0,
                "ms",
            ),
            info("  worker CPU per step", lambda o: o["spaced"]["cpu_ms"], "ms"),
            info("  fork server + child CPU per step", lambda o: o["spaced"]["isolation_cpu_ms"], "ms"),
            info(
                "  page faults per step (fork server + child)",
                lambda o: o["spaced"]["fork_server_faults"] + o["spaced"]["child_faults"],
            ),
            info("  back to back, p50", lambda o: o["back_to_back"]["p50_ms"], "ms"),
        ),
    ),
    Bench(
        "result",
        "result_reference.py",
        ("--raw", "--only-build"),
        ("--raw", "--only-build", "--mb", "1"),
        (
            Check("50 MB tabular result, wall", lambda o: o["wall_s"], "≤ 1.5", lambda v, o: v <= 1.5, "s"),
            info("  CPU", lambda o: o["cpu_s"], "s"),
            Check(
                "  peak RSS above the input",
                lambda o: o["rss_above_input_mib"],
                "≤ 2x JSON",
                lambda v, o: v <= 2 * o["json_mib"],
                "MiB",
            ),
        ),
    ),
    Bench(
        "transfer",
        "transfer.py",
        ("--rows", "1000000"),
        ("--rows", "2000", "--chunk", "500"),
        (
            info(
                "transfer 1M rows postgres → duckdb",
                lambda o: o["rows_per_s"],
                "rows/s",
            ),
            info("  wall", lambda o: o["wall_s"], "s"),
            info(
                "  peak RSS above the start",
                lambda o: o["rss_above_start_mib"],
                "MiB",
            ),
        ),
    ),
    Bench(
        "real_server",
        "real_server.py",
        (),
        ("--smoke",),
        tuple(_real_server_checks()),
        optional=True,
    ),
)


def run_one(bench: Bench, smoke: bool) -> dict[str, Any] | None:
    script = BENCH / bench.script
    if not script.exists():
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, str(script), *(bench.smoke_args if smoke else bench.args), "--json"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{bench.script} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    result["_load_average"] = os.getloadavg()[0]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="also print every number as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny N, no thresholds (CI)")
    parser.add_argument("--only", nargs="*", choices=[b.name for b in BENCHES], help="run only these")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start")
    results: dict[str, Any] = {"cores": os.cpu_count()}
    rows: list[tuple[str, str, str, str]] = []
    failed = False
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        try:
            out = run_one(bench, args.smoke)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if not bench.optional:
                raise
            rows.append((f"{bench.name}: failed, {str(exc).splitlines()[0]}", "-", "-", "failed"))
            continue
        if out is None:
            rows.append((f"{bench.name}: bench/{bench.script} not present", "-", "-", "skipped"))
            continue
        results[bench.name] = out
        for check in bench.checks:
            if check.needs and check.needs in results:
                out[f"_{check.needs}"] = results[check.needs]
        load = f"(load {out['_load_average']:.1f})"
        if not bench.checks:
            rows.append((f"{bench.name} {load}", "see its JSON", "-", "ran"))
        for check in bench.checks:
            if check.needs and f"_{check.needs}" not in out:
                continue  # that benchmark did not run (--only)
            value = float(check.value(out))
            verdict = (
                "-" if args.smoke or check.target == "-" else ("met" if check.ok(value, out) else "NOT met")
            )
            failed |= verdict == "NOT met"
            rows.append((f"{check.label} {load}", f"{value:.2f} {check.unit}".strip(), check.target, verdict))
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'measured':>18}  {'target':>10}  verdict")
    for label, value, target, verdict in rows:
        print(f"{label:<{width}}  {value:>18}  {target:>10}  {verdict}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        print(json.dumps(results, sort_keys=True))
    return 0 if args.smoke or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
