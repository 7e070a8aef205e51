"""Drain without stranding, judged by the real NoETL server 4.12.1.

Worker A (WORKER_ID w-a) is sent SIGTERM while a step runs; its grace period ends first, so the
command is cancelled, its message nak'd and A deregisters (the server marks it offline). Worker B
(w-b, the same durable consumer) gets the redelivery. The 4.12.1 server has no call that releases
a claim: it answers 409 ``active_claim`` until the claim is older than its lease
(``NOETL_COMMAND_CLAIM_LEASE_SECONDS``, 120 s) and then, the holder being offline, reclaims it for
the next claimant (``reclaimed_reason: worker_inactive``). B therefore keeps the notification
(nak with a growing delay) instead of acking it away, and runs the command once the server hands
it over. The step's side effect must happen exactly once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from ..interop.conftest import OPTED_OUT
from ..interop.harness import Stack, open_stacks, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(OPTED_OUT, reason="interop suite opted out explicitly (NOETL_INTEROP=skip)"),
]

PLAYBOOK = """
apiVersion: noetl.io/v2
kind: Playbook
metadata:
  name: handback
  path: faults/handback
workflow:
  - step: start
    tool:
      kind: shell
      cmds:
        - "echo started >> {starts}; sleep 25; echo done >> {ledger}"
    next:
      arcs:
        - step: finish
  - step: finish
    tool:
      kind: shell
      cmds:
        - "echo finished"
"""


def _types(stack: Stack, execution_id: str, step: str) -> list[str]:
    return [str(e.get("event_type")) for e in stack.events(execution_id) if e.get("node_name") == step]


def test_a_command_cancelled_at_the_drain_deadline_completes_once_on_another_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts, ledger = tmp_path / "starts", tmp_path / "ledger"
    with open_stacks(["handback"], workers={"handback": []}) as stacks:
        stack = stacks["handback"]
        durable = "handback_pool"
        a = stack.start_worker(
            "ours",
            durable=durable,
            env={"WORKER_ID": "w-a", "NOETL_WORKER_SHUTDOWN_GRACE_SECONDS": "2"},
        )
        path = stack.register(PLAYBOOK.format(starts=starts, ledger=ledger))
        execution_id = stack.execute(path)
        wait_for("step start running on w-a", lambda: starts.exists(), 60)

        a.signal(signal.SIGTERM)
        wait_for("w-a exits", lambda: not a.alive, 30)
        assert a.popen.returncode == 0, a.tail()
        assert not ledger.exists(), "the step finished before the drain deadline: nothing to hand back"

        # B joins the same durable consumer (start_worker would delete it first: keep it).
        monkeypatch.setattr(Stack, "delete_consumer", lambda self, name: None)
        b = stack.start_worker("ours", durable=durable, env={"WORKER_ID": "w-b"})
        began = time.monotonic()
        terminal, events = stack.wait_terminal(execution_id, timeout=300)
        assert terminal == "playbook.completed", (b.tail(), [e.get("event_type") for e in events])
        handed_over_in = time.monotonic() - began
        # The claim rows as the server stored them (the events API does not return their meta).
        rows = stack.pg.psql(
            stack.db_name,
            "-At",
            "-c",
            "SELECT meta->>'worker_id', coalesce(meta->>'reclaimed_reason', '') FROM noetl.event"
            f" WHERE execution_id = {int(execution_id)} AND event_type = 'command.claimed'"
            " AND node_name = 'start' ORDER BY event_id",
        ).stdout.split()

    assert ledger.read_text().split() == ["done"], "the step's side effect did not happen exactly once"
    assert starts.read_text().split() == ["started", "started"]  # begun on w-a, run again on w-b
    start_events = [e for e in events if e.get("node_name") == "start"]
    done = [e for e in start_events if e.get("event_type") == "call.done"]
    completed = [e for e in start_events if e.get("event_type") == "command.completed"]
    assert len(done) == 1 and len(completed) == 1, [e.get("event_type") for e in start_events]
    assert rows == ["w-a|", "w-b|worker_inactive"], rows
    print(f"handed over to w-b {handed_over_in:.0f}s after it started")
