"""Logging: one JSON object per line (with execution_id, command_id, step, worker_id as fields),
or readable plain lines when attached to a terminal.

Every record passes :class:`ScrubFilter` on the way out: its message, traceback, stack and
extra fields are scrubbed of the worker's own secrets, the keychain values and — while a
command runs — every secret that command resolved (``scrub.active``)."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import traceback
from typing import Any

from . import scrub

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


class ScrubFilter(logging.Filter):
    """Scrubs a record in place (a handler filter: it sees records of every logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrubber = scrub.active()
        record.msg = scrubber.scrub_text(record.getMessage())
        record.args = None
        if record.exc_info:
            text = record.exc_text or "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_text = scrubber.scrub_text(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = scrubber.scrub_text(record.exc_text)
        if record.stack_info:
            record.stack_info = scrubber.scrub_text(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _RESERVED and not key.startswith("_"):
                record.__dict__[key] = scrubber.scrub(value) if not isinstance(value, int) else value
        return True


def _exception(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info:
        return formatter.formatException(record.exc_info)
    return record.exc_text or None


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
        exc = _exception(self, record)
        if exc:
            out["exc"] = exc
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        fields.pop("worker_id", None)
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        ts = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        line = f"{ts} {record.levelname:<7} {record.getMessage()}" + (f"  [{extra}]" if extra else "")
        exc = _exception(self, record)
        if exc:
            line += "\n" + exc
        return line


def configure(level: str, fmt: str, worker_id: str, stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    _STATIC.clear()
    _STATIC["worker_id"] = worker_id
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ScrubFilter())
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
