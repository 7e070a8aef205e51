"""No secret survives anywhere: canaries planted through every source the worker takes secrets
from, emitted by every tool kind through every channel, never reach the server or the log.

Sources: an operator-mounted keychain variable (``NOETL_KEYCHAIN_ENV_VARS``), the worker's own
NATS password and API token (which a step can read from ``/proc/<worker>/environ``), a
``{{ keychain.… }}`` reference, bearer and basic credential aliases (plain or sealed).
Channels: stdout, stderr, result value, dict key, exception, config error, template error and an
http server that echoes the request back. Each example runs the real worker (real nats-server,
the stub control plane over HTTP, real ``sh`` and python) on the whole grid with fresh canaries
and looks for them — verbatim, base64 at any alignment, percent-encoded — in every request body
the stub received (events, stored results, variables), every stored result and the captured log.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any
from urllib.parse import unquote, unquote_plus

import httpx
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from noetl_worker import logs
from noetl_worker.config import Settings
from noetl_worker.testing import (
    StubCommand,
    StubServer,
    StubState,
    open_nats_server,
    open_publisher,
    open_stub_server,
    open_worker,
)
from noetl_worker.testing.sealing import seal_credential

CATALOG_ID = 77
EXECUTION_ID = 5_000_001
KEYCHAIN_ENV = "CANARY_MOUNTED"
REF = "{{ keychain.canary.value }}"

# Canaries survive shell and python quoting (no quotes, backslashes, $ or spaces) but carry the
# characters that base64 and percent-encoding change.
canary_text = st.from_regex(r"[A-Za-z][A-Za-z0-9\-_.~+/=:@%!,]{11,29}", fullmatch=True).filter(
    lambda s: any(c.isdigit() for c in s) and any(c.isalpha() for c in s)
)


@st.composite
def plans(draw: st.DrawFn) -> dict[str, Any]:
    names = ["mounted", "nats", "token", "ref", "bearer", "basic"]
    canaries = draw(st.lists(canary_text, min_size=len(names), max_size=len(names), unique=True))
    return {"canaries": dict(zip(names, canaries, strict=True)), "sealed": draw(st.booleans())}


# --- an http server that echoes each request back ------------------------------------------


async def _echo(stream: trio.SocketStream) -> None:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        while length and len(body) < int(length.group(1)):
            body += await stream.receive_some(65536)
        status = b"500 Oops" if b"fail=1" in head.split(b"\r\n")[0] else b"200 OK"
        answer = json.dumps({"request": (head + b"\r\n\r\n" + body).decode(errors="replace")}).encode()
        await stream.send_all(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(answer) + answer
        )
    finally:
        await stream.aclose()


# --- the grid ----------------------------------------------------------------------------------


def enqueue_grid(state: StubState, echo: str, worker_pid: int) -> list[StubCommand]:
    environ = f"/proc/{worker_pid}/environ"
    meta = {"catalog_id": CATALOG_ID}
    specs: list[tuple[str, str, dict[str, Any]]] = [
        # shell: stdout, stderr, config error, template error
        ("sh_env_out", "shell", {"command": f'echo "mounted=${KEYCHAIN_ENV}"'}),
        ("sh_env_err", "shell", {"command": f'echo "mounted=${KEYCHAIN_ENV}" >&2; exit 2'}),
        ("sh_worker_out", "shell", {"command": f"tr '\\0' '\\n' < {environ}"}),
        ("sh_worker_err", "shell", {"command": f"tr '\\0' '\\n' < {environ} >&2"}),
        ("sh_ref_out", "shell", {"command": f"echo '{REF}' | base64; echo '{REF}'"}),
        ("sh_ref_cfg", "shell", {"command": "true", "cwd": f"/nonexistent/{REF}"}),
        ("sh_ref_tpl", "shell", {"command": f"echo {REF} {{% if %}}"}),
        # python: stdout, stderr, result value, dict key, exception, config error
        ("py_env", "python", {"code": f"import os\nresult = {{'v': os.environ.get('{KEYCHAIN_ENV}')}}"}),
        ("py_worker", "python", {"code": f"result = open('{environ}').read().split(chr(0))"}),
        ("py_worker_raise", "python", {"code": f"raise ValueError(open('{environ}').read())"}),
        ("py_ref_print", "python", {"code": f"import sys\nprint('{REF}')\nprint('{REF}', file=sys.stderr)"}),
        ("py_ref_key", "python", {"code": f"result = {{'{REF}': 1, 'n': ['{REF}']}}"}),
        ("py_ref_raise", "python", {"code": f"raise RuntimeError('boom {REF}')"}),
        ("py_ref_cfg", "python", {"code": "result = 1", "timeout": REF}),
        # noop: result value and dict key
        ("noop_ref", "noop", {"result": {"v": REF, REF: "k", "list": [f"x {REF} y"]}}),
        # http: echoed query, header, body; credentials in the Authorization header
        (
            "http_ref",
            "http",
            {"url": f"{echo}/?q={REF}", "method": "POST", "headers": {"X-Echo": REF}, "json": {"b": REF}},
        ),
        ("http_ref_fail", "http", {"url": f"{echo}/?fail=1&q={REF}"}),
        ("http_bearer", "http", {"url": f"{echo}/", "auth": "canary_bearer"}),
        ("http_basic", "http", {"url": f"{echo}/", "auth": "canary_basic"}),
        ("http_mounted", "http", {"url": f"{echo}/", "auth": {"type": "bearer", "credential": KEYCHAIN_ENV}}),
    ]
    return [
        state.enqueue_command(
            execution_id=EXECUTION_ID, step=step, tool_kind=kind, tool_config=config, meta=meta
        )
        for step, kind, config in specs
    ]


# Steps that fail before their tool returns (config and template errors): the rest complete.
FAILING = {"sh_ref_cfg", "sh_ref_tpl", "py_ref_cfg"}


def leaked(text: str, canary: str) -> list[str]:
    """The forms of ``canary`` found in ``text``: verbatim, percent-decoded, base64-decoded."""
    found = []
    if canary in text:
        found.append("verbatim")
    if canary in unquote(text) or canary in unquote_plus(text):
        found.append("percent-encoded")
    needle = canary.encode()
    for token in re.findall(r"[A-Za-z0-9+/_-]{12,}={0,2}", text):
        for shift in range(4):
            piece = token[shift:]
            piece = piece[: len(piece) - len(piece) % 4]
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    if needle in decode(piece):
                        found.append("base64")
                except (binascii.Error, ValueError):
                    pass
    return found


@contextmanager
def captured_log() -> Iterator[io.StringIO]:
    """The worker's own log pipeline (JSON formatter + scrub filter) into a buffer, at DEBUG."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ScrubFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def run_grid(plan: dict[str, Any]) -> tuple[StubState, str, list[StubCommand]]:
    canaries = plan["canaries"]
    state = StubState(sealer=seal_credential) if plan["sealed"] else StubState()
    state.add_credential("canary_bearer", "bearer", {"token": canaries["bearer"]})
    state.add_credential("canary_basic", "basic", {"username": "user", "password": canaries["basic"]})
    with trio.fail_after(120), captured_log() as log:
        async with open_nats_server() as nats, open_stub_server(state) as stub:
            await _put_keychain(stub, canaries["ref"])
            async with open_publisher(nats.url) as publisher, trio.open_nursery() as nursery:
                listeners = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
                echo = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
                env = {
                    "NATS_URL": nats.url,
                    "NATS_USER": "canary-user",
                    "NATS_PASSWORD": canaries["nats"],
                    "NOETL_INTERNAL_API_TOKEN": canaries["token"],
                    "NOETL_SERVER_URL": stub.url,
                    "WORKER_METRICS_BIND": "127.0.0.1:0",
                    "WORKER_MAX_CONCURRENT": "4",
                    "NOETL_KEYCHAIN_ENV_VARS": KEYCHAIN_ENV,
                    "NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES": "256",  # most results go to the store
                    "NOETL_SEALED_CREDENTIALS": "true" if plan["sealed"] else "false",
                    "WORKER_ID": "canary-worker",
                }
                with _environ({**env, KEYCHAIN_ENV: canaries["mounted"]}):
                    async with open_worker(Settings.from_env(env)):
                        commands = enqueue_grid(state, echo, os.getpid())
                        for command in commands:
                            await publisher.publish_command(command.notification(stub.url))
                        await state.wait_terminal(commands, timeout=90)
                nursery.cancel_scope.cancel()
    return state, log.getvalue(), commands


