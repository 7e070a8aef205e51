"""The side-by-side table printed at the end of the session (``pytest_terminal_summary``)."""

from __future__ import annotations

from typing import Any

import attrs

ROWS: dict[str, Row] = {}


@attrs.define
class Row:
    playbook: str
    expected: str
    noetl: str = "-"
    ours: str = "-"
    noetl_s: float | None = None
    ours_s: float | None = None
    reference_ok: bool | None = None
    ours_ok: bool | None = None
    verdict: str = ""


def row(playbook: str, expected: str) -> Row:
    found = ROWS.get(playbook)
    if found is None:
        found = ROWS[playbook] = Row(playbook=playbook, expected=expected)
    return found


def _short(terminal: str | None) -> str:
    return {"playbook.completed": "completed", "playbook.failed": "failed"}.get(terminal or "", "no terminal")


def record_run(playbook: str, expected: str, worker: str, run: Any) -> None:
    r = row(playbook, expected)
    if worker == "noetl":
        r.noetl, r.noetl_s = _short(run.terminal), run.wall_seconds
    else:
        r.ours, r.ours_s = _short(run.terminal), run.wall_seconds


def write_table(tr: Any) -> None:
    if not ROWS:
        return
    tr.section("interop: noetl 4.12.1 server, noetl's own worker vs ours")
    header = ("playbook", "expected", "noetl worker", "ours", "checks noetl/ours", "difference")
    lines = [header]
    for r in sorted(ROWS.values(), key=lambda r: r.playbook):

        def mark(ok: bool | None) -> str:
            return {True: "pass", False: "FAIL", None: "-"}[ok]

        def cell(outcome: str, secs: float | None) -> str:
            return outcome if secs is None else f"{outcome} {secs:.1f}s"

        lines.append(
            (
                r.playbook,
                r.expected,
                cell(r.noetl, r.noetl_s),
                cell(r.ours, r.ours_s),
                f"{mark(r.reference_ok)}/{mark(r.ours_ok)}",
                r.verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines[:]) for i in range(len(header) - 1)]
    for line in lines:
        cells = [line[i].ljust(widths[i]) for i in range(len(widths))]
        tr.write_line(" | ".join([*cells, line[-1]]))
    agree = sum(1 for r in ROWS.values() if r.ours_ok)
    tr.write_line(
        f"ours passes {agree} of {len(ROWS)} playbooks; noetl's worker passes "
        f"{sum(1 for r in ROWS.values() if r.reference_ok)}"
    )
