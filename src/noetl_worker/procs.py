"""Tool processes: a clean environment, a scratch home, a process tree that never outlives its
step, bounded output, and the worker as the reaper of whatever escapes.

- :func:`tool_environment` — the only environment a tool process gets: ``PATH``, ``TZ``, ``LANG`` and
  ``LC_*``, ``KUBERNETES_SERVICE_*`` (as noetl's own worker passes), a per-step ``HOME`` and
  ``TMPDIR``, the keychain-allowlisted values by their own names, then the step's declared
  ``env`` (which wins). Nothing else of the worker's environment — ``NATS_PASSWORD``,
  ``NOETL_INTERNAL_API_TOKEN``, any ``NOETL_*`` — reaches a tool.
- :func:`open_scratch` — that ``HOME``/``TMPDIR`` pair, created for one step and removed after.
- :func:`run_contained` — runs a command under ``_stepinit`` (its own session, a subreaper of
  its own, dies with the worker) and reads stdout/stderr incrementally up to a cap, counting what
  it drops. When the command exits, times out or is cancelled, every process it started is
  killed, however it detached.
- :func:`become_subreaper` and :func:`reap_adopted` — the worker's own part: descendants that
  escape anyway (a tool's init killed from outside, a fork-server grandchild) are re-parented to
  the worker instead of init, and their zombies are reaped — also when the worker is PID 1.
"""

from __future__ import annotations

import array
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import attrs
import trio

from . import _stepinit

log = logging.getLogger(__name__)

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_INHERITED: Final = frozenset({"PATH", "LANG", "LANGUAGE", "TZ"})
_INHERITED_PREFIXES: Final = ("LC_", "KUBERNETES_SERVICE_")
STEPINIT: Final = str(Path(__file__).with_name("_stepinit.py"))
STOP_PATIENCE: Final = 5.0  # seconds a step init gets to kill its tree when told to stop
DRAIN_PATIENCE: Final = 2.0  # seconds to finish reading once the tree is gone
REAP_INTERVAL: Final = 1.0
_CHUNK: Final = 64 * 1024
_PR_SET_CHILD_SUBREAPER: Final = 36


# --- environment -----------------------------------------------------------------------------


@attrs.frozen
class Scratch:
    """A step's private ``HOME`` and ``TMPDIR`` (both inside ``root``, removed after the step)."""

    root: str
    home: str
    tmp: str


def tool_environment(
    declared: Mapping[str, str] | None = None,
    *,
    scratch: Scratch | None = None,
    keychain: Mapping[str, str] | None = None,
    inherited: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a tool process.

    ``inherited`` is where ``PATH``/``LANG``/``LC_*``/``KUBERNETES_SERVICE_*`` come from (default
    ``os.environ``); ``keychain`` are the allowlisted operator secrets, by name; ``declared`` is
    the step's ``env`` and wins over everything else.
    """
    source = os.environ if inherited is None else inherited
    env = {k: v for k, v in source.items() if k in _INHERITED or k.startswith(_INHERITED_PREFIXES)}
    env.setdefault("PATH", DEFAULT_PATH)
    if scratch is not None:
        env["HOME"] = scratch.home
        env["TMPDIR"] = scratch.tmp
    env.update(keychain or {})
    env.update(declared or {})
    return env


def allowlisted(names: Sequence[str], secrets: Mapping[str, str]) -> dict[str, str]:
    """The keychain-allowlisted values (``NOETL_KEYCHAIN_ENV_VARS``) of a command, by name."""
    return {name: secrets[name] for name in names if name in secrets}


@asynccontextmanager
async def open_scratch(label: str = "step") -> AsyncIterator[Scratch]:
    """A fresh ``HOME``/``TMPDIR`` for one step; removed (with whatever the step left) after."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:40]
    root = tempfile.mkdtemp(prefix=f"noetl-{safe}-")  # a local mkdir: no thread hop needed
    scratch = Scratch(root, os.path.join(root, "home"), os.path.join(root, "tmp"))
    try:
        for path in (scratch.home, scratch.tmp):
            os.mkdir(path, 0o700)
        yield scratch
    finally:
        with trio.CancelScope(shield=True):
            await _remove(scratch)


async def _remove(scratch: Scratch) -> None:
    try:  # the usual case: the step left nothing behind
        for path in (scratch.home, scratch.tmp, scratch.root):
            os.rmdir(path)
    except OSError:
        await trio.to_thread.run_sync(lambda: shutil.rmtree(scratch.root, ignore_errors=True))


# --- one step's process tree -----------------------------------------------------------------


@attrs.define
class BoundedOutput:
    """Bytes of one stream kept up to ``cap``; the rest counted and dropped."""

    cap: int
    data: bytearray = attrs.field(factory=bytearray)
    dropped: int = 0

    def feed(self, chunk: bytes | bytearray) -> None:
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def text(self) -> str:
        """Decoded (invalid UTF-8 replaced), with a marker saying how much was dropped."""
        text = self.data.decode(errors="replace")
        if self.dropped:
            text += f"\n[output truncated: {self.dropped} bytes dropped]"
        return text


@attrs.frozen
class Completed:
    returncode: int  # negative: killed by that signal (as subprocess reports it)
    stdout: BoundedOutput
    stderr: BoundedOutput


@attrs.define(eq=False)
class Launcher:
    """The worker's one ``_stepinit`` launcher process (started on first use, restarted if it
    died). It forks a step init per step; see ``_stepinit`` for what a step init guarantees."""

    process: subprocess.Popen[bytes]
    control: socket.socket

    @classmethod
    def start(cls) -> Launcher:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", STEPINIT, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                env=tool_environment(),
                pass_fds=[theirs.fileno()],
                start_new_session=True,
            )
        finally:
            theirs.close()
        return cls(process, mine)

    def alive(self) -> bool:
        return self.process.poll() is None

    def submit(self, fds: Sequence[int]) -> None:
        self.control.sendmsg([b"s"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])

    def close(self) -> None:
        self.control.close()  # the launcher exits when it sees the control socket close
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_launcher: Launcher | None = None


