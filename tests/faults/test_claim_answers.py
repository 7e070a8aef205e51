"""A claim answer of 200 that is not a command is reported and terminated — never redelivered
every few seconds for ever — and a huge one is not read whole. Real nats-server, real HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noetl_worker.config import Settings
from noetl_worker.control_plane import parse_claim_answer
from noetl_worker.jsonlimits import JSONLimitError
from noetl_worker.testing import NatsServer, Publisher, StubServer, open_worker

from ..conftest import fuzz_examples
from ..test_faults import wait_registered, worker_process
from ..test_integration import wait_acked

BODIES = {
    "not_json": b"<html>502 Bad Gateway</html>",
    "not_utf8": b'{"action": "noop", "context": {"x": "\xff\xfe"}}',
    "not_object": b'["a", "list"]',
    "deep": b'{"context": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge_number": b'{"execution_id": ' + b"9" * 5000 + b"}",
    "over_budget": b'{"context": {"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}}',
}
REASONS = {
    "not_json": "not JSON",
    "not_utf8": "not UTF-8",
    "not_object": "not a JSON object",
    "deep": "deeper than",
    "huge_number": "not JSON",
    "over_budget": "over",
}


def _failed_reason(stub: StubServer, command_id: str) -> str:
    failed = [e for e in stub.state.events_for(command_id) if e.event_type == "command.failed"]
    assert len(failed) == 1, stub.state.event_types(command_id)
    return json.dumps(failed[0].payload)


@pytest.mark.parametrize("kind", sorted(BODIES))
async def test_a_claim_answer_that_is_no_command_is_reported_and_terminated(
    kind: str, stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings]
) -> None:
    command = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
    stub.state.inject("POST", r"/claim$", 200, body=BODIES[kind], times=100)
    settings = make_settings(NOETL_WORKER_NATS_ACK_WAIT_SECONDS="1", NOETL_CLAIM_MAX_BYTES="1048576")
    with trio.fail_after(40):
        async with open_worker(settings):
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_for(lambda: "command.failed" in stub.state.event_types(command), 20)
            await wait_acked(publisher)
            # A redelivery would come within ack_wait (1 s) or the nak delay: it must not.
            await trio.sleep(3)
    assert len(stub.state.requests_to(r"/claim$")) == 1
    assert REASONS[kind] in _failed_reason(stub, str(command.command_id))


async def test_a_50_mb_claim_answer_is_not_read_whole(
    nats: NatsServer, stub: StubServer, publisher: Publisher, tmp_path: Path
) -> None:
    """Peak RSS of a real worker process stays far below the answer's size."""
    pad = b"x" * (50 * 1024 * 1024)
    stub.state.inject("POST", r"/claim$", 200, body=b'{"context": {"pad": "' + pad + b'"}}', times=10)
    command = stub.state.enqueue_command(step="s", tool_kind="noop", tool_config={})
    with trio.fail_after(60):
        async with worker_process(
            stub, nats, tmp_path / "w.log", WORKER_ID="w-big", NOETL_CLAIM_MAX_BYTES="1048576"
        ) as process:
            await wait_registered(stub, "w-big")
            before = _peak_rss_mib(process.pid)
            await publisher.publish_command(command.notification(stub.url))
            await stub.state.wait_for(lambda: "command.failed" in stub.state.event_types(command), 30)
            after = _peak_rss_mib(process.pid)
    assert after - before < 25, f"peak RSS grew {before:.0f} → {after:.0f} MiB on a 50 MiB answer"
    assert "over the limit of 1048576 bytes" in _failed_reason(stub, str(command.command_id))


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# ---- fuzz: the parser answers a dict or a JSONLimitError, nothing else -----------------------

FUZZ = settings(
    max_examples=fuzz_examples(2000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**64), 10**300]),
    st.floats(),
    st.text(max_size=30),
)
documents = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@FUZZ
@given(st.one_of(st.binary(max_size=500), documents.map(lambda d: json.dumps(d).encode())))
def test_claim_answer_parser_never_raises_anything_else(data: bytes) -> None:
    try:
        answer = parse_claim_answer(data, max_bytes=400)
    except JSONLimitError as exc:
        assert str(exc)
    else:
        assert isinstance(answer, dict)


@settings(FUZZ, max_examples=fuzz_examples(300))
@given(depth=st.integers(min_value=300, max_value=300_000))
def test_claim_answer_depth_is_bounded_before_parsing(depth: int) -> None:
    data = b'{"a": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(JSONLimitError):
        parse_claim_answer(data, max_bytes=10**7)


async def test_an_answer_without_a_length_is_abandoned_at_the_budget() -> None:
    """A chunked answer (no Content-Length) is read as it comes and dropped past the budget: an
    endless body is not pulled further (the server's writes stall once the socket buffers fill)."""
    from noetl_worker.control_plane import ControlPlane, InvalidAnswer
    from noetl_worker.metrics import Metrics

    sent = 0
    chunk = b"x" * 65536

    async def endless(stream: trio.SocketStream) -> None:
        nonlocal sent
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        await stream.send_all(b"transfer-encoding: chunked\r\n\r\n")
        await stream.send_all(b"%x\r\n%s\r\n" % (21, b'{"context": {"pad": "'))
        try:
            while True:
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, endless, 0)
            port = listeners[0].socket.getsockname()[1]
            settings = Settings.from_env(
                {"NOETL_SERVER_URL": f"http://127.0.0.1:{port}", "NOETL_CLAIM_MAX_BYTES": "1048576"}
            )
            async with ControlPlane.open(settings, Metrics()) as plane:
                outcome = await plane.claim(None, 1)
            nursery.cancel_scope.cancel()
    assert isinstance(outcome, InvalidAnswer) and "over the limit of 1048576 bytes" in outcome.reason
    assert sent < 16 * 1024 * 1024, f"{sent} bytes were pulled from an endless answer"
