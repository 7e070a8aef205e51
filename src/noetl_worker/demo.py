"""``noetl-worker demo``: the real worker tree against an embedded nats-server and the stub
control plane, on a fresh machine with no other service running.

Publishes a handful of commands (one or more per tool kind that needs no external service; the
``postgres`` tool too when ``--postgres-dsn`` names a database),
waits for their terminal events (a progress line meanwhile), prints a table (command, tool,
status, duration; large runs list only the showcase commands and any unexpected ones), a per-tool
summary and the key metrics, and exits 0 — or 1 if a command did not end as expected.

Then a small workflow runs as real playbooks do on the Python server: a step passes a value to
the next one through ``{{ step.field }}``, a failing step is routed to a handler by a
``call.error`` arc, and the execution still ends ``playbook.failed`` (a handled error does not
rescue it there).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attrs
import trio

from .config import Settings
from .testing import (
    Arc,
    StubState,
    WorkflowStep,
    open_nats_server,
    open_publisher,
    open_stub_server,
    open_worker,
)

# Runs with more commands than this list only the showcase commands and unexpected outcomes; the
# per-tool summary covers the rest.
DETAIL_ROWS = 40
MAX_UNEXPECTED_ROWS = 20
PROGRESS_EVERY = 0.5  # seconds between progress updates
# Events the stub server writes itself (at enqueue and claim time): not the worker's reports.
SERVER_EVENTS = frozenset({"command.issued", "command.claimed"})
TERMINAL_EVENTS = frozenset({"command.completed", "command.failed"})


@attrs.frozen
class DemoCommand:
    step: str
    tool_kind: str
    tool_config: dict[str, Any]
    expect: str  # the terminal event's status we expect
    input: dict[str, Any] = attrs.field(factory=dict)


PY_MAIN = (
    "def main(name, count):\n"
    "    return {'greeting': f'hello {name}', 'squares': [i * i for i in range(count)]}\n"
)
# Over the 100 KiB inline budget: travels as a result reference (PUT /api/result + shared memory).
PY_BIG = (
    "def main():\n"
    "    return {'rows': [{'i': i, 'pad': 'x' * 40} for i in range(4000)], 'columns': ['i', 'pad']}\n"
)


def demo_commands(
    server_url: str, extra_noops: int = 0, postgres_dsn: str | None = None
) -> list[DemoCommand]:
    commands = [
        DemoCommand(
            "http_get", "http", {"url": f"{server_url}/api/worker/pools", "method": "GET"}, "success"
        ),
        DemoCommand("say_hello", "noop", {"message": "hello from the demo"}, "success"),
        DemoCommand("shell_one", "shell", {"command": "echo hello from sh; uname -s"}, "success"),
        DemoCommand("shell_list", "shell", {"cmds": ["echo one", "echo two"], "env": {"X": "1"}}, "success"),
        DemoCommand("shell_fails", "shell", {"command": "echo oops >&2; exit 3"}, "error"),
        DemoCommand("shell_timeout", "shell", {"command": "sleep 30", "timeout": 1}, "error"),
        DemoCommand(
            "python_main", "python", {"code": PY_MAIN, "args": {"name": "noetl", "count": 5}}, "success"
        ),
        DemoCommand(
            "python_big",
            "python",
            {"code": PY_BIG},
            "success",
        ),
        DemoCommand("duckdb_query", "duckdb", {"query": "SELECT 42 AS answer, 'duck' AS name"}, "success"),
        DemoCommand(
            "task_seq",
            "task_sequence",
            {
                "tasks": [
                    {
                        "first": {
                            "kind": "noop",
                            "result": {"token": "abc"},
                            "set": {"tok": "{{ result.data.token }}"},
                        }
                    },
                    {"second": {"kind": "shell", "command": "echo got {{ tok }}"}},
                ]
            },
            "success",
        ),
        DemoCommand(
            "child_playbook",
            "playbook",
            {"path": "demo/child", "poll_interval": 0.2, "timeout": 30},
            "success",
        ),
        DemoCommand("unknown_tool", "does_not_exist", {}, "FAILED"),
    ]
    if postgres_dsn:
        query = "SELECT current_database() AS db, 6 * 7 AS answer; SELECT 1 AS one"
        commands.append(
            DemoCommand(
                "postgres_query", "postgres", {"connection_string": postgres_dsn, "query": query}, "success"
            )
        )
    commands += [DemoCommand(f"noop_{i}", "noop", {"result": i}, "success") for i in range(extra_noops)]
    return commands


def _status(state: StubState, command_id: Any) -> str:
    """``success``, ``error`` (the tool ran and failed), ``FAILED`` (it could not run), or
    ``(none)``; read from the events the worker sent, in either dialect."""
    return _status_of(state.events_for(command_id))


def _status_of(events: Sequence[Any]) -> str:
    """:func:`_status` from one command's events (in the order the server stored them)."""
    terminal = next((e for e in events if e.event_type in TERMINAL_EVENTS), None)
    if terminal is None:
        return "(none)"
    payload = terminal.payload if isinstance(terminal.payload, dict) else {}
    if terminal.event_type == "command.completed":
        return str(payload.get("status") or "success").lower().replace("completed", "success")
    for event in events:
        body = event.payload if isinstance(event.payload, dict) else {}
        if event.event_type == "call.error" and isinstance(body.get("response"), dict):
            return "error"
    return "FAILED"