def launcher() -> Launcher:
    """The process-wide launcher (plain synchronous calls: safe from any trio run)."""
    global _launcher
    if _launcher is None or not _launcher.alive():
        if _launcher is not None:
            log.warning(
                "the step launcher exited (code %s); starting a new one", _launcher.process.returncode
            )
            _launcher.control.close()
        _launcher = Launcher.start()
    return _launcher


async def _drain(stream: trio.abc.ReceiveStream, sink: BoundedOutput, done: trio.Event) -> None:
    try:
        while chunk := await stream.receive_some(_CHUNK):
            sink.feed(chunk)
    finally:
        done.set()


async def _read_all(stream: trio.SocketStream) -> bytes:
    answer = bytearray()
    while chunk := await stream.receive_some(_CHUNK):
        answer += chunk
    return bytes(answer)


async def run_contained(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None = None,
    max_output: int,
) -> Completed:
    """Run ``argv`` as the head of a contained process tree; return its status and output.

    Returns once the command has exited *and* every process it started is gone, so a
    ``sleep 1000 &`` holding the output pipes does not hold the step. On cancellation (the step's
    deadline, a drain) the tree is killed before the cancellation propagates.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        launcher().submit([out_w, err_w, theirs.fileno()])
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        mine.close()
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
        theirs.close()
    step = trio.SocketStream(trio.socket.from_stdlib_socket(mine))
    stdout, stderr = BoundedOutput(max_output), BoundedOutput(max_output)
    streams = (trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r))
    drained = (trio.Event(), trio.Event())
    request = json.dumps({"argv": list(argv), "env": dict(env), "cwd": cwd}).encode()
    answer: bytes | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, streams[0], stdout, drained[0])
            nursery.start_soon(_drain, streams[1], stderr, drained[1])
            await step.send_all(b"%d\n" % len(request) + request)
            answer = await _read_all(step)
            # The init killed the whole tree before answering: nothing is left to hold the
            # pipes, unless a process it could not kill (stuck in the kernel) still does.
            with trio.move_on_after(DRAIN_PATIENCE):
                for event in drained:
                    await event.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if answer is None:
                await _stop(step)
            await step.aclose()
            for stream in streams:
                await stream.aclose()
    return Completed(_returncode(answer), stdout, stderr)


async def _stop(step: trio.SocketStream) -> None:
    """Tell the step init to kill its tree (shut our side down) and wait until it has."""
    try:
        await step.send_eof()
        with trio.move_on_after(STOP_PATIENCE):
            await _read_all(step)
            return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    log.warning("a step init did not confirm that its processes were killed")


def _returncode(answer: bytes) -> int:
    try:
        decoded = json.loads(answer)
        return int(decoded["returncode"])
    except (ValueError, KeyError, TypeError):
        # The step init itself was killed (from outside, or out of memory).
        return -signal.SIGKILL


def kill_session(sid: int) -> int:
    """SIGKILL every process of session ``sid`` (the fallback when a step's init is gone)."""
    killed = 0
    for pid in _pids():
        try:
            if os.getsid(pid) == sid and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (ProcessLookupError, PermissionError):
            continue
    return killed


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


# --- the worker as reaper ----------------------------------------------------------------------


_reaper = False


def is_reaper() -> bool:
    """Whether orphans are re-parented to this process: PID 1, or after :func:`become_subreaper`."""
    return _reaper or os.getpid() == 1


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux): orphaned descendants come back to it.

    Only the worker's own process calls this (``noetl-worker run``); an embedding process —
    the tests — keeps its children to itself.
    """
    global _reaper
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError) as exc:
        log.warning("cannot become a child subreaper (%s): escaped tool processes go to init", exc)
        return False
    _reaper = True
    return True


def _zombie_children() -> set[int]:
    """Our children that are zombies. Reads only our own children's ``stat`` where the kernel
    lists them (a sweep of every process's ``stat`` cost ~2 ms of CPU each second, the bulk of
    an idle worker's CPU); the whole process table only as the fallback."""
    me = os.getpid()
    children = _stepinit.children_of(me)
    if children is None:
        table = _stepinit.process_table()
        return {pid for pid, (ppid, state) in table.items() if ppid == me and state == "Z"}
    return {pid for pid in children if _stepinit.state_of(pid) == "Z"}


def reap_once(seen: set[int]) -> set[int]:
    """Reap zombie children that were already zombies at the previous sweep (``seen``).

    A child this process started itself is waited for by whoever started it, within
    milliseconds of its exit; one still a zombie a whole interval later is an adopted orphan
    nobody else will wait for. Returns the zombies to check at the next sweep.
    """
    zombies = _zombie_children()
    for pid in zombies & seen:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return zombies - seen


async def reap_adopted(interval: float = REAP_INTERVAL) -> None:
    """Run for the worker's lifetime: reap the zombies of adopted orphans (PID 1's duty too)."""
    seen: set[int] = set()
    slow = _stepinit.children_of(os.getpid()) is None
    while True:
        # The children lists make a sweep a few small reads: done inline. The fallback (every
        # process's stat) goes to a thread, as it reads hundreds of files.
        seen = await trio.to_thread.run_sync(reap_once, seen) if slow else reap_once(seen)
        await trio.sleep(interval)
