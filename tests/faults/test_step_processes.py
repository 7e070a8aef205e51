"""No process outlives its step; tool processes get a clean environment; output is bounded.

The shell tool runs for real (``sh``), and each test looks at the machine's process table from
outside: every step carries a unique ``NOETL_TEST_MARKER`` variable in its declared ``env``,
which every process it starts inherits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import attrs
import pytest
import trio

from noetl_worker import _stepinit, procs
from noetl_worker.config import Settings
from noetl_worker.tools import shell

from ..conftest import poll_until, subprocess_env
from ..tool_support import make_ctx
from .process_support import marked_processes, new_marker

ESCAPES = {
    "background, output inherited": "sleep 1000 &",
    "background, output redirected": "sleep 1000 >/dev/null 2>&1 &",
    "setsid": "setsid sleep 1000 >/dev/null 2>&1 &",
    "double fork": "(sh -c 'sleep 1000 >/dev/null 2>&1 &' &)",
    "nohup + setsid in a subshell": "(nohup setsid sh -c 'sleep 1000' >/dev/null 2>&1 &) ; sleep 0.1",
}


def step(command: str, marker: str, **config: object) -> dict[str, object]:
    return {"command": command, "env": {"NOETL_TEST_MARKER": marker}, **config}


@pytest.mark.parametrize("command", list(ESCAPES.values()), ids=list(ESCAPES))
async def test_no_process_outlives_its_step(command: str) -> None:
    marker = new_marker()
    with trio.fail_after(30):  # liveness: the step must end (on main it waits for the sleep)
        result = await shell.run(step(f"{command}\necho done", marker), make_ctx())
        assert result.status == "success"
        assert result.stdout == "done\n"
        await poll_until(lambda: not marked_processes(marker))


async def test_a_cancelled_step_takes_its_whole_tree_with_it() -> None:
    marker = new_marker()
    command = "sleep 1000 & setsid sleep 1000 >/dev/null 2>&1 & echo started; sleep 1000"
    started = trio.Event()

    async def watch() -> None:
        await poll_until(lambda: len(marked_processes(marker)) >= 3)
        started.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(shell.run, step(command, marker), make_ctx())
            await started.wait()
            nursery.cancel_scope.cancel()
        # Cancellation returns only once the tree is gone: no polling needed.
        assert marked_processes(marker) == []


async def test_a_killed_command_reports_the_signal() -> None:
    with trio.fail_after(30):
        result = await shell.run({"command": "kill -9 $$"}, make_ctx())
    assert result.status == "error"
    assert result.exit_code == -9


async def test_tool_processes_get_a_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    worker_only = {
        "NATS_PASSWORD": "nats-pass-canary",
        "NOETL_INTERNAL_API_TOKEN": "api-token-canary",
        "NOETL_SERVER_URL": "http://internal:8082",
        "AWS_SECRET_ACCESS_KEY": "aws-canary",
        "OPERATOR_MOUNTED": "mounted-canary",
        "PYTHONPATH": "/somewhere",
    }
    for name, value in worker_only.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    ctx = attrs.evolve(
        make_ctx(secrets={"OPERATOR_MOUNTED": "mounted-canary"}),
        settings=Settings.from_env({"NOETL_KEYCHAIN_ENV_VARS": "OPERATOR_MOUNTED"}),
    )
    script = 'env; echo "home-exists=$(test -d "$HOME" && test -w "$TMPDIR" && echo yes)"'
    with trio.fail_after(30):
        result = await shell.run({"command": script, "env": {"DECLARED": "from-the-step"}}, ctx)
    assert result.status == "success", result
    lines = (result.stdout or "").splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("home-"))
    for name in ("NATS_PASSWORD", "NOETL_INTERNAL_API_TOKEN", "NOETL_SERVER_URL", "AWS_SECRET_ACCESS_KEY"):
        assert name not in env
    assert "PYTHONPATH" not in env
    assert env["DECLARED"] == "from-the-step"
    assert env["OPERATOR_MOUNTED"] == "mounted-canary"  # keychain-allowlisted: by name
    assert env["PATH"] == os.environ["PATH"]
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert "home-exists=yes" in lines
    assert env["HOME"] != os.environ.get("HOME")
    assert env["TMPDIR"].startswith(os.path.dirname(env["HOME"]))
    # The scratch home is the step's alone and is removed with it.
    assert not await trio.Path(env["HOME"]).parent.exists()
    # Only what the rules above allow, plus what sh itself sets.
    allowed = {"DECLARED", "OPERATOR_MOUNTED", "PATH", "HOME", "TMPDIR", "PWD", "SHLVL", "_", "OLDPWD"}
    allowed |= {
        k for k in env if k.startswith(("LC_", "KUBERNETES_SERVICE_")) or k in ("LANG", "LANGUAGE", "TZ")
    }
    assert set(env) <= allowed, set(env) - allowed


def test_tool_environment_declared_env_wins_over_everything() -> None:
    scratch = procs.Scratch("/r", "/r/home", "/r/tmp")
    env = procs.tool_environment(
        {"PATH": "/only/here", "HOME": "/declared"},
        scratch=scratch,
        keychain={"TOKEN": "t"},
        inherited={"PATH": "/usr/bin", "LANG": "C", "SECRET": "x", "LC_TIME": "C"},
    )
    assert env == {"PATH": "/only/here", "LANG": "C", "LC_TIME": "C", "HOME": "/declared",
                   "TMPDIR": "/r/tmp", "TOKEN": "t"}  # fmt: skip


# --- bounded output ----------------------------------------------------------------------------

OUTPUT_MB = 256
RSS_PROBE = textwrap.dedent(
    """
    import json, sys, trio
    from noetl_worker.tools import shell
    from tests.tool_support import make_ctx

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    async def main():
        await shell.run({"command": "true"}, make_ctx())  # warm: imports, launcher
        before = hwm()
        result = await shell.run({"command": f"head -c {sys.argv[1]}M /dev/zero; echo tail >&2"}, make_ctx())
        print(json.dumps({"before": before, "after": hwm(), "stdout_len": len(result.stdout),
                          "tail": result.stdout[-80:], "stderr": result.stderr}))

    trio.run(main)
    """
)


def test_huge_output_is_read_incrementally_and_bounded() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env = subprocess_env(PYTHONPATH=f"{root}/src:{root}")
    completed = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(OUTPUT_MB)],
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    probe = json.loads(completed.stdout)
    cap = shell.MAX_OUTPUT
    dropped = OUTPUT_MB * 1024 * 1024 - cap
    assert probe["tail"].endswith(f"[output truncated: {dropped} bytes dropped]")
    assert probe["stdout_len"] == cap + len(f"\n[output truncated: {dropped} bytes dropped]")
    assert probe["stderr"] == "tail\n"
    # The kept bytes, their decoded text and the JSON-able result: a few times the cap at most,
    # never the size of the output.
    growth = probe["after"] - probe["before"]
    assert growth < 8 * cap, f"peak RSS grew by {growth / 2**20:.0f} MiB for {OUTPUT_MB} MiB of output"


async def test_processes_of_a_step_init_killed_from_outside_are_killed_too() -> None:
    marker = new_marker()
    # $PPID of the command is its step init: killing it hands the tree to the launcher.
    command = "sleep 1000 & setsid sleep 1000 >/dev/null 2>&1 & sleep 0.2; kill -9 $PPID; sleep 1000"
    with trio.fail_after(30):
        result = await shell.run(step(command, marker), make_ctx())
        assert result.status == "error"
        await poll_until(lambda: not marked_processes(marker))


@pytest.mark.parametrize("children_lists", [True, False], ids=["children lists", "process-table scan"])
def test_the_reaper_reaps_a_zombie_only_at_its_second_sweep(
    children_lists: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zombie child is left to whoever started it for one sweep, then reaped — found through
    the kernel's children lists, or (kernels without them) by scanning the process table."""
    if not children_lists:
        monkeypatch.setattr(_stepinit, "children_of", lambda pid: None)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        poll_until_sync(lambda: pid in procs._zombie_children())
        seen = procs.reap_once(set())
        assert pid in seen and os.path.exists(f"/proc/{pid}")  # first sweep: only noted
        procs.reap_once(seen)
        assert not os.path.exists(f"/proc/{pid}")  # second sweep: reaped
    finally:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def poll_until_sync(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
