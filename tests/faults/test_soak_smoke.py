"""bench/soak.py runs end to end (a few seconds of it): the worker survives the mix, completes
every command, and the report has the numbers the soak is read for."""

from __future__ import annotations

import json
import subprocess

from ..conftest import PYTHON, SRC, subprocess_env


def test_the_soak_script_smoke_run() -> None:
    script = SRC.parent / "bench" / "soak.py"
    done = subprocess.run(
        [PYTHON, str(script), "--minutes", "0.3", "--rate", "10", "--sample", "2"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["worker_alive_at_end"] and report["completed"] == report["commands"] > 0
    for key in ("rss_mib_growth", "rss_mib_per_minute", "fds_first", "fds_last", "fds_per_minute"):
        assert key in report