def _why(state: StubState, command_id: Any) -> str:
    """What the worker reported about a command: its error, or the tool's error and stderr."""
    for event in reversed(state.events_for(command_id)):
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.event_type in ("call.error", "command.failed") and payload.get("error"):
            return str(payload["error"])
        if event.event_type == "call.done":
            context = (payload.get("result") or {}).get("context") or {}
            detail = context.get("error") or "no error message"
            stderr = str(context.get("stderr") or "").strip()[-300:]
            return f"{detail}" + (f"; stderr: {stderr}" if stderr else "")
    return "no events from the worker"


async def _run(settings: Settings, extra_noops: int, postgres_dsn: str | None, out: TextIO) -> int:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    async with open_nats_server() as nats, open_stub_server(StubState(auto_complete_after_polls=2)) as stub:
        say(f"demo: nats-server {nats.url}, stub control plane {stub.url}")
        env = {"NATS_URL": nats.url, "NOETL_SERVER_URL": stub.url}
        settings = attrs.evolve(Settings.from_env(env), **_keep(settings))
        async with open_publisher(nats.url) as publisher, open_worker(settings) as worker:
            say(f"demo: worker {settings.worker_id} ready; metrics on {', '.join(worker.urls)}")
            specs = demo_commands(stub.url, extra_noops, postgres_dsn)
            queued = []
            started = time.monotonic()  # the clock of the summary: first publish → last terminal event
            for spec in specs:
                command = stub.state.enqueue_command(
                    step=spec.step, tool_kind=spec.tool_kind, tool_config=spec.tool_config, input=spec.input
                )
                queued.append((spec, command))
                await publisher.publish_command(command.notification(stub.url))
            say(f"demo: published {len(queued)} commands; waiting for their terminal events")
            progress = _Progress(out, len(queued), started)
            deadline = max(120.0, len(queued) / 20)
            with trio.move_on_after(deadline):
                while (done := sum(1 for _, c in queued if c.terminal)) < len(queued):
                    progress.update(done)
                    await trio.sleep(PROGRESS_EVERY)
            elapsed = time.monotonic() - started
            progress.finish(sum(1 for _, c in queued if c.terminal))
            # One pass over the server's event log (events_for scans it: quadratic for large runs).
            by_command: dict[str, list[Any]] = {}
            for event in stub.state.events:
                if event.event_type not in SERVER_EVENTS:
                    by_command.setdefault(str(event.command_id), []).append(event)
            results: list[_Outcome] = []
            for spec, command in queued:
                events = by_command.get(str(command.command_id), [])
                terminal = next((e for e in events if e.event_type in TERMINAL_EVENTS), None)
                status = _status_of(events)
                duration = (terminal.received_at - events[0].received_at) if terminal is not None else None
                results.append(_Outcome(spec, command.command_id, status, duration))
            failures = sum(not r.ok for r in results)
            _details(say, results)
            for outcome in results:
                if not outcome.ok:
                    say(f"  {outcome.spec.step}: {_why(stub.state, outcome.command_id)}")
            _per_tool(say, results)
            flow_ok = await _workflow(say, stub, publisher)
            runtime = worker.runtime
        # The worker has drained and deregistered: its metrics are final.
        if runtime is not None:
            _metrics(say, runtime.metrics.registry, specs)
        rate = len(queued) / elapsed if elapsed > 0 else 0.0
        say(
            f"\ndemo: {len(queued) - failures}/{len(queued)} commands ended as expected; "
            f"{elapsed:.2f} s from the first publish to the last terminal event ({rate:.0f} commands/s; "
            f"excludes starting nats-server, the stub server and the worker, and the drain)"
        )
        return 1 if failures or not flow_ok else 0


