"""Test support: a stub NoETL control plane over real HTTP and an embedded nats-server.

Used by the worker's own tests, the demo, and by users testing their own tools::

    from noetl_worker.testing import StubState, open_stub_server, open_nats_server
"""

from __future__ import annotations

from ._state import (
    TERMINAL_COMMAND_STATUSES,
    ExecutionRow,
    Fault,
    PoolRow,
    RecordedRequest,
    StoredResult,
    StubCommand,
    StubEvent,
    StubState,
)
from ._workflow import Arc, WorkflowStep
from .nats_server import NatsServer, NatsServerError, find_nats_server, free_port, open_nats_server
from .sealing import seal_credential
from .stub_server import StubServer, build_app, open_stub_server, serve_stub

__all__ = [
    "TERMINAL_COMMAND_STATUSES",
    "Arc",
    "ExecutionRow",
    "Fault",
    "NatsServer",
    "NatsServerError",
    "PoolRow",
    "RecordedRequest",
    "StoredResult",
    "StubCommand",
    "StubEvent",
    "StubServer",
    "StubState",
    "WorkflowStep",
    "build_app",
    "find_nats_server",
    "free_port",
    "open_nats_server",
    "open_stub_server",
    "seal_credential",
    "serve_stub",
]

from .harness import Publisher, open_publisher, open_worker

__all__ += ["Publisher", "open_publisher", "open_worker"]
