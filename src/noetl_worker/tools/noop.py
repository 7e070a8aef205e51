"""``noop``: returns its ``result`` if given, else noetl's ``{"status": "noop", "step": <step>}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ToolContext, ToolResult


async def run(config: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
    if "result" in config and config["result"] is not None:
        return ToolResult("success", data=config["result"])
    return ToolResult("success", data={"status": "noop", "step": ctx.step})
