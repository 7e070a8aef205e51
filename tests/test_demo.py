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


async def test_a_large_demo_run_is_summarised_per_tool() -> None:
    from noetl_worker.demo import DETAIL_ROWS

    extra = DETAIL_ROWS + 5
    with trio.fail_after(180):
        result = await trio.run_process(
            [PYTHON, "-m", "noetl_worker", "demo", "--commands", str(extra)],
            env=subprocess_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    total = extra + 12
    # Only the showcase commands get a row; the noops are counted in the per-tool summary.
    assert not re.search(r"^noop_\d+\s", out, flags=re.MULTILINE)
    assert f"… and {extra} more commands" in out
    noop_row = re.search(r"^noop\s+(\d+)\s+(\d+)\s+success (\d+)\s+\d+\s+\d+\s+\d+", out, flags=re.MULTILINE)
    assert noop_row and noop_row.groups() == (str(extra + 1),) * 3  # say_hello is a noop too
    # As the Python server sees them: a timed-out shell step is an error there.
    assert re.search(r"^shell\s+4\s+4\s+error 2, success 2\s", out, flags=re.MULTILINE)
    # The time says what it measures.
    assert re.search(
        rf"demo: {total}/{total} commands ended as expected; [\d.]+ s from the first publish to the last "
        r"terminal event \(\d+ commands/s; excludes starting",
        out,
    )
    assert len(out.splitlines()) < 80


def test_progress_line_rewrites_in_place_on_a_terminal_and_is_sparse_otherwise() -> None:
    import io

    from noetl_worker.demo import _Progress

    now = [100.0]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    progress = _Progress(tty, 200, started=100.0, clock=lambda: now[0])
    for done in (0, 50, 100, 200):
        now[0] += 0.5
        progress.update(done)
    progress.finish(200)
    text = tty.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n")
    assert "[###############...............] 100/200 done" in text
    assert "200/200 done, 2.0 s, 100 commands/s" in text

    log = io.StringIO()
    now[0] = 100.0
    quiet = _Progress(log, 200, started=100.0, clock=lambda: now[0])
    for done in range(0, 200, 10):
        now[0] += 0.5
        quiet.update(done)
    quiet.finish(200)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 5  # one line per 2 s of a 10 s run, not one per update