FLOW_GREET = "def main(name):\n    return {'greeting': 'hello ' + name}\n"
FLOW_SHOUT = "def main(greeting):\n    return {'loud': greeting.upper() + '!'}\n"


def demo_workflow() -> list[WorkflowStep]:
    """greet → shout (reads ``{{ greet.greeting }}``) → risky (exits 3) → handler on call.error."""
    return [
        WorkflowStep(
            "greet",
            "python",
            {"code": FLOW_GREET},
            input={"name": "{{ workload.who }}"},
            next=(Arc("shout"),),
        ),
        WorkflowStep(
            "shout",
            "python",
            {"code": FLOW_SHOUT},
            input={"greeting": "{{ greet.greeting }}"},
            next=(Arc("risky"),),
        ),
        WorkflowStep(
            "risky",
            "shell",
            {"cmds": ["echo {{ shout.loud }}", "echo giving up >&2; exit 3"]},
            next=(Arc("handler", on="call.error"), Arc("celebrate", on="call.done")),
        ),
        WorkflowStep("handler", "shell", {"cmds": ["echo handled the failure of risky"]}),
        WorkflowStep("celebrate", "noop"),
    ]


async def _workflow(say: Any, stub: Any, publisher: Any) -> bool:
    """Run :func:`demo_workflow` through the worker; print what the server stored per step."""
    state: StubState = stub.state
    send, receive = trio.open_memory_channel[Any](64)
    state.on_issue = send.send_nowait
    row = state.run_workflow(demo_workflow(), workload={"who": "noetl"}, path="demo/flow")
    with trio.move_on_after(60):
        async with receive:
            while state.playbook_terminal(row.execution_id) is None:
                with trio.move_on_after(0.5):
                    command = await receive.receive()
                    await publisher.publish_command(command.notification(stub.url))
    state.on_issue = None
    results = state.step_results.get(row.execution_id, {})
    ran = [c.step for c in state.commands.values() if c.execution_id == row.execution_id]
    terminal = state.playbook_terminal(row.execution_id)
    say("")
    say("workflow demo/flow: a value passed between steps, a failing step routed to its handler")
    _table(
        say,
        ("step", "ended with", "stored result"),
        [
            (
                step,
                _status(state, cid := _command_of(state, row.execution_id, step)),
                _short(results[step]) if step in results else f"(none: {_why(state, cid)})",
            )
            for step in ran
        ],
    )
    ok = (
        results.get("shout") == {"loud": "HELLO NOETL!"}
        and ran == ["greet", "shout", "risky", "handler"]
        and terminal == "playbook.failed"
    )
    say(
        f"demo: workflow demo/flow ended {terminal} after its handler ran; "
        + ("values passed and the error was routed as expected" if ok else "NOT as expected")
    )
    return ok


def _command_of(state: StubState, execution_id: int, step: str) -> Any:
    return next(
        c.command_id for c in state.commands.values() if c.execution_id == execution_id and c.step == step
    )


def _short(value: Any) -> str:
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@attrs.frozen
class _Outcome:
    spec: DemoCommand
    command_id: Any
    status: str
    duration: float | None  # the worker's first event (command.started) → its terminal event, s

    @property
    def ok(self) -> bool:
        return self.status == self.spec.expect

    def row(self) -> tuple[str, ...]:
        took = f"{self.duration * 1000:.0f} ms" if self.duration is not None else "-"
        check = "ok" if self.ok else f"expected {self.spec.expect}"
        return (self.spec.step, self.spec.tool_kind, self.status, took, check)


