"""``noetl-worker tool run`` and ``noetl-worker watch`` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from .conftest import PYTHON, subprocess_env

DSN = os.environ.get("NOETL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    with trio.fail_after(timeout):
        done = await trio.run_process(
            [PYTHON, "-m", "noetl_worker", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=subprocess_env(NOETL_LOG_LEVEL="warning", **(env or {})),
        )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


async def test_a_python_step_with_input_prints_the_stored_result(tmp_path: Path) -> None:
    step = write(
        tmp_path,
        "step.yaml",
        """
        step: double
        tool:
          kind: python
          code: |
            def main(n):
                print("working")
                return {"doubled": n * 2}
        """,
    )
    done = await cli("tool", "run", "--config", step, "--input", '{"n": 3}', "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["status"] == "success"
    assert out["value"] == {"doubled": 6} and "working" in out["stdout"]

    human = await cli("tool", "run", "--kind", "python", "--config", step, "--input", '{"n": 4}')
    assert human.returncode == 0 and "status: success" in human.stdout and '"doubled": 8' in human.stdout


async def test_a_playbook_step_is_rendered_against_the_workload(tmp_path: Path) -> None:
    playbook = write(
        tmp_path,
        "pb.yaml",
        """
        apiVersion: noetl.io/v2
        kind: Playbook
        metadata: {name: demo}
        workload:
          greeting: hello from the workload
        workflow:
          - step: start
            next: [{step: say}]
          - step: say
            tool:
              kind: shell
              command: "echo '{{ workload.greeting }}'"
        """,
    )
    done = await cli("tool", "run", "--playbook", playbook, "--step", "say", "--json")
    assert done.returncode == 0, done.stderr
    assert "hello from the workload" in json.dumps(json.loads(done.stdout)["value"])


async def test_a_failing_tool_exits_1_and_a_timeout_too(tmp_path: Path) -> None:
    failing = write(tmp_path, "fail.yaml", "kind: shell\ncommand: 'echo nope >&2; exit 3'\n")
    done = await cli("tool", "run", "--config", failing, "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["status"] == "error"

    slow = write(
        tmp_path, "slow.yaml", "kind: python\ntimeout: 1\ncode: |\n  import time\n  time.sleep(30)\n"
    )
    timed = await cli("tool", "run", "--config", slow, "--json")
    assert timed.returncode == 1 and json.loads(timed.stdout)["status"] == "timeout"


async def test_credentials_from_a_local_file_are_applied_and_scrubbed(tmp_path: Path) -> None:
    parts = psycopg.conninfo.conninfo_to_dict(DSN)
    password = "s3cr3t-tool-run-pw"
    credentials = {
        "pg_local": {
            "type": "postgres",
            "data": {
                "db_host": parts.get("host", "127.0.0.1"),
                "db_port": int(parts.get("port", 5432)),
                "db_user": parts.get("user", "postgres"),
                "db_password": password,
                "db_name": parts.get("dbname", "test"),
            },
        }
    }
    creds = write(tmp_path, "creds.json", json.dumps(credentials))
    step = write(
        tmp_path,
        "pg.yaml",
        "kind: postgres\nauth: pg_local\n"
        f"query: \"SELECT current_database() AS db, '{password}' AS leaked\"\n",
    )
    done = await cli("tool", "run", "--config", step, "--credentials", creds, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(done.stdout)["value"]["rows"]
    assert rows[0]["db"] == parts.get("dbname", "test")
    assert password not in done.stdout

    unknown = write(tmp_path, "pg2.yaml", "kind: postgres\nauth: nobody\nquery: SELECT 1\n")
    missing = await cli("tool", "run", "--config", unknown, "--credentials", creds, "--json")
    assert missing.returncode == 1 and "nobody" in json.loads(missing.stdout)["error"]


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    playbook = write(tmp_path, "pb.yaml", "workflow:\n  - step: a\n    tool: {kind: noop}\n")
    step = write(tmp_path, "noop.yaml", "kind: noop\n")
    cases: list[tuple[list[str], str]] = [
        (["tool", "run"], "--config"),
        (["tool", "run", "--playbook", playbook, "--step", "zzz"], "no step 'zzz'"),
        (["tool", "run", "--config", step, "--input", "[1]"], "JSON object"),
        (["tool", "run", "--config", playbook], "no tool kind"),
        (["tool", "run", "--config", str(tmp_path / "missing.yaml")], "cannot read"),
    ]
    for args, message in cases:
        done = await cli(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


async def test_watch_prints_plain_lines_from_a_worker(tmp_path: Path) -> None:
    from noetl_worker.config import Bind
    from noetl_worker.event_stream import EventHub
    from noetl_worker.http_server import make_app, serve_http
    from noetl_worker.metrics import Metrics
    from noetl_worker.watch import Board, format_line, normalize_url, watch

    assert normalize_url("http://h:9090") == "ws://h:9090/events"
    assert normalize_url(None) == "ws://127.0.0.1:9090/events"
    metrics = Metrics()
    hub = EventHub(metrics)
    stop = trio.Event()
    record: dict[str, Any] = {
        "event": "failed",
        "at": "2026-01-01T00:00:00.000Z",
        "execution_id": 1,
        "command_id": "c9",
        "step": "load",
        "tool_kind": "http",
        "status": "failed",
        "duration_ms": 12,
        "error": "HTTP 500",
    }
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            serve_http, make_app(metrics, lambda: (True, ""), hub), Bind("127.0.0.1", 0), stop
        )

        class Out:
            lines: list[str] = []

            def write(self, text: str) -> None:
                self.lines.append(text)

            def flush(self) -> None:
                pass

            def isatty(self) -> bool:
                return False

        out = Out()
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                codes: list[int] = []

                async def follow() -> None:
                    codes.append(await watch(normalize_url(urls[0]), out, limit=1))  # type: ignore[arg-type]

                inner.start_soon(follow)
                await hub.wait_for_clients(1)
                hub.publish(record)
        stop.set()
    assert codes == [0]
    assert out.lines == [format_line(record) + "\n"]
    assert 'error="HTTP 500"' in out.lines[0] and "duration_ms=12" in out.lines[0]
    board = Board(rows=1)
    board.update(record)
    board.update({**record, "command_id": "c10", "event": "claimed"})
    assert list(board.commands) == ["c10"] and board.render().row_count == 1


async def test_watch_reports_an_unreachable_worker() -> None:
    from noetl_worker.testing import free_port

    done = await cli("watch", f"ws://127.0.0.1:{free_port()}/events", timeout=30)
    assert done.returncode == 1 and "cannot connect" in done.stderr


async def test_watch_reports_a_disabled_stream(capsys: pytest.CaptureFixture[str]) -> None:
    from noetl_worker.config import Bind
    from noetl_worker.http_server import make_app, serve_http
    from noetl_worker.metrics import Metrics
    from noetl_worker.watch import normalize_url, watch

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        app = make_app(Metrics(), lambda: (True, ""))  # no hub: WORKER_EVENTS_STREAM is off
        urls = await nursery.start(serve_http, app, Bind("127.0.0.1", 0), stop)
        with trio.fail_after(10):
            code = await watch(normalize_url(urls[0]), sys.stdout)
        stop.set()
    assert code == 1 and "WORKER_EVENTS_STREAM=true" in capsys.readouterr().err
