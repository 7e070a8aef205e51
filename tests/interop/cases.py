"""What each interop playbook must do on the real server — written to the truth of noetl's own
worker (which must pass every case), then required of ours.

A case names its playbook (``playbooks/<name>.yaml``), the terminal event expected, the steps that
must and must not have run, and a ``check`` reading specific stored values. A documented
improvement of ours over noetl's worker (``docs/compatibility.md``) is a case with ``improvement``
set: then ``check_ours`` states what our worker does instead, and the comparison of the two runs is
not required to be equal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from .harness import Run, Stack
from .target import FIXED, Target

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"

Outcome = Literal["completed", "failed"]


@attrs.frozen
class Env:
    """What a check may need besides the run: the HTTP target and the stack's data directory."""

    target: Target
    data_dir: Path
    stack: Stack


Check = Callable[[Run, Env], None]


def _no_check(run: Run, env: Env) -> None:
    pass


@attrs.frozen
class Case:
    name: str
    expect: Outcome
    check: Check = _no_check
    ran: tuple[str, ...] = ()
    not_ran: tuple[str, ...] = ()
    errored: tuple[str, ...] = ()  # steps that must end in call.error
    payload: Mapping[str, Any] = attrs.field(factory=dict)
    children: tuple[str, ...] = ()  # playbooks registered first (sub-playbooks, none executed)
    # a liveness bound: the real server's engine runs one event batch at a time on a shared core
    timeout: float = 240.0
    improvement: str | None = None
    expect_ours: Outcome | None = None
    check_ours: Check | None = None

    @property
    def path(self) -> Path:
        return PLAYBOOKS / f"{self.name}.yaml"

    def content(self) -> str:
        return self.path.read_text()


def outcome_of(run: Run) -> str:
    return {"playbook.completed": "completed", "playbook.failed": "failed"}.get(run.terminal or "", "none")


def assert_case(case: Case, run: Run, env: Env, *, ours: bool = False) -> None:
    """Everything a case requires of one run (with either worker)."""
    expected = case.expect_ours if ours and case.expect_ours else case.expect
    assert run.terminal is not None, f"no playbook.completed/failed within {case.timeout} s: {run.summary()}"
    assert outcome_of(run) == expected, f"expected {expected}: {run.summary()}"
    for step in case.ran:
        assert run.count("call.done", step) + run.count("call.error", step) >= 1, (
            f"step {step} did not run: {run.summary()}"
        )
    for step in case.not_ran:
        assert run.count("command.issued", step) == 0, f"step {step} ran: {run.summary()}"
    for step in case.errored:
        assert run.count("call.error", step) >= 1, f"step {step} has no call.error: {run.summary()}"
        assert run.count("call.done", step) == 0, f"failed step {step} also sent call.done: {run.summary()}"
    check = case.check_ours if ours and case.check_ours else case.check
    check(run, env)


def error_text(run: Run, step: str) -> str:
    """The error the server stored with the step's call.error."""
    for e in run.of_step(step):
        if e.get("event_type") == "call.error":
            return str(e.get("error") or "")
    return ""


def _done(run: Run, step: str) -> Any:
    return run.result(step)


# ---- checks ----------------------------------------------------------------------------------


def data_passing(run: Run, env: Env) -> None:
    start = _done(run, "start")
    assert start["greeting"] == "hello world"
    assert start["count"] == 3 and start["ratio"] == 0.5 and start["flag"] is True
    assert start["info"] == {"city": "Oslo", "zip": "0150"}
    assert start["tags"] == ["a", "b", "c"]
    assert _done(run, "use_values")["line"] == "hello world/6/Oslo/a"
    assert _done(run, "echo")["stdout"].strip() == "hello world/6/Oslo/a 3"


def python_kwargs(run: Run, env: Env) -> None:
    assert _done(run, "start") == {"keys": ["a", "b", "base"], "sum": 11, "b": "two"} | _ctx(run, "start")


def _ctx(run: Run, step: str) -> dict[str, Any]:
    """The ``context`` copy the server adds to a stored dict result (kept out of comparisons)."""
    value = run.result(step)
    return {"context": value["context"]} if isinstance(value, dict) and "context" in value else {}


def python_code_b64(run: Run, env: Env) -> None:
    start = _done(run, "start")
    assert (start["doubled"], start["src"]) == (42, "b64")


def python_libs(run: Run, env: Env) -> None:
    start = _done(run, "start")
    assert start["year"] == 2024 and start["epoch_positive"] is True


def python_timeout_reference(run: Run, env: Env) -> None:
    # noetl's own worker ignores the python `timeout`: the code sleeps its 6 s and completes
    assert _done(run, "start")["slept"] == 6


