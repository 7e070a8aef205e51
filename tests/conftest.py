"""Test rules (as trio-websocket's suite has them):

- Real parts wherever users have them: a real nats-server per test module (started by the
  ``nats`` fixture on a free loopback port with its own store dir), real HTTP (the stub control
  plane served by hypercorn on port 0), the machine's PostgreSQL, real DuckDB.
- Virtual time (MockClock / autojump) only against the in-memory fakes in ``tests/fakes.py``;
  a MockClock never meets a real socket.
- Every test that does I/O runs under a ``trio.fail_after``; nothing sleeps to wait for
  something — tests wait on the condition.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a ``python -m noetl_worker`` child that imports this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


PYTHON = sys.executable


# ---- fuzzing budget ----------------------------------------------------------------------------

FUZZ_LONG = False  # set by --fuzz-long (pytest_configure below)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="run every hypothesis fuzz test with 100,000 examples instead of the CI budget",
    )


def pytest_configure(config: pytest.Config) -> None:
    global FUZZ_LONG
    FUZZ_LONG = bool(config.getoption("--fuzz-long"))


def fuzz_examples(ci: int) -> int:
    """Examples for one fuzz test: ``ci`` in the normal run, 100,000 with ``--fuzz-long``."""
    return 100_000 if FUZZ_LONG else ci


async def poll_until(predicate: Callable[[], bool], interval: float = 0.05) -> None:
    """For state that lives outside this process (a NATS connection flag, a consumer's lag) and
    so has no event to wait on. Callers bound it with ``trio.fail_after``."""
    import trio

    while not predicate():  # noqa: ASYNC110 - no event exists for remote state
        await trio.sleep(interval)


# ---- real components -------------------------------------------------------------------------

from collections.abc import AsyncIterator  # noqa: E402

from noetl_worker.config import Settings  # noqa: E402
from noetl_worker.testing import (  # noqa: E402
    NatsServer,
    Publisher,
    StubServer,
    StubState,
    open_nats_server,
    open_publisher,
    open_stub_server,
)


@pytest.fixture
async def nats() -> AsyncIterator[NatsServer]:
    """A real nats-server with JetStream, on a free loopback port with its own store dir."""
    async with open_nats_server() as server:
        yield server


@pytest.fixture
def stub_state() -> StubState:
    """Override in a test module (or parametrize) for another flavor or policy."""
    return StubState()


@pytest.fixture
async def stub(stub_state: StubState) -> AsyncIterator[StubServer]:
    """The stub control plane over real HTTP (hypercorn on port 0)."""
    async with open_stub_server(stub_state) as server:
        yield server


@pytest.fixture
async def publisher(nats: NatsServer) -> AsyncIterator[Publisher]:
    async with open_publisher(nats.url) as pub:
        yield pub


@pytest.fixture
def make_settings(nats: NatsServer, stub: StubServer) -> Callable[..., Settings]:
    """Settings for a worker wired to this test's nats-server and stub; keyword args are env vars."""

    def make(**env: str) -> Settings:
        base = {
            "NATS_URL": nats.url,
            "NOETL_SERVER_URL": stub.url,
            "WORKER_METRICS_BIND": "127.0.0.1:0",
            "WORKER_HEARTBEAT_INTERVAL": "2",
            "NOETL_LOG_FORMAT": "text",
        }
        base.update(env)
        return Settings.from_env(base)

    return make
