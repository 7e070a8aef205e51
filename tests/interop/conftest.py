"""Fixtures of the interop suite: real NoETL 4.12.1 stacks, one per worker, shared by the session.

``interop_stacks`` starts two stacks at once (see ``harness.py``): ``noetl`` runs noetl's own
worker, ``ours`` runs this project's. Each playbook gets a fresh execution on each. The start-up
cost (up to a minute for the servers) is paid once per session.

The suite is part of the default test run. It is skipped only on an explicit opt-out,
``NOETL_INTEROP=skip`` (``./scripts/test --no-interop`` sets it); when the real server cannot be
set up (no Python 3.12, pip failure, no PostgreSQL) every interop test fails with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .harness import InteropError, Stack, open_stacks

OPTED_OUT = os.environ.get("NOETL_INTEROP", "").strip().lower() == "skip"

# Stacks kept for the terminal summary when something failed (their logs are kept too).
_KEPT: list[Stack] = []
_SETUP_ERROR: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not OPTED_OUT:
        return
    marker = pytest.mark.skip(reason="interop suite opted out explicitly (NOETL_INTEROP=skip)")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def interop_stacks(request: pytest.FixtureRequest) -> Iterator[dict[str, Stack]]:
    """``{"noetl": Stack, "ours": Stack}``, each with its worker started and bound."""
    if _SETUP_ERROR:
        pytest.fail(_SETUP_ERROR[0], pytrace=False)
    try:
        manager = open_stacks(["noetl", "ours"])
        stacks = manager.__enter__()
    except InteropError as exc:
        _SETUP_ERROR.append(f"interop setup failed: {exc}")
        pytest.fail(_SETUP_ERROR[0], pytrace=False)
    failed_before = request.session.testsfailed
    try:
        yield stacks
    finally:
        if request.session.testsfailed > failed_before:
            for stack in stacks.values():
                stack.keep_logs = True
                _KEPT.append(stack)
        manager.__exit__(None, None, None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from . import report

    report.write_table(terminalreporter)
    for stack in _KEPT:
        terminalreporter.write_line(f"interop logs kept ({stack.name}): {stack.logs}")