def python_timeout_ours(run: Run, env: Env) -> None:
    # ours enforces it: the step fails with a timeout error after 2 s; the unguarded arc still runs
    assert run.count("call.error", "start") == 1
    assert "timeout" in error_text(run, "start").lower() or "timed out" in error_text(run, "start").lower()
    assert run.count("call.done", "after") == 1


def shell_basic(run: Run, env: Env) -> None:
    start = _done(run, "start")
    assert start["returncode"] == 0
    assert "bonjour-42" in start["stdout"]
    assert [c["returncode"] for c in start["commands"]] == [0, 0]
    assert _done(run, "read")["words"] == ["first", "bonjour-42"]


def shell_exit_routed(run: Run, env: Env) -> None:
    assert "7" in error_text(run, "start")
    assert _done(run, "on_error")["stdout"].strip() == "handled"


def python_error_set(run: Run, env: Env) -> None:
    assert "bad input 42" in error_text(run, "start")
    assert _done(run, "handler")["saw"] is True


def unguarded_arc(run: Run, env: Env) -> None:
    assert "first step fails" in error_text(run, "start")
    assert _done(run, "after")["stdout"].strip() == "after-ran"


def failing_last_step(run: Run, env: Env) -> None:
    assert _done(run, "start")["fine"] is True
    assert "3" in error_text(run, "last")
    assert run.count("command.failed", "last") == 1


def shell_timeout(run: Run, env: Env) -> None:
    assert error_text(run, "start"), "the timeout carries an error text"
    assert run.count("call.done", "on_error") == 1


def http_get(run: Run, env: Env) -> None:
    fetch = _done(run, "fetch")
    assert fetch["status_code"] == 200
    assert fetch["data"] == FIXED
    assert fetch["url"] == f"{env.target.url}/json"
    assert _done(run, "use") == {"code": 200, "x": 42, "name": "target"} | _ctx(run, "use")


def http_post(run: Run, env: Env) -> None:
    send = _done(run, "send")
    assert send["status_code"] == 200
    assert send["data"]["method"] == "POST"
    assert send["data"]["received"] == {"order": 17, "note": "posted"}


def http_error_status(run: Run, env: Env) -> None:
    assert error_text(run, "fetch")
    assert run.count("call.done", "on_error") == 1


def http_bearer_map(run: Run, env: Env) -> None:
    call = _done(run, "call")
    assert call["status_code"] == 200 and call["data"] == {"authorized": True, "user": "interop"}
    sent = [auth for _, _, auth in env.target.seen("/secure")]
    assert f"Bearer {env.target.token}" in sent
    assert env.target.token not in run.text(), "the bearer token leaked into the server's records"


def postgres_query(run: Run, env: Env) -> None:
    query = run.results("query")[-1]
    assert query["rows"] == [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]
    assert query["row_count"] == 2 and query["columns"] == ["id", "name"]
    assert query["statement_count"] == 3
    assert _done(run, "use")["count"] == 2


def postgres_error(run: Run, env: Env) -> None:
    assert "interop_no_such_table" in error_text(run, "query")
    assert run.count("call.done", "on_error") == 1


def duckdb_file(run: Run, env: Env) -> None:
    crunch = _done(run, "crunch")
    assert crunch["command_2_sample"] == [[30, 5]]  # sum(0..4) * factor 3, count 5
    assert crunch["command_1_rows"] == 1 and crunch["command_2_rows"] == 1
    assert Path(crunch["database_path"]).is_file()


def task_sequence(run: Run, env: Env) -> None:
    # the sequence's own row is `<step>:task_sequence`; its results reach the next step
    seq = run.results("pipeline:task_sequence")[-1]
    assert seq["status"] == "ok"
    after = _done(run, "after")
    assert after["sequence_status"] == "ok"
    assert after["first_n"] == 21  # an earlier task by name
    assert after["attempts"] == 2  # the flaky task failed once and the policy retried it
    assert after["bumped"] == 22  # `_prev` threaded into the postgres task
    assert after["doubled"] == 42  # the postgres task ran with its credential


def sub_playbook(run: Run, env: Env) -> None:
    child = _done(run, "call_child")
    assert child["completed"] is True and child["failed"] is False
    # the child's own status document (the server compacts the step results inside it, so only
    # the child's workload is certain to be there): the step's input reached the child
    assert child["variables"]["x"] == 5
    assert _done(run, "after")["child_completed"] == "True"


def workbook(run: Run, env: Env) -> None:
    assert _done(run, "start")["square"] == 49
    assert _done(run, "after")["plus_one"] == 50


def loop_sequential(run: Run, env: Env) -> None:
    # loop counters are unreliable on this server: count the iterations' call.done events
    assert sorted(r["sq"] for r in run.results("each")) == [1, 1, 9, 16, 25]
    assert run.count("loop.done", "each") == 1
    assert run.count("call.done", "after") == 1


