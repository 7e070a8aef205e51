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
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a ``python -m noetl_worker`` child that imports this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


PYTHON = sys.executable
