"""Logging: one JSON object per line (with execution_id, command_id, step, worker_id as fields),
or readable plain lines when attached to a terminal."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Any

# Per-command fields, set by dispatch for the duration of one command task (trio copies the
# context into each task, so concurrent commands never see each other's fields).
command_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "command_fields", default=None
)
_STATIC: dict[str, Any] = {}
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {**_STATIC, **(command_fields.get() or {})}
    for key, value in record.__dict__.items():
        if key not in _RESERVED and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        fields.pop("worker_id", None)
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        ts = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        line = f"{ts} {record.levelname:<7} {record.getMessage()}" + (f"  [{extra}]" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str, fmt: str, worker_id: str, stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    _STATIC.clear()
    _STATIC["worker_id"] = worker_id
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter stays at warning unless we debug.
    for noisy in (
        "httpx",
        "httpcore",
        "hypercorn.access",
        "hypercorn.error",
        "asyncio",
        "trio_asyncio",
    ):
        logging.getLogger(noisy).setLevel(
            logging.DEBUG if level == "debug" and noisy != "hypercorn.access" else logging.WARNING
        )
