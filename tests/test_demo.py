from __future__ import annotations

import re

import trio

from .conftest import PYTHON, subprocess_env


async def test_the_demo_runs_every_command_as_expected_and_exits_0() -> None:
    with trio.fail_after(120):
        result = await trio.run_process(
            [PYTHON, "-m", "noetl_worker", "demo", "--commands", "5"],
            env=subprocess_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    match = re.search(r"demo: (\d+)/(\d+) commands ended as expected", out)
    assert match and match.group(1) == match.group(2) and int(match.group(2)) >= 17
    for kind in ("noop", "shell", "python", "http", "duckdb", "task_sequence", "playbook"):
        assert re.search(rf"^\S+\s+{kind}\s+", out, flags=re.MULTILINE), kind
    assert "noetl_worker_pulls_total{outcome=claimed}" in out
    # The workflow: a value passed on ({{ greet.greeting }} → shout), the failure routed to its
    # handler by a call.error arc, and the execution still failed, as on the real Python server.
    assert re.search(r"^shout\s+success\s+\{\"loud\": \"HELLO NOETL!\"\}", out, flags=re.MULTILINE), out
    assert re.search(
        r"^risky\s+error\s+\(none: shell command exited with returncode=3: ", out, flags=re.MULTILINE
    ), out
    assert re.search(r"^handler\s+success\s+", out, flags=re.MULTILINE), out
    assert "demo: workflow demo/flow ended playbook.failed after its handler ran; values passed" in out
