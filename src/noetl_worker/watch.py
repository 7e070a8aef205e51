"""``noetl-worker watch [URL]``: follow a worker's ``GET /events`` stream.

On a terminal, with ``rich`` installed (``pip install 'noetl-worker[watch]'``), a live table of
the most recent commands (state, status, duration, error); otherwise one plain line per record,
which is what a pipe or a log file wants. The URL defaults to ``ws://127.0.0.1:9090/events``;
``http://host:port`` is accepted and completed. Ends when the worker closes the stream (exit 0)
or cannot be reached (exit 1).
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from typing import Any, TextIO

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

DEFAULT_URL = "ws://127.0.0.1:9090/events"
ROWS = 30


def normalize_url(url: str | None) -> str:
    if not url:
        return DEFAULT_URL
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    elif not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    return url if url.rstrip("/").endswith("/events") else url.rstrip("/") + "/events"


def format_line(record: dict[str, Any]) -> str:
    """One plain line per record: time, event, ids, then status/duration/error when present."""
    parts = [
        str(record.get("at", "")),
        f"{record.get('event', '?'):<8}",
        f"execution={record.get('execution_id')}",
        f"command={record.get('command_id')}",
        f"step={record.get('step')}",
        f"kind={record.get('tool_kind')}",
    ]
    if record.get("status") is not None:
        parts.append(f"status={record['status']}")
    if record.get("duration_ms") is not None:
        parts.append(f"duration_ms={record['duration_ms']}")
    if record.get("error"):
        parts.append(f"error={json.dumps(record['error'])}")
    return " ".join(parts)


class Board:
    """The latest state of the most recent commands, for the live table."""

    def __init__(self, rows: int = ROWS) -> None:
        self.rows = rows
        self.commands: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def update(self, record: dict[str, Any]) -> None:
        key = str(record.get("command_id"))
        row = self.commands.pop(key, {})
        row.update({k: v for k, v in record.items() if v is not None})
        self.commands[key] = row
        while len(self.commands) > self.rows:
            self.commands.popitem(last=False)

    def render(self) -> Any:
        from rich.table import Table

        table = Table(title="noetl-worker commands", expand=True)
        for column in ("at", "command", "step", "kind", "state", "status", "ms", "error"):
            table.add_column(column, overflow="fold")
        styles = {"finished": "green", "failed": "red"}
        for row in reversed(self.commands.values()):
            state = str(row.get("event", ""))
            table.add_row(
                str(row.get("at", "")),
                str(row.get("command_id", "")),
                str(row.get("step", "")),
                str(row.get("tool_kind", "")),
                state,
                str(row.get("status", "")),
                str(row.get("duration_ms", "")),
                str(row.get("error", ""))[:200],
                style=styles.get(state),
            )
        return table


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


async def watch(url: str, out: TextIO, *, live: bool | None = None, limit: int | None = None) -> int:
    """Print records from ``url`` until the stream ends (or ``limit`` records); the exit code."""
    if live is None:
        live = out.isatty() and _rich_available()
    board = Board()
    seen = 0
    try:
        async with open_websocket_url(url) as ws:
            if live:
                from rich.console import Console
                from rich.live import Live

                with Live(board.render(), console=Console(file=out), refresh_per_second=4) as view:
                    while limit is None or seen < limit:
                        record = json.loads(await ws.get_message())
                        board.update(record)
                        view.update(board.render())
                        seen += 1
            else:
                while limit is None or seen < limit:
                    record = json.loads(await ws.get_message())
                    out.write(format_line(record) + "\n")
                    out.flush()
                    seen += 1
    except ConnectionClosed as exc:
        reason = exc.reason
        if reason is not None and reason.code not in (1000, 1001):
            print(f"noetl-worker watch: stream closed: {reason.code} {reason.reason or ''}", file=sys.stderr)
            return 1
    except ConnectionRejected as exc:
        print(
            f"noetl-worker watch: {url} refused the stream (HTTP {exc.status_code});"
            " is WORKER_EVENTS_STREAM=true on that worker?",
            file=sys.stderr,
        )
        return 1
    except HandshakeError as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        print(f"noetl-worker watch: cannot connect to {url}: {cause}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"noetl-worker watch: cannot connect to {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(url: str | None) -> int:
    try:
        return trio.run(watch, normalize_url(url), sys.stdout)
    except KeyboardInterrupt:
        return 0