class _Progress:
    """One progress line while the commands run: rewritten in place on a terminal, else a line
    now and then (logs and CI output stay short)."""

    def __init__(self, out: TextIO, total: int, started: float, clock: Callable[[], float] = time.monotonic):
        self.out, self.total, self.started, self.clock = out, total, started, clock
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.last_line = started
        self.shown = False

    def _line(self, done: int) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        width = 30
        filled = width * done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        return f"demo: [{bar}] {done}/{self.total} done, {elapsed:.1f} s, {done / elapsed:.0f} commands/s"

    def update(self, done: int) -> None:
        now = self.clock()
        if self.tty:
            print("\r" + self._line(done), end="", file=self.out, flush=True)
            self.shown = True
        elif now - self.last_line >= 2.0:
            print(self._line(done), file=self.out, flush=True)
            self.last_line = now

    def finish(self, done: int) -> None:
        if self.tty and self.shown:
            print("\r" + self._line(done), file=self.out, flush=True)


def _details(say: Any, results: list[_Outcome]) -> None:
    """Every command of a small run; the showcase commands and unexpected outcomes of a large one."""
    header = ("command", "tool", "status", "duration", "check")
    if len(results) <= DETAIL_ROWS:
        _table(say, header, [r.row() for r in results])
        return
    showcase = [r for r in results if not r.spec.step.startswith("noop_")]
    unexpected = [r for r in results if not r.ok and r not in showcase]
    rows = [r.row() for r in showcase + unexpected[:MAX_UNEXPECTED_ROWS]]
    _table(say, header, rows)
    hidden = len(results) - len(rows)
    say(f"  … and {hidden} more commands (their tools are in the summary below)")


def _per_tool(say: Any, results: list[_Outcome]) -> None:
    by_kind: dict[str, list[_Outcome]] = {}
    for outcome in results:
        by_kind.setdefault(outcome.spec.tool_kind, []).append(outcome)
    rows = []
    for kind, outcomes in sorted(by_kind.items()):
        statuses: dict[str, int] = {}
        for o in outcomes:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        times = sorted(o.duration * 1000 for o in outcomes if o.duration is not None)
        p50 = f"{statistics.median(times):.0f}" if times else "-"
        p95 = f"{times[min(len(times) - 1, int(len(times) * 0.95))]:.0f}" if times else "-"
        worst = f"{times[-1]:.0f}" if times else "-"
        rows.append(
            (
                kind,
                str(len(outcomes)),
                str(sum(o.ok for o in outcomes)),
                ", ".join(f"{k} {n}" for k, n in sorted(statuses.items())),
                p50,
                p95,
                worst,
            )
        )
    say("")
    say("per tool (durations in ms, from command.started to the terminal event, as the server saw them):")
    _table(say, ("tool", "commands", "as expected", "statuses", "p50", "p95", "max"), rows)


def _metrics(say: Any, registry: Any, specs: list[DemoCommand]) -> None:
    def value(name: str, **labels: str) -> float:
        return float(registry.get_sample_value(name, labels) or 0.0)

    kinds = sorted({s.tool_kind for s in specs})
    events = ("command.started", "call.done", "call.error", "command.completed", "command.failed")
    lines = [
        ("noetl_worker_pulls_total{outcome=claimed}", value("noetl_worker_pulls_total", outcome="claimed")),
        (
            "noetl_worker_dispatch_errors_total",
            sum(value("noetl_worker_dispatch_errors_total", tool_kind=k) for k in kinds),
        ),
        ("noetl_worker_result_store_put_bytes_total", value("noetl_worker_result_store_put_bytes_total")),
        (
            "noetl_worker_event_emit_duration_seconds_count",
            sum(value("noetl_worker_event_emit_duration_seconds_count", event_type=e) for e in events),
        ),
        ("noetl_worker_concurrent_dispatches", value("noetl_worker_concurrent_dispatches")),
    ]
    say("")
    say("key metrics (after the drain):")
    for name, number in lines:
        say(f"  {name:<50} {number:.0f}")


def _keep(settings: Settings) -> dict[str, Any]:
    """What the demo keeps from the user's environment (not where NATS and the server are)."""
    return {
        k: getattr(settings, k)
        for k in ("worker_id", "max_concurrent", "metrics_bind", "log_level", "log_format", "command_timeout")
    }


def _table(say: Any, header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    say("")
    say("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    say("  ".join("-" * w for w in widths))
    for row in rows:
        say("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def run_demo(
    settings: Settings, *, extra_noops: int = 0, postgres_dsn: str | None = None, out: TextIO | None = None
) -> int:
    result: int = trio.run(_run, settings, extra_noops, postgres_dsn, out or sys.stdout)
    return result
