"""Step code imports what the environment has: the worker's own tool modules (tools/http.py,
tools/nats.py, …) must not shadow the standard library or installed packages of the same name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from noetl_worker.tools import resolve
from noetl_worker.tools.base import ToolContext, ToolResources

from ..tool_support import make_ctx


@pytest.fixture
async def ctx() -> AsyncIterator[ToolContext]:
    resources = ToolResources()
    try:
        yield make_ctx(resources)
    finally:
        await resources.aclose()


async def test_tool_module_names_do_not_shadow_step_imports(ctx: ToolContext) -> None:
    code = (
        "def main():\n"
        "    import http.client\n"
        "    import urllib.request\n"
        "    import nats.errors\n"
        "    return {'http': http.client.__name__, 'nats': nats.errors.__name__}\n"
    )
    with trio.fail_after(30):
        result = await resolve("python")({"code": code}, ctx)
    assert result.status == "success", result.error
    assert result.data == {"http": "http.client", "nats": "nats.errors"}
