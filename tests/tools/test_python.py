"""The python tool against a real fork server: results, failures, isolation, no orphans."""

from __future__ import annotations

import base64
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from noetl_worker import templating
from noetl_worker.errors import ToolConfigError, ToolError
from noetl_worker.tools import resolve
from noetl_worker.tools._forkserver import ForkServerHandle
from noetl_worker.tools.base import ToolContext, ToolResources, ToolResult

from ..tool_support import make_ctx, process_alive

OTHER_PYTHON = os.path.realpath(sys.executable)  # the same interpreter under another path
VARIABLES: dict[str, Any] = {"workload": {"message": "hi"}, "user": {"id": 7, "tags": ["a"]}}


@pytest.fixture
async def ctx() -> AsyncIterator[ToolContext]:
    resources = ToolResources()
    try:
        yield make_ctx(
            resources, variables=VARIABLES, render=lambda value: templating.render(value, VARIABLES)
        )
    finally:
        await resources.aclose()


async def run(config: Mapping[str, Any], ctx: ToolContext, limit: float = 20) -> ToolResult:
    with trio.fail_after(limit):
        return await resolve("python")(config, ctx)


async def _handle(ctx: ToolContext) -> ForkServerHandle:
    async def never() -> ForkServerHandle:
        raise AssertionError("the fork server should exist already")

    return await ctx.resources.get_or_create("python.forkserver", never)


async def test_main_gets_the_kwargs_it_accepts_with_rendered_args(ctx: ToolContext) -> None:
    code = "def main(user, greeting='hello'):\n    print('running')\n    return [greeting, user]"
    result = await run({"code": code, "args": {"user": "{{ user }}", "unused": 1}}, ctx)
    assert result.status == "success", result
    assert result.data == ["hello", {"id": 7, "tags": ["a"]}]
    assert result.stdout == "running\n"
    assert result.exit_code == 0


async def test_main_with_var_kwargs_gets_all_args_and_input(ctx: ToolContext) -> None:
    code = "def main(**kwargs):\n    return kwargs"
    config = {"code": code, "input": {"a": 1, "b": 1}, "args": {"b": "{{ workload.message }}"}}
    result = await run(config, ctx)
    assert result.data == {"a": 1, "b": "hi"}


async def test_a_request_larger_than_a_socket_read_reaches_main_whole(ctx: ToolContext) -> None:
    # The child reads its request line with plain recv calls: a 3 MB one arrives in many.
    text = "x" * 3_000_000 + 'é\n"end'
    code = "def main(blob):\n    return {'n': len(blob), 'tail': blob[-6:]}\n"
    result = await run({"code": code, "args": {"blob": text}}, ctx)
    assert result.status == "success", result.error
    assert result.data == {"n": len(text), "tail": text[-6:]}


async def test_async_main_is_awaited(ctx: ToolContext) -> None:
    code = "import asyncio\nasync def main(x):\n    await asyncio.sleep(0)\n    return x * 2"
    result = await run({"code": code, "args": {"x": 21}}, ctx)
    assert result.data == 42


async def test_result_global_and_args_as_globals(ctx: ToolContext) -> None:
    result = await run({"code": "result = {'sum': a + b, 'args': args}", "input": {"a": 1, "b": 2}}, ctx)
    assert result.status == "success"
    assert result.data == {"sum": 3, "args": {"a": 1, "b": 2}}


async def test_without_main_or_result_the_value_is_noetls_summary(ctx: ToolContext) -> None:
    plain = await run({"code": "import sys\nx = 1\nprint('{\"rows\": 3}')\nprint('w', file=sys.stderr)"}, ctx)
    assert plain.status == "success"
    assert plain.data == {
        "status": "success",
        "message": "Code executed without explicit result variable",
        "locals_count": 2,
        "locals_keys": ["sys", "x"],
    }
    assert (plain.stdout, plain.stderr) == ('{"rows": 3}\n', "w\n")  # output is not the result


async def test_main_returning_none_is_the_result_even_with_a_result_global(ctx: ToolContext) -> None:
    result = await run({"code": "result = {'ignored': True}\ndef main():\n    pass"}, ctx)
    assert result.status == "success"
    assert result.data is None


