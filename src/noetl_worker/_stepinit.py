"""The launcher of contained step processes: ``python -I -S _stepinit.py <control fd>``.

Standard library only and no package import, so it also runs under ``-S``. One launcher runs
per worker (started on first use, see ``procs.Launcher``); it is single-threaded, so forking it
is safe and costs about a millisecond — a fresh interpreter per step would cost tens.

For each step the worker sends, over the control socket, three descriptors: the write ends of
the step's stdout and stderr pipes and one end of a *step socket*. The launcher forks a **step
init** for it, which

1. starts a new session and becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``): every
   descendant that escapes its parent — ``cmd &``, a double fork, ``setsid`` — is re-parented
   to the step init, not to the worker or to init, so all of the step's processes stay its own;
2. reads the request (argv, env, cwd) from the step socket and spawns the command;
3. waits until the command exits, or the step socket is shut down or closed — the worker's
   timeout or cancellation, or the worker's death, which closes it too — and then SIGKILLs every
   remaining descendant, reaps them, writes the command's status on the step socket and exits.

The launcher itself is a subreaper too: a process that escapes a step init killed from outside
comes back to it and is killed. It exits when the worker closes the control socket.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import select
import signal
import socket
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
EXEC_FAILED = 127
KILL_PATIENCE = 10.0  # seconds to wait for killed processes (one stuck in D state) before giving up
REAP_INTERVAL_MS = 1000
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)

_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def process_table() -> dict[int, tuple[int, str]]:
    """pid → (ppid, state) of every process we can see."""
    table: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        table[int(name)] = (int(fields[1]), fields[0].decode())
    return table


def children_of(pid: int) -> list[int] | None:
    """Children of ``pid`` from ``/proc/<pid>/task/*/children``; None if the kernel lacks it."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as children:
                found.extend(int(c) for c in children.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue
            return None
        except OSError:
            continue
    return found


def state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return "X"
    return data[data.rfind(b")") + 2 :].split()[0].decode()


def descendants(root: int) -> dict[int, str]:
    """pid → state of every descendant of ``root``.

    Walks the ``children`` lists down from ``root`` (cost proportional to the tree), or scans
    the whole process table where the kernel does not provide them.
    """
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        children = children_of(stack.pop())
        if children is None:
            return _descendants_by_scan(root)
        for pid in children:
            if pid not in found:
                found[pid] = state_of(pid)
                stack.append(pid)
    return found


def _descendants_by_scan(root: int) -> dict[int, str]:
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            stack.extend(children.get(pid, ()))
    return found


def reap() -> list[tuple[int, int]]:
    """(pid, wait status) of every child that has exited."""
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def kill_descendants(root: int | None = None, keep: frozenset[int] = frozenset()) -> None:
    """SIGKILL every descendant of ``root`` (default: this process) except ``keep``, until none
    is left. Killing a process re-parents its children to the nearest subreaper (us), so the scan
    repeats until nothing remains; our own children are reaped as they go."""
    me = os.getpid()
    root = me if root is None else root
    deadline = time.monotonic() + KILL_PATIENCE
    while time.monotonic() < deadline:
        found = descendants(root)
        alive = [p for p, state in found.items() if state not in "ZX" and p not in keep]
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if root == me:
            reap()
        if not alive and not any(p not in keep for p in found):
            return
        time.sleep(0.002)


# --- one step ---------------------------------------------------------------------------------


def _read_request(step: socket.socket) -> dict[str, object]:
    header = b""
    while not header.endswith(b"\n"):
        byte = step.recv(1)
        if not byte:
            os._exit(EXEC_FAILED)
        header += byte
    size = int(header)
    body = bytearray()
    while len(body) < size:
        chunk = step.recv(min(1 << 20, size - len(body)))
        if not chunk:
            os._exit(EXEC_FAILED)
        body += chunk
    request: dict[str, object] = json.loads(body)
    return request


def _spawn_command(request: dict[str, object]) -> int | None:
    """Start the command (``posix_spawn``: no copy of this interpreter); None if it cannot run.

    If this step init is killed from outside, the command is re-parented to the launcher,
    which kills whatever is not a step init of its own."""
    argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
    env = {str(k): str(v) for k, v in request["env"].items()}  # type: ignore[attr-defined]
    try:
        cwd = request.get("cwd")
        if isinstance(cwd, str):
            os.chdir(cwd)
        # Python ignores SIGPIPE and SIGXFSZ; the command gets the default dispositions.
        return os.posix_spawnp(argv[0], argv, env, setsigdef=_RESET_SIGNALS, setsigmask=())
    except OSError as exc:
        os.write(2, f"cannot run {argv[0]!r}: {exc.strerror}\n".encode())
        return None


def _step_init(step: socket.socket, out: int, err: int) -> None:
    """The body of a step init (a forked child of the launcher); never returns."""
    try:
        os.setsid()
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        request = _read_request(step)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            if fd > 2:
                os.close(fd)
        step_fd = step.fileno()
        os.set_inheritable(step_fd, False)
        leader = _spawn_command(request)
        # Our copies of the output pipes must not keep them open once the tree is gone.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        if leader is None:
            step.sendall(json.dumps({"returncode": EXEC_FAILED}).encode())
            os._exit(0)
        status: int | None = None
        stopped = False
        leader_fd = os.pidfd_open(leader)
        poller = select.poll()
        poller.register(step.fileno(), select.POLLIN | select.POLLHUP)
        poller.register(leader_fd, select.POLLIN)
        while status is None and not stopped:
            events = poller.poll(REAP_INTERVAL_MS)
            for pid, wait_status in reap():
                if pid == leader:
                    status = wait_status
            if any(fd == step.fileno() for fd, _ in events):
                stopped = True  # shut down by the worker (timeout, cancel) or the worker is gone
        kill_descendants()
        answer: dict[str, object]
        if stopped:
            answer = {"stopped": True}
        else:
            assert status is not None
            answer = {"returncode": _returncode(status)}
        try:
            step.sendall(json.dumps(answer).encode())
        except OSError:
            pass
        os._exit(0)
    except BaseException:
        try:
            kill_descendants()
        finally:
            os._exit(EXEC_FAILED)


def _returncode(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


# --- the launcher -----------------------------------------------------------------------------


def _receive(control: socket.socket) -> list[int] | None:
    """The descriptors of one step request; None when the worker closed the control socket."""
    fds = array.array("i")
    message, ancillary, _, _ = control.recvmsg(16, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not message and not fds:
        return None
    return list(fds)


def launcher(control: socket.socket) -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    inits: set[int] = set()
    poller = select.poll()
    poller.register(control.fileno(), select.POLLIN | select.POLLHUP)
    swept = time.monotonic()
    while True:
        events = poller.poll(REAP_INTERVAL_MS)
        for pid, _ in reap():
            inits.discard(pid)
        if time.monotonic() - swept >= REAP_INTERVAL_MS / 1000:
            # Anything else that came back to us escaped a step init killed from outside.
            _kill_strays(inits)
            swept = time.monotonic()
        if not events:
            continue
        fds = _receive(control)
        if fds is None:
            return  # the worker is gone; each step init sees its step socket close and cleans up
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        out, err, step_fd = fds
        pid = os.fork()
        if pid == 0:
            control.close()
            _step_init(socket.socket(fileno=step_fd), out, err)
        inits.add(pid)
        for fd in fds:
            os.close(fd)


def _kill_strays(inits: set[int]) -> None:
    me = os.getpid()
    for pid, (ppid, state) in process_table().items():
        if ppid == me and pid not in inits and state not in "ZX":
            kill_descendants(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reap()


if __name__ == "__main__":
    launcher(socket.socket(fileno=int(sys.argv[1])))
