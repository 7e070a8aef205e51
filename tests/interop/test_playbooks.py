"""The differential suite: every playbook under ``playbooks/`` on the real NoETL 4.12.1 server,
once with noetl's own worker (the reference: each case is written to its truth) and once with
ours (same outcome, same per-step event types, same stored result fields, same checked values —
except documented improvements, asserted as such)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import report
from .cases import CASES, Case, assert_case
from .compare import compare
from .harness import Stack
from .runner import Runner
from .target import Target, open_target


@pytest.fixture(scope="session")
def interop_target() -> Iterator[Target]:
    with open_target() as target:
        yield target


def _selected(session: pytest.Session) -> tuple[Case, ...]:
    """The cases of this module's tests the session will run, in CASES order."""
    names = set()
    for item in session.items:
        module = getattr(item, "module", None)
        callspec = getattr(item, "callspec", None)
        if module is not None and module.__name__ == __name__ and callspec and "case" in callspec.params:
            names.add(callspec.params["case"].name)
    return tuple(c for c in CASES if c.name in names)


@pytest.fixture(scope="session")
def interop_runner(
    request: pytest.FixtureRequest, interop_stacks: dict[str, Stack], interop_target: Target
) -> Iterator[Runner]:
    for stack in interop_stacks.values():
        stack.create_credential(
            "interop_pg",
            "postgres",
            {
                "db_host": stack.pg.host,
                "db_port": str(stack.pg.port),
                "db_user": stack.pg.user,
                "db_password": stack.pg.password or "postgres",
                "db_name": "test",
            },
        )
        stack.create_credential("interop_bearer", "bearer", {"token": interop_target.token})
    runner = Runner(stacks=interop_stacks, target=interop_target, cases=_selected(request.session))
    yield runner
    runner.close()


def _id(case: Case) -> str:
    return case.name


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_noetl_worker(case: Case, interop_runner: Runner) -> None:
    """The playbook and its expectations hold with noetl's own worker (the reference)."""
    row = report.row(case.name, case.expect)
    run = interop_runner.get(case, "noetl")
    report.record_run(case.name, case.expect, "noetl", run)
    row.reference_ok = False
    assert_case(case, run, interop_runner.env("noetl"))
    row.reference_ok = True


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_our_worker(case: Case, interop_runner: Runner) -> None:
    """Our worker gives the same result as noetl's own on the same server."""
    row = report.row(case.name, case.expect)
    ours = interop_runner.get(case, "ours")
    reference = interop_runner.get(case, "noetl")
    report.record_run(case.name, case.expect, "ours", ours)
    report.record_run(case.name, case.expect, "noetl", reference)
    diff = compare(reference, ours)
    row.ours_ok = False
    if case.improvement:
        row.verdict = f"documented: {case.improvement}" + ("" if diff.same else f" ({diff.describe()})")
        assert_case(case, ours, interop_runner.env("ours"), ours=True)
    else:
        row.verdict = diff.describe()
        assert_case(case, ours, interop_runner.env("ours"), ours=True)
        assert diff.same, f"differs from noetl's worker: {diff.describe()}"
    row.ours_ok = True


# A one-tool step of a kind the server's playbook schema does not list (its ``ToolSpec.kind``).
_WEBSOCKET_TOOL_BLOCK = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata:
  name: websocket_tool_block
  path: interop/websocket_tool_block
workflow:
  - step: talk
    tool: {kind: websocket, url: "ws://127.0.0.1:1/", send: hi, receive: 1}
    next:
      arcs:
        - step: end
  - step: end
    tool: {kind: noop}
"""


def test_a_websocket_tool_block_is_refused_at_registration(interop_stacks: dict[str, Stack]) -> None:
    """The real server refuses ``tool: {kind: websocket}`` when the playbook is registered (so
    nothing reaches a worker); the same task inside a list-form ``tool:`` is accepted and run
    (case ``websocket_echo``)."""
    answer = interop_stacks["noetl"].http.post(
        "/api/catalog/register", json={"content": _WEBSOCKET_TOOL_BLOCK, "resource_type": "Playbook"}
    )
    assert answer.status_code == 422, answer.text
    message = answer.json()["detail"]
    assert "is not a valid playbook: workflow.0.tool.ToolSpec.kind: Input should be 'http'" in message, (
        message
    )
    assert "workflow.0.tool.list[dict[str,any]]: Input should be a valid list" in message, message
