"""The per-command pipeline around a tool: templating, references, credentials, results, cases.

``dispatch`` calls these hooks at fixed points of a command's lifecycle, so each concern lives in
its own module and dispatch stays about event order and settlement.
"""

from __future__ import annotations

from typing import Any

import attrs

from .dispatch import CaseEffect, Command
from .events import EventFactory
from .tools.base import ToolContext, ToolResult


@attrs.define(eq=False)
class BasicHooks:
    """Inline results, no credentials, no cases: the minimum pipeline."""

    async def prepare(self, command: Command, ctx: ToolContext) -> tuple[dict[str, Any], ToolContext]:
        return command.tool_config(), ctx

    async def call_done_result(
        self, command: Command, ctx: ToolContext, result: ToolResult
    ) -> dict[str, Any]:
        return {"status": result.status, "context": result.to_json()}

    async def after_result(
        self, command: Command, ctx: ToolContext, result: ToolResult, events: EventFactory
    ) -> CaseEffect:
        return CaseEffect()

    def scrub_text(self, text: str, ctx: ToolContext | None = None) -> str:
        return text


def default_hooks(settings: Any, metrics: Any) -> Any:
    """The full pipeline (references, credentials, scrubbed results, cases)."""
    from .pipeline import Pipeline

    return Pipeline.create(settings, metrics)