def loop_parallel(run: Run, env: Env) -> None:
    outs = sorted(r["stdout"].strip() for r in run.results("each"))
    assert outs == sorted(f"item-{i}" for i in range(10))
    assert run.count("loop.done", "each") == 1


def large_result(run: Run, env: Env) -> None:
    big = _done(run, "big")
    assert len(big["rows"]) == 1500 and big["rows"][-1]["label"] == "row-01499"
    assert _done(run, "after") == {"marker": "big-done", "n": 1500, "last": "row-01499"} | _ctx(run, "after")


def large_result_ours(run: Run, env: Env) -> None:
    # ours sends a result over its inline budget (NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES, 100 KiB)
    # by reference: the server stores the reference, resolves it for templates, and serves it
    big = run.results("big")[-1]
    reference = big["reference"]
    assert reference["kind"] == "result_ref"
    assert reference["extracted"]["marker"] == "big-done"
    data = env.stack.resolve(reference["ref"])
    assert len(data["rows"]) == 1500 and data["rows"][-1]["label"] == "row-01499"
    assert _done(run, "after") == {"marker": "big-done", "n": 1500, "last": "row-01499"} | _ctx(run, "after")


def large_workload(run: Run, env: Env) -> None:
    start = _done(run, "start")
    assert (start["length"], start["head"]) == (10_000, "yyyyy")
    assert _done(run, "after")["stdout"].strip() == "10000"


def inclusive_fanout(run: Run, env: Env) -> None:
    assert _done(run, "left")["stdout"].strip() == "left 2"
    assert _done(run, "right")["stdout"].strip() == "right 5"


def arc_set_ctx(run: Run, env: Env) -> None:
    assert _done(run, "high")["picked"] == "seven"


def nats_kv(run: Run, env: Env) -> None:
    put = _done(run, "put")
    assert put["status"] == "success" and put["bucket"] == "interop_kv" and put["revision"] == 1
    got = _done(run, "get")
    assert got["status"] == "success" and got["value"] == {"n": 17, "note": "kept"}
    assert _done(run, "use")["n_plus_one"] == 18


def _refused_by_noetls(run: Run, step: str, text: str) -> None:
    # noetl's own worker cannot run the step: it ends in call.error naming what is missing
    assert run.count("call.error", step) >= 1 and run.count("call.done", step) == 0
    assert text in error_text(run, step), error_text(run, step)


def transfer_reference(run: Run, env: Env) -> None:
    # its transfer tool has postgres, snowflake and http targets only
    _refused_by_noetls(run, "copy", "Unsupported target type: duckdb")


def transfer_ours(run: Run, env: Env) -> None:
    copy = _done(run, "copy")
    assert (copy["rows_read"], copy["rows_written"], copy["chunks"]) == (5, 5, 3)
    # (not `source`: its value "postgres" is also the stack's database password, so it is scrubbed)
    assert (copy["target"], copy["table"], copy["mode"]) == ("duckdb", "moved", "append")
    assert copy["duration_ms"] >= 0
    assert _done(run, "check") == {"written": 5, "read": 5, "chunks": 3} | _ctx(run, "check")


def result_fetch_reference(run: Run, env: Env) -> None:
    _refused_by_noetls(run, "fetch", "result_fetch")


def result_fetch_ours(run: Run, env: Env) -> None:
    # the fetched value is as large as the original, so it too is stored by reference
    reference = run.results("big")[-1]["reference"]
    fetched = env.stack.resolve(run.results("fetch")[-1]["reference"]["ref"])
    assert fetched["ref"] == reference["ref"] and fetched["source"] in ("http", "kv")
    assert len(fetched["data"]["rows"]) == 1500 and fetched["data"]["marker"] == "big-done"
    last = {"i": 1499, "label": "row-01499", "text": "value 1499 of the large result"}
    assert fetched["data"]["rows"][-1] == last
    use = _done(run, "use")
    assert (use["n"], use["last"], use["source"]) == (1500, "row-01499", fetched["source"])


def mcp_tool_call(run: Run, env: Env) -> None:
    # (`status` differs: noetl's worker stores `ok`, ours `success`; both are a success)
    add = _done(run, "add")
    assert (add["method"], add["tool"], add["text"]) == ("tools/call", "add", "42")
    assert add["endpoint"] == env.target.mcp_url and add["arguments"] == {"a": 40, "b": 2}
    assert add["initialize"]["protocolVersion"]
    assert _done(run, "use") == {"sum": 42} | _ctx(run, "use")


def websocket_echo_reference(run: Run, env: Env) -> None:
    # the sequence's one task is a kind noetl's own worker does not have: it never connects
    _refused_by_noetls(run, "talk:task_sequence", "Tool kind 'websocket' not implemented")
    with env.target.lock:
        assert not any(str(run.execution_id) in str(m) for m in env.target.ws_messages)