async def test_main_may_ask_for_the_render_context(ctx: ToolContext) -> None:
    result = await run({"code": "def main(context):\n    return context['workload']"}, ctx)
    assert result.data == {"message": "hi"}


async def test_args_rendered_to_text_are_parsed_back(ctx: ToolContext) -> None:
    # The server renders templates to text: a dict arrives as its Python repr, a list as JSON.
    args = {"d": "{'a': 1, 'b': [True, None]}", "l": "[1, 2]", "s": "{not a literal", "n": "7"}
    code = "def main(d, l, s, n):\n    return [d, l, s, n]"
    result = await run({"code": code, "args": args}, ctx)
    assert result.data == [{"a": 1, "b": [True, None]}, [1, 2], "{not a literal", "7"]


async def test_libs_import_modules_and_names_before_the_code(ctx: ToolContext) -> None:
    libs = {"time": "time", "pp": "os.path", "td": {"from": "datetime", "import": "timedelta"}}
    code = "def main():\n    return [time.__name__, pp.join('a', 'b'), td(minutes=1).total_seconds()]"
    result = await run({"code": code, "libs": libs}, ctx)
    assert result.status == "success", result.error
    assert result.data == ["time", "a/b", 60.0]
    missing = await run({"code": "result = 1", "libs": {"nope": "no_such_module_here"}}, ctx)
    assert missing.status == "error"
    assert "no_such_module_here" in (missing.error or "")


