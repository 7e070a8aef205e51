"""``noetl-worker demo``: the real worker tree against an embedded nats-server and the stub
control plane, on a fresh machine with no other service running.

Publishes a handful of commands (one or more per tool kind that needs no external service; the
``postgres`` tool too when ``--postgres-dsn`` names a database),
waits for their terminal events, prints a table (command, tool, status, duration) and the key
metrics, and exits 0 — or 1 if a command did not end as expected.

Then a small workflow runs as real playbooks do on the Python server: a step passes a value to
the next one through ``{{ step.field }}``, a failing step is routed to a handler by a
``call.error`` arc, and the execution still ends ``playbook.failed`` (a handled error does not
rescue it there).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
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
    terminal = _terminal(state, command_id)
    if terminal is None:
        return "(none)"
    payload = terminal.payload if isinstance(terminal.payload, dict) else {}
    if terminal.event_type == "command.completed":
        return str(payload.get("status") or "success").lower().replace("completed", "success")
    for event in state.events_for(command_id):
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


def _terminal(state: StubState, command_id: Any) -> Any:
    for event in state.events_for(command_id):
        if event.event_type in ("command.completed", "command.failed"):
            return event
    return None


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
            for spec in specs:
                command = stub.state.enqueue_command(
                    step=spec.step, tool_kind=spec.tool_kind, tool_config=spec.tool_config, input=spec.input
                )
                queued.append((spec, command))
                await publisher.publish_command(command.notification(stub.url))
            say(f"demo: published {len(queued)} commands; waiting for their terminal events")
            started = time.monotonic()
            with trio.move_on_after(120):
                await stub.state.wait_terminal([c for _, c in queued], timeout=120)
            elapsed = time.monotonic() - started
            rows, failures = [], 0
            for spec, command in queued:
                terminal = _terminal(stub.state, command.command_id)
                status = _status(stub.state, command.command_id)
                events = stub.state.events_for(command.command_id)
                duration = (terminal.received_at - events[0].received_at) if terminal is not None else 0.0
                ok = status == spec.expect
                failures += not ok
                rows.append(
                    (
                        spec.step,
                        spec.tool_kind,
                        status,
                        f"{duration * 1000:.0f} ms",
                        "ok" if ok else f"expected {spec.expect}",
                    )
                )
            _table(say, ("command", "tool", "status", "duration", "check"), rows)
            for spec, command in queued:
                if _status(stub.state, command.command_id) != spec.expect:
                    say(f"  {spec.step}: {_why(stub.state, command.command_id)}")
            flow_ok = await _workflow(say, stub, publisher)
            runtime = worker.runtime
        # The worker has drained and deregistered: its metrics are final.
        if runtime is not None:
            _metrics(say, runtime.metrics.registry, specs)
        say(f"\ndemo: {len(queued) - failures}/{len(queued)} commands ended as expected in {elapsed:.2f}s")
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