def websocket_echo_ours(run: Run, env: Env) -> None:
    seq = run.results("talk:task_sequence")[-1]
    assert seq["status"] == "ok"
    hello = f"hello {run.execution_id}"
    # the server keeps the scalar fields of the sequence's `_prev` (the websocket task's result)
    assert (seq["_prev"]["count"], seq["_prev"]["close_code"]) == (2, None)
    # the echo server received both, the JSON value as JSON text; the next step read both back
    with env.target.lock:
        received = list(env.target.ws_messages)
    assert received.count(hello) == 1 and '{"n":7}' in received, received
    assert _done(run, "use") == {"first": hello, "n": 7, "count": 2} | _ctx(run, "use")


# ---- the cases -------------------------------------------------------------------------------

CASES: tuple[Case, ...] = (
    Case("data_passing", "completed", data_passing, ran=("start", "use_values", "echo")),
    Case("python_kwargs", "completed", python_kwargs, ran=("start", "done")),
    Case("python_code_b64", "completed", python_code_b64, ran=("start", "done")),
    Case("python_libs", "completed", python_libs, ran=("start", "done")),
    Case(
        "python_timeout",
        "completed",
        python_timeout_reference,
        ran=("start", "after"),
        improvement="python `timeout` enforced",
        expect_ours="failed",
        check_ours=python_timeout_ours,
    ),
    Case("shell_basic", "completed", shell_basic, ran=("start", "read")),
    Case(
        "shell_exit_routed",
        "failed",
        shell_exit_routed,
        ran=("on_error",),
        errored=("start",),
        not_ran=("on_success",),
    ),
    Case("python_error_set", "failed", python_error_set, ran=("handler",), errored=("start",)),
    Case("unguarded_arc", "failed", unguarded_arc, ran=("after",), errored=("start",)),
    Case("failing_last_step", "failed", failing_last_step, ran=("start",), errored=("last",)),
    Case("shell_timeout", "failed", shell_timeout, ran=("on_error",), errored=("start",), timeout=45),
    Case("http_get", "completed", http_get, ran=("fetch", "use")),
    Case("http_post", "completed", http_post, ran=("start", "send", "done")),
    Case(
        "http_error_status",
        "failed",
        http_error_status,
        ran=("on_error",),
        errored=("fetch",),
        not_ran=("on_success",),
    ),
    Case("http_bearer_map", "completed", http_bearer_map, ran=("call", "done")),
    Case("postgres_query", "completed", postgres_query, ran=("query", "use")),
    Case("postgres_error", "failed", postgres_error, ran=("on_error",), errored=("query",)),
    Case("duckdb_file", "completed", duckdb_file, ran=("start", "crunch", "done")),
    Case("task_sequence", "completed", task_sequence, ran=("pipeline:task_sequence", "after")),
    Case("sub_playbook", "completed", sub_playbook, ran=("call_child", "after"), children=("child",)),
    Case("workbook", "completed", workbook, ran=("start", "after")),
    Case("loop_sequential", "completed", loop_sequential, ran=("each", "after")),
    Case("loop_parallel", "completed", loop_parallel, ran=("each", "after")),
    Case(
        "large_result",
        "completed",
        large_result,
        ran=("big", "after"),
        improvement="results over 100 KiB travel by reference",
        check_ours=large_result_ours,
    ),
    Case(
        "large_workload",
        "completed",
        large_workload,
        ran=("start", "after"),
        # over 8 KiB: the command's render context travels as a result_ref envelope
        payload={"blob": "y" * 10_000},
    ),
    Case(
        "inclusive_fanout", "completed", inclusive_fanout, ran=("start", "left", "right"), not_ran=("never",)
    ),
    Case("arc_set_ctx", "completed", arc_set_ctx, ran=("start", "high"), not_ran=("low",)),
    Case("nats_kv", "completed", nats_kv, ran=("start", "put", "get", "use")),
    Case(
        "transfer_pg_duckdb",
        "failed",
        transfer_reference,
        ran=("prepare",),
        improvement="`transfer` into duckdb",
        expect_ours="completed",
        check_ours=transfer_ours,
    ),
    Case(
        "result_fetch_ref",
        "failed",
        result_fetch_reference,
        ran=("big",),
        improvement="`result_fetch` kind",
        expect_ours="completed",
        check_ours=result_fetch_ours,
    ),
    Case(
        "mcp_tool_call",
        "completed",
        mcp_tool_call,
        ran=("start", "add", "use"),
    ),
    Case(
        "websocket_echo",
        "failed",
        websocket_echo_reference,
        ran=("start", "talk:task_sequence", "use"),
        improvement="`websocket` kind (in a task sequence)",
        expect_ours="completed",
        check_ours=websocket_echo_ours,
    ),
)

BY_NAME = {c.name: c for c in CASES}