@pytest.mark.parametrize(
    ("libs", "field"),
    [
        ("time", "libs"),
        ({"1bad": "time"}, "libs.1bad"),
        ({"t": "time; import os"}, "libs.t"),
        ({"t": {"from": "datetime"}}, "libs.t"),
    ],
)
async def test_bad_libs_name_the_field(ctx: ToolContext, libs: Any, field: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        await run({"code": "pass", "libs": libs}, ctx)
    assert info.value.field == field


async def test_deps_sys_path_and_venv_path(ctx: ToolContext, tmp_path: Path) -> None:
    package = tmp_path / "pkgs"
    package.mkdir()
    (package / "ts_helper_mod.py").write_text("VALUE = 'from sys_path'\n")
    site = tmp_path / "venv" / "lib" / "python3.99" / "site-packages"
    site.mkdir(parents=True)
    (site / "ts_venv_mod.py").write_text("VALUE = 'from venv'\n")
    code = "import ts_helper_mod, ts_venv_mod\nresult = [ts_helper_mod.VALUE, ts_venv_mod.VALUE]"
    deps = {"sys_path": [str(package), str(tmp_path / "missing")], "venv_path": str(tmp_path / "venv")}
    result = await run({"code": code, "deps": deps}, ctx)
    assert result.status == "success", result.error
    assert result.data == ["from sys_path", "from venv"]
    # the next call's child does not inherit the path
    after = await run({"code": "import ts_helper_mod"}, ctx)
    assert after.status == "error"
    with pytest.raises(ToolConfigError) as info:
        await run({"code": "pass", "deps": {"packages": {"t": ["requests"]}}}, ctx)
    assert info.value.field == "deps.packages"


async def test_exception_is_an_error_result_with_traceback(ctx: ToolContext) -> None:
    code = "print('before')\ndef main():\n    raise ValueError('bad input')"
    result = await run({"code": code}, ctx)
    assert result.status == "error"
    assert result.error == "ValueError: bad input"
    assert "line 3, in main" in result.data["traceback"]
    assert "_pyrunner" not in result.data["traceback"]
    assert result.stdout == "before\n"


async def test_syntax_error_is_an_error_result(ctx: ToolContext) -> None:
    result = await run({"code": "def main(:\n  pass"}, ctx)
    assert result.status == "error"
    assert result.error is not None and result.error.startswith("SyntaxError")


@pytest.mark.parametrize(
    ("code", "expected_exit", "message"),
    [
        ("import os\nprint('bye', flush=True)\nos._exit(3)", 3, "exited with code 3"),
        ("import ctypes\nprint('bye', flush=True)\nctypes.string_at(0)", -11, "SIGSEGV"),
        ("import sys\nsys.exit(4)", 1, "SystemExit: 4"),
    ],
)
async def test_a_crash_is_an_error_and_the_next_call_still_works(
    ctx: ToolContext, code: str, expected_exit: int, message: str
) -> None:
    result = await run({"code": code}, ctx)
    assert result.status == "error"
    assert result.exit_code == expected_exit
    assert result.error is not None and message in result.error
    again = await run({"code": "def main(): return 'alive'"}, ctx)
    assert again.data == "alive"


async def test_infinite_loop_is_killed_at_the_deadline_with_no_orphan(
    ctx: ToolContext, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    code = (
        "import os, subprocess\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "while True:\n    pass\n"
    )
    with trio.fail_after(20):
        with trio.move_on_after(1.5) as scope:
            await resolve("python")({"code": code}, ctx)
    assert scope.cancelled_caught
    pids = [int(p) for p in pid_file.read_text().split()]
    # The python child is reaped before run() returns; the grandchild got SIGKILL with its
    # process group (init reaps it, so allow a zombie).
    assert not process_alive(pids[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
    assert not process_alive(pids[1])
    again = await run({"code": "result = 1"}, ctx)
    assert again.data == 1


async def test_configured_timeout_gives_a_timeout_result(ctx: ToolContext) -> None:
    code = "print('started', flush=True)\nwhile True:\n    pass"
    result = await run({"code": code, "timeout_seconds": 0.5}, ctx)
    assert result.status == "timeout"
    assert result.stdout == "started\n"
    assert result.error is not None and "timed out" in result.error


async def test_memory_bomb_is_an_error_and_the_worker_is_unaffected(
    ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOETL_PYTHON_MEMORY_LIMIT_MB", "300")
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 1024 * 1024))"
    result = await run({"code": code}, ctx)
    assert result.status == "error"
    assert result.error is not None and "MemoryError" in result.error
    assert "NOETL_PYTHON_MEMORY_LIMIT_MB" in result.error
    # The limit is per child: the worker itself can still allocate more than the child could.
    big = bytearray(400 * 1024 * 1024)
    del big
    again = await run({"code": "def main(): return len(bytearray(10 * 1024 * 1024))"}, ctx)
    assert again.data == 10 * 1024 * 1024


async def test_invalid_memory_limit_names_the_variable(
    ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOETL_PYTHON_MEMORY_LIMIT_MB", "lots")
    with pytest.raises(ToolError, match="NOETL_PYTHON_MEMORY_LIMIT_MB"):
        await run({"code": "result = 1"}, ctx)


async def test_calls_do_not_leak_state_into_each_other(ctx: ToolContext) -> None:
    await run({"code": "import json\njson.polluted = True\nimport os\nos.environ['X_LEAK'] = '1'"}, ctx)
    code = "import json, os\ndef main(): return [hasattr(json, 'polluted'), 'X_LEAK' in os.environ]"
    result = await run({"code": code}, ctx)
    assert result.data == [False, False]


async def test_env_and_cwd(ctx: ToolContext, tmp_path: Path) -> None:
    code = "import os\ndef main(): return [os.environ['GREETING'], os.getcwd()]"
    config = {"code": code, "env": {"GREETING": "{{ workload.message }}"}, "cwd": str(tmp_path)}
    result = await run(config, ctx)
    assert result.data == ["hi", str(tmp_path)]


async def test_code_b64(ctx: ToolContext) -> None:
    encoded = base64.b64encode(b"def main(x):\n    return x + 1").decode()
    assert (await run({"code_b64": encoded, "args": {"x": 1}}, ctx)).data == 2
    assert (await run({"code_base64": encoded, "args": {"x": 2}}, ctx)).data == 3
    with pytest.raises(ToolConfigError, match="code_b64"):
        await run({"code_b64": "not base64!"}, ctx)


async def test_script_from_a_file(ctx: ToolContext, tmp_path: Path) -> None:
    script = tmp_path / "step.py"
    script.write_text("def main(n):\n    return n * 10\n")
    assert (await run({"script": str(script), "args": {"n": 2}}, ctx)).data == 20
    config = {"script": {"uri": str(script), "source": {"type": "file"}}, "args": {"n": 3}}
    assert (await run(config, ctx)).data == 30
    failing = tmp_path / "fail.py"
    failing.write_text("raise RuntimeError('x')\n")
    result = await run({"script": str(failing)}, ctx)
    assert str(failing) in result.data["traceback"]  # tracebacks name the script


async def _script_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    found = scope["path"] == "/step.py"
    body = b"def main(n):\n    return n + 100\n" if found else b"nope"
    await send({"type": "http.response.start", "status": 200 if found else 404, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def test_script_over_http(ctx: ToolContext) -> None:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, _script_app, config, shutdown_trigger=stop.wait))
            base = binds[0]
            try:
                result = await run({"script": f"{base}/step.py", "args": {"n": 1}}, ctx)
                assert result.data == 101
                source = {"type": "http", "endpoint": f"{base}/step.py", "method": "GET"}
                result = await run({"script": {"source": source}, "args": {"n": 2}}, ctx)
                assert result.data == 102
                with pytest.raises(ToolError, match="HTTP 404"):
                    await run({"script": f"{base}/missing.py"}, ctx)
            finally:
                stop.set()


async def test_non_serialisable_results_are_converted(ctx: ToolContext) -> None:
    code = (
        "import datetime, decimal, uuid\n"
        "class Thing:\n    def __repr__(self): return 'Thing()'\n"
        "def main():\n"
        "    return {'when': datetime.datetime(2026, 6, 20, 12, 0),\n"
        "            'day': datetime.date(2026, 1, 2),\n"
        "            'tags': {'b'}, 'raw': b'hi', 'price': decimal.Decimal('1.25'),\n"
        "            'count': decimal.Decimal('3'), 'id': uuid.UUID(int=1), 'thing': Thing(),\n"
        "            1: 'int key', 'nan': float('nan'), 'pair': (1, 2)}\n"
    )
    result = await run({"code": code}, ctx)
    assert result.status == "success", result
    assert result.data == {
        "when": "2026-06-20T12:00:00",
        "day": "2026-01-02",
        "tags": ["b"],
        "raw": "aGk=",
        "price": 1.25,
        "count": 3,
        "id": "00000000-0000-0000-0000-000000000001",
        "thing": "Thing()",
        "1": "int key",
        "nan": None,
        "pair": [1, 2],
    }


async def test_context_global_holds_the_variables(ctx: ToolContext) -> None:
    result = await run({"code": "def main(): return context['workload']['message']"}, ctx)
    assert result.data == "hi"


async def test_a_dead_fork_server_is_replaced_on_the_next_call(ctx: ToolContext) -> None:
    assert (await run({"code": "result = 1"}, ctx)).data == 1
    handle = await _handle(ctx)
    server = await handle.server()
    server.process.send_signal(signal.SIGKILL)
    with trio.fail_after(10):
        await server.process.wait()
    assert (await run({"code": "result = 2"}, ctx)).data == 2
    assert (await handle.server()).process.pid != server.process.pid


async def test_closing_resources_stops_the_fork_server(tmp_path: Path) -> None:
    resources = ToolResources()
    ctx = make_ctx(resources)
    try:
        assert (await run({"code": "result = 1"}, ctx)).data == 1
        server = await (await _handle(ctx)).server()
    finally:
        with trio.fail_after(20):
            await resources.aclose()
    assert server.process.returncode is not None
    assert not process_alive(server.process.pid)


async def test_other_interpreter_gets_its_own_fork_server(ctx: ToolContext) -> None:
    code = "import sys\ndef main(): return sys.executable"
    result = await run({"code": code, "python": OTHER_PYTHON}, ctx)
    assert result.data == OTHER_PYTHON


async def test_bad_configuration_names_the_field(ctx: ToolContext) -> None:
    with pytest.raises(ToolConfigError, match="code"):
        await run({}, ctx)
    with pytest.raises(ToolConfigError, match="timeout"):
        await run({"code": "pass", "timeout": "soon"}, ctx)
    with pytest.raises(ToolConfigError, match=r"script\.source\.type.*file, http, inline"):
        await run({"script": {"uri": "gs://b/x.py", "source": {"type": "gcs"}}}, ctx)
    with pytest.raises(ToolConfigError, match="python"):
        await run({"code": "pass", "python": "/nonexistent/python3"}, ctx)


async def test_a_large_result_is_delivered_even_over_a_non_blocking_socket(ctx: ToolContext) -> None:
    """O_NONBLOCK lives on the open file description the fork server shares with the child: when
    the server's flag won the race (under load), a large result failed with EAGAIN and was lost
    ("python process ended without reporting a result"). Force that state and check delivery."""
    from noetl_worker.tools._pyrunner import CALL_FD

    code = (
        "import os\n"
        f"os.set_blocking({CALL_FD}, False)\n"
        "def main():\n"
        "    return ['x' * 100 for _ in range(20_000)]\n"
    )
    result = await run({"code": code}, ctx)
    assert result.status == "success", result.error
    assert len(result.data) == 20_000


async def test_large_results_survive_concurrent_calls(ctx: ToolContext) -> None:
    code = "def main(n):\n    return ['x' * 100 for _ in range(n)]"
    results: list[ToolResult] = []

    async def one() -> None:
        results.append(await run({"code": code, "args": {"n": 20_000}}, ctx))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    assert [r.status for r in results] == ["success"] * 4
    assert all(len(r.data) == 20_000 for r in results)


async def test_main_parameters_missing_from_args_come_from_the_render_context(ctx: ToolContext) -> None:
    code = "def main(workload, user, extra='default'):\n    return [workload['message'], user['id'], extra]"
    result = await run({"code": code}, ctx)
    assert result.status == "success", result.error
    assert result.data == ["hi", 7, "default"]
    given = await run({"code": code, "args": {"user": {"id": 1}}}, ctx)  # args win
    assert given.data == ["hi", 1, "default"]
    missing = await run({"code": "def main(nowhere):\n    return nowhere"}, ctx)
    assert missing.status == "error" and "nowhere" in (missing.error or "")


def test_the_keyword_names_of_main_are_read_as_inspect_reads_them() -> None:
    """The runner reads a plain function's parameters from its code object (cheaper in a fresh
    child than inspect.signature); for every shape of ``def main`` both must agree, and anything
    that is not a plain function goes through inspect."""
    import functools
    import inspect

    from noetl_worker.tools._pyrunner import _parameters

    def by_inspect(fn: Any) -> tuple[set[str], bool]:
        params = inspect.signature(fn).parameters.values()
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return names, any(p.kind is p.VAR_KEYWORD for p in params)

    def plain(a, b=1): ...

    def shapes(a, /, b, *rest, c, d=2, **more):
        local = 1
        return local

    def kwonly(*, context): ...

    def nothing(): ...

    def only_star(*args):
        x = args
        return x

    @functools.wraps(plain)
    def wrapped(*args, **kwargs): ...

    class Callable_:
        def __call__(self, x, y=0): ...

    for fn in (
        plain,
        shapes,
        kwonly,
        nothing,
        only_star,
        lambda v, *, w: v,
        wrapped,
        Callable_(),
        functools.partial(plain, 1),
    ):
        assert _parameters(fn) == by_inspect(fn), fn
    assert _parameters(len) == by_inspect(len)


def test_the_fork_server_starts_and_captures_stderr_when_started_without_one(tmp_path: Path) -> None:
    """A worker whose own stderr is closed starts the fork server without fd 2: the steps'
    streams are made in the server, so it must cope (it points fd 2 at /dev/null first)."""
    import array
    import json
    import socket
    import subprocess
    import sys

    from noetl_worker.tools._forkserver import RUNNER

    control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen(
        [sys.executable, RUNNER, str(theirs.fileno()), "0", str(tmp_path)],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: os.close(2),
    )
    theirs.close()
    try:
        control.settimeout(30)
        assert control.recv(1) == b"R"
        call, call_theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds = array.array("i", [call_theirs.fileno(), out_w, err_w])
        control.sendmsg([b"C"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        for fd in (call_theirs.fileno(), out_w, err_w):
            os.close(fd)
        call_theirs.detach()
        reader = call.makefile("rb")
        call.settimeout(30)
        assert "pid" in json.loads(reader.readline())
        code = "import sys\ndef main():\n    print('to stderr', file=sys.stderr)\n    return 7\n"
        call.sendall(json.dumps({"code": code, "args": {}}).encode() + b"\n")
        assert json.loads(reader.readline()) == {"ok": True, "has_value": True, "data": 7}
        assert os.read(err_r, 100) == b"to stderr\n"
        os.close(out_r)
        os.close(err_r)
        call.close()
    finally:
        control.close()  # the server then kills its children and exits
        assert server.wait(timeout=30) == 0
