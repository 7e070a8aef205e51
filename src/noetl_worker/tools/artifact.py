"""``artifact``: ``action: get`` reads a stored result back, exactly as ``result_fetch`` does.

Config: ``action`` (``get``, the default), the reference as ``input.result_ref`` (the upstream
spelling), ``result_ref`` or ``ref``, and ``prefer`` (``http``). ``action: put`` is refused as
a configuration error: results are stored by the worker itself when a step's result is too big
to travel inline, so a playbook has nothing to put.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ..errors import ToolConfigError
from .base import ToolContext, ToolResult
from .result_fetch import check_transport, fetch, parse_reference

KIND: Final = "artifact"
ACTIONS: Final = ("get",)


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    cfg = ctx.render(dict(config))
    action = cfg.get("action", "get")
    if isinstance(action, str) and action.lower() == "put":
        raise ToolConfigError(
            KIND,
            "action",
            "'put' is not supported: the worker stores large step results itself; accepted: get",
        )
    if not isinstance(action, str) or action.lower() not in ACTIONS:
        raise ToolConfigError(KIND, "action", f"{action!r} is not accepted: expected get")
    check_transport(KIND, cfg)
    inputs = cfg.get("input") if isinstance(cfg.get("input"), Mapping) else {}
    for field, value in (
        ("input.result_ref", inputs.get("result_ref")),
        ("result_ref", cfg.get("result_ref")),
        ("ref", cfg.get("ref")),
    ):
        if value is not None:
            return await fetch(KIND, parse_reference(KIND, field, value), ctx)
    raise ToolConfigError(KIND, "input.result_ref", "required: a noetl:// URI or a reference object")
