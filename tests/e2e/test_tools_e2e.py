"""Every tool kind end to end: NATS notification → claim → tool → events on the stub server.

Each test runs the real worker tree (``open_worker``) against a real nats-server and the stub
control plane over real HTTP, and asserts what a user sees in the server's events.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import psycopg.conninfo
import pytest
import trio

from noetl_worker.config import Settings
from noetl_worker.testing import Publisher, StubServer, StubState, open_worker

from .support import (
    FLAVORS,
    failure,
    make_stub_state,
    payload,
    publish,
    run_commands,
    tool_error,
    tool_result,
    value,
    worker_events,
)

PG_DSN = os.environ.get("NOETL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
MakeSettings = Callable[..., Settings]


@pytest.fixture
def stub_state(request: pytest.FixtureRequest) -> StubState:
    return make_stub_state(request)


@pytest.mark.parametrize("stub_state", FLAVORS, indirect=True)
async def test_noop_and_shell(stub: StubServer, publisher: Publisher, make_settings: MakeSettings) -> None:
    state = stub.state
    noop = state.enqueue_command(step="nothing", tool_kind="noop", tool_config={"result": {"a": 1}})
    echo = state.enqueue_command(step="echo", tool_kind="shell", tool_config={"command": "echo hi"})
    many = state.enqueue_command(
        step="many", tool_kind="shell", tool_config={"cmds": ["echo one", "echo two"]}
    )
    templated = state.enqueue_command(
        step="templated",
        tool_kind="shell",
        tool_config={"command": "echo {{ workload.greeting }}-{{ workload.n + 1 }}"},
        render_context={"workload": {"greeting": "hello", "n": 41}},
    )
    failing = state.enqueue_command(
        step="failing", tool_kind="shell", tool_config={"cmds": ["echo before", "exit 3", "echo never"]}
    )
    commands = [noop, echo, many, templated, failing]
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="4"), commands)

    assert value(state, noop) == {"a": 1}
    assert value(state, echo)["stdout"] == "hi\n"
    listed = value(state, many)
    assert listed["stdout"] == "one\n\ntwo\n"  # noetl joins the outputs with a newline
    assert [c["cmd_preview"] for c in listed["commands"]] == ["echo one", "echo two"]
    assert listed["returncode"] == 0
    assert value(state, templated)["stdout"] == "hello-42\n"

    status, envelope = tool_error(state, failing)
    assert status == "error"
    assert envelope["data"]["stdout"] == "before\n"  # the third command never ran
    assert envelope["data"]["returncode"] == 3
    assert [c["cmd_preview"] for c in envelope["data"]["commands"]] == ["echo before", "exit 3"]
    if state.flavor == "rust":
        # The Rust worker's way: a failed result is still call.done + command.completed.
        assert envelope["exit_code"] == 3
        assert payload(state, failing, "command.completed")["status"] == "error"
        assert state.command(failing).status == "COMPLETED"
    else:
        assert "3" in envelope["error"]
        assert state.execution_outcome(failing.execution_id) == "FAILED"
    for command in (noop, echo, many, templated):
        if state.flavor == "rust":
            assert payload(state, command, "command.completed")["status"] == "success"
        assert state.command(command).status == "COMPLETED"


@pytest.mark.parametrize("stub_state", FLAVORS, indirect=True)
async def test_python_main_gets_args_and_input(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    code = "def main(a, b, label):\n    print('adding')\n    return {'sum': a + b, 'label': label}\n"
    command = state.enqueue_command(
        step="add",
        tool_kind="python",
        tool_config={"code": code, "args": {"a": 2, "label": "{{ workload.name }}"}},
        input={"b": 40},
        render_context={"workload": {"name": "answer"}},
    )
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(), [command])
    assert value(state, command) == {"sum": 42, "label": "answer"}
    if state.flavor == "rust":
        assert tool_result(state, command)["stdout"] == "adding\n"


async def test_python_crash_loop_and_memory_bomb_leave_the_worker_serving(
    stub: StubServer,
    publisher: Publisher,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOETL_PYTHON_MEMORY_LIMIT_MB", "256")
    state = stub.state
    crash = state.enqueue_command(
        step="crash", tool_kind="python", tool_config={"code": "import os\nos._exit(7)\n"}
    )
    loop = state.enqueue_command(
        step="loop", tool_kind="python", tool_config={"code": "while True:\n    pass\n", "timeout": 1}
    )
    bomb = state.enqueue_command(
        step="bomb",
        tool_kind="python",
        tool_config={"code": "hog = bytearray(2 * 1024 ** 3)\nresult = len(hog)\n"},
    )
    after = state.enqueue_command(
        step="after", tool_kind="python", tool_config={"code": "def main():\n    return 'still here'\n"}
    )
    with trio.fail_after(40):
        async with open_worker(make_settings(WORKER_MAX_CONCURRENT="3")):
            await publish(stub, publisher, crash, loop, bomb)
            await state.wait_terminal([crash, loop, bomb], timeout=30)
            await publish(stub, publisher, after)
            await state.wait_terminal([after], timeout=20)

    status, crashed = tool_error(state, crash)
    assert status == "error"
    assert "exited with code 7" in crashed["error"]
    status, looped = tool_error(state, loop)
    assert status == "timeout" and "timed out" in looped["error"]
    status, bombed = tool_error(state, bomb)
    assert status == "error"
    assert "MemoryError" in bombed["error"]
    assert "NOETL_PYTHON_MEMORY_LIMIT_MB" in bombed["error"]
    assert value(state, after) == "still here"


async def test_http_against_the_stub(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    post = state.enqueue_command(
        step="post",
        tool_kind="http",
        tool_config={
            "method": "POST",
            "url": f"{stub.url}/api/vars/4242",
            "json": {"colour": "{{ workload.colour }}"},
        },
        render_context={"workload": {"colour": "teal"}},
    )
    get = state.enqueue_command(
        step="get", tool_kind="http", tool_config={"url": f"{stub.url}/api/worker/pools"}
    )
    missing = state.enqueue_command(
        step="missing", tool_kind="http", tool_config={"url": f"{stub.url}/api/executions/1/status"}
    )
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="3"), [post, get, missing])

    posted = value(state, post)
    assert posted["status_code"] == 200
    assert posted["data"]["count"] == 1
    assert state.variables["4242"]["colour"]["value"] == "teal"
    listed = value(state, get)
    assert listed["status_code"] == 200
    assert [pool["name"] for pool in listed["data"]["items"]] == [state.registrations[0]["name"]]
    status, not_found = tool_error(state, missing)
    assert status == "error"
    assert not_found["data"]["status_code"] == 404
    assert not_found["error"] == "HTTP 404: Not Found"


async def test_postgres_through_a_credential_alias(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    dsn = psycopg.conninfo.conninfo_to_dict(PG_DSN)
    state = stub.state
    state.add_credential(
        "pg_test",
        "postgres",
        {
            "db_host": dsn.get("host", "127.0.0.1"),
            "db_port": int(dsn.get("port") or 5432),
            "db_user": dsn.get("user", "postgres"),
            "db_password": dsn.get("password", ""),
            "db_name": dsn.get("dbname", "test"),
        },
    )
    command = state.enqueue_command(
        step="sql",
        tool_kind="postgres",
        tool_config={
            "auth": "pg_test",
            "query": "SELECT n, n * n AS square FROM generate_series(1, %(upto)s) AS n ORDER BY n",
            "params": {"upto": "{{ workload.upto }}"},
        },
        render_context={"workload": {"upto": 3}},
    )
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(), [command])

    data = value(state, command)
    assert data["columns"] == ["n", "square"]
    assert data["rows"] == [{"n": 1, "square": 1}, {"n": 2, "square": 4}, {"n": 3, "square": 9}]
    fetched = state.requests_to(r"^/api/credentials/pg_test$", "GET")
    assert len(fetched) == 1
    assert fetched[0].query.get("include_data") == "true"


async def test_duckdb_task_sequence_and_playbook(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    state.auto_complete_after_polls = 2
    duck = state.enqueue_command(
        step="duck",
        tool_kind="duckdb",
        tool_config={"query": "SELECT range AS i, 'row ' || range AS label FROM range(2)"},
    )
    sequence = state.enqueue_command(
        step="sequence",
        tool_kind="task_sequence",
        tool_config={
            "tasks": [
                {"first": {"kind": "noop", "result": {"n": 20}}},
                {"second": {"kind": "shell", "command": "echo {{ _prev.n + 1 }}"}},
            ]
        },
    )
    child = state.enqueue_command(
        step="child",
        tool_kind="playbook",
        tool_config={
            "path": "examples/child",
            "payload": {"x": 1},
            "return_step": "end",
            "poll_interval": 0.05,
        },
    )
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="3"), [duck, sequence, child])

    summary = value(state, duck)
    assert summary["command_1_rows"] == 2
    assert summary["command_1_sample"] == [[0, "row 0"], [1, "row 1"]]
    steps = value(state, sequence)
    assert steps["status"] == "ok"
    assert steps["results"]["first"] == {"n": 20}
    assert steps["results"]["second"]["stdout"] == "21\n"
    assert steps["_prev"] == steps["results"]["second"]
    value(state, child)  # a child that completed is a success
    (execution,) = [e for e in state.executions.values() if e.path == "examples/child"]
    assert execution.parent_execution_id == str(child.execution_id)
    assert execution.payload == {"x": 1}
    assert execution.status == "COMPLETED"


async def test_unknown_kind_and_invalid_config_fail_visibly(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    unknown = state.enqueue_command(step="warp", tool_kind="teleport", tool_config={})
    no_command = state.enqueue_command(step="empty", tool_kind="shell", tool_config={"env": {"A": "1"}})
    bad_method = state.enqueue_command(
        step="fetch", tool_kind="http", tool_config={"url": f"{stub.url}/x", "method": "FETCH"}
    )
    fine = state.enqueue_command(step="fine", tool_kind="noop", tool_config={})
    commands = [unknown, no_command, bad_method, fine]
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="4"), commands)

    assert "teleport" in failure(state, unknown)
    assert "shell.cmds" in failure(state, no_command)
    method_error = failure(state, bad_method)
    assert "http.method" in method_error and "GET" in method_error
    for command in (unknown, no_command, bad_method):
        assert "command.completed" not in worker_events(state, command)
    value(state, fine)  # asserts the success lifecycle


def _pg_credential(state: StubState, name: str) -> None:
    dsn = psycopg.conninfo.conninfo_to_dict(PG_DSN)
    state.add_credential(
        name,
        "postgres",
        {
            "db_host": dsn.get("host", "127.0.0.1"),
            "db_port": int(dsn.get("port") or 5432),
            "db_user": dsn.get("user", "postgres"),
            "db_password": dsn.get("password", ""),
            "db_name": dsn.get("dbname", "test"),
        },
    )


async def test_task_sequence_resolves_credentials_per_task_and_retries(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings, tmp_path: Any
) -> None:
    """A list-form ``tool:`` as the Python server sends it: a templated ``auth`` inside a task,
    ``_prev`` and earlier tasks by name, and a policy that retries a failing task."""
    state = stub.state
    _pg_credential(state, "pg_seq")
    flag = tmp_path / "second-try"
    command = state.enqueue_command(
        step="seq:task_sequence",
        tool_kind="task_sequence",
        tool_config={
            "tasks": [
                {"name": "first", "kind": "python", "code": "def main():\n    return {'v': 10}\n"},
                {
                    "name": "q",
                    "kind": "postgres",
                    "auth": "{{ workload.cred }}",
                    "command": "SELECT {{ _prev.v }} + 1 AS w",
                },
                {
                    "name": "flaky",
                    "kind": "shell",
                    "cmds": [f"test -f {flag} || {{ touch {flag}; exit 3; }}; echo ok"],
                    "spec": {
                        "policy": {
                            "rules": [
                                {
                                    "when": "{{ output.status == 'error' }}",
                                    "then": {"do": "retry", "attempts": 3, "delay": 0.05},
                                },
                                {"else": {"then": {"do": "continue"}}},
                            ]
                        }
                    },
                },
                {
                    "name": "last",
                    "kind": "python",
                    "input": {"a": "{{ first.v }}", "b": "{{ q.rows[0].w }}"},
                    "code": "def main(a, b):\n    return {'sum': a + b}\n",
                },
            ]
        },
        render_context={"workload": {"cred": "pg_seq"}},
    )
    with trio.fail_after(40):
        await run_commands(stub, publisher, make_settings(), [command])
    data = value(state, command)
    assert data["status"] == "ok", data
    assert data["results"]["q"]["rows"] == [{"w": 11}]
    assert data["_prev"] == {"sum": 21}
    assert [t["name"] for t in data["metrics"]["tasks"]] == ["first", "q", "flaky", "flaky", "last"]
    assert len(state.requests_to(r"^/api/credentials/pg_seq$", "GET")) == 1


async def test_workbook_task_from_the_catalog(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    _pg_credential(state, "pg_wb")
    entry = state.add_playbook(
        {
            "apiVersion": "noetl.io/v2",
            "kind": "Playbook",
            "metadata": {"name": "wb", "path": "tests/wb"},
            "workbook": [
                {
                    "name": "add_one",
                    "tool": {"kind": "python", "code": "def main(x):\n    return {'y': x + 1}\n"},
                    "args": {"x": 1},
                },
                {
                    "name": "ask_db",
                    "tool": {"kind": "postgres", "auth": "pg_wb", "query": "SELECT 7 AS seven"},
                },
            ],
            "workflow": [{"step": "start", "tool": {"kind": "workbook", "name": "add_one"}}],
        }
    )
    context = {"catalog_id": entry["catalog_id"]}
    plain = state.enqueue_command(
        step="plain", tool_kind="workbook", tool_config={"name": "add_one"}, render_context=context
    )
    with_input = state.enqueue_command(
        step="with_input",
        tool_kind="workbook",
        tool_config={"name": "add_one"},
        input={"x": 41},
        render_context=context,
    )
    database = state.enqueue_command(
        step="database", tool_kind="workbook", tool_config={"task": "ask_db"}, render_context=context
    )
    missing = state.enqueue_command(
        step="missing", tool_kind="workbook", tool_config={"name": "nope"}, render_context=context
    )
    commands = [plain, with_input, database, missing]
    with trio.fail_after(40):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="4"), commands)
    assert value(state, plain) == {"y": 2}
    assert value(state, with_input) == {"y": 42}
    assert value(state, database)["rows"] == [{"seven": 7}]
    status, lost = tool_error(state, missing)
    assert status == "error"
    assert "add_one, ask_db" in lost["error"]
    asked = state.requests_to(r"^/api/catalog/resource$", "POST")
    assert len(asked) == 4