async def _put_keychain(stub: StubServer, value: str) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{stub.url}/api/keychain/{CATALOG_ID}/canary",
            json={"token_data": {"value": value}, "scope_type": "local", "execution_id": EXECUTION_ID},
        )
        answer.raise_for_status()


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """The worker reads its mounted secrets from, and a step reads, this process's environment."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Each example runs the whole grid through a real worker (~10 s): few examples, and no shrinking —
# the failure message names the canary, its source and where it was found.
@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate),
)
@given(plans())
def test_no_canary_survives_in_any_event_result_or_log_line(plan: dict[str, Any]) -> None:
    state, log, commands = trio.run(run_grid, plan)
    # Each channel was exercised: every secret resolved (no step failed for want of one) and the
    # config and template errors happened.
    for command in commands:
        assert command.terminal, command.step
        errors = json.dumps([e.payload for e in state.events_for(command)])
        assert "keychain entry" not in errors and "fetching credential" not in errors, errors
    assert {c.step for c in commands if c.status == "FAILED"} >= FAILING
    worker_requests = [r for r in state.request_log if not r.path.startswith("/api/keychain/")]
    bodies = "\n".join(json.dumps(r.body, ensure_ascii=False) for r in worker_requests)
    stored = json.dumps([r.data for r in state.results.values()], ensure_ascii=False)
    assert "[REDACTED]" in bodies
    for name, canary in plan["canaries"].items():
        for where, text in (("server", bodies), ("result store", stored), ("log", log)):
            forms = leaked(text, canary)
            assert not forms, f"{name} canary {canary!r} reached the {where} as {forms}"
