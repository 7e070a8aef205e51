"""Helpers shared by the tool tests: a ToolContext with a fake control plane."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from noetl_worker.config import Settings
from noetl_worker.tools.base import ToolContext, ToolResources


class NoServer:
    """A ServerAPI for tools that must not talk to the control plane."""

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        raise AssertionError(f"unexpected GET {path}")

    async def post_json(self, path: str, body: Any) -> Any:
        raise AssertionError(f"unexpected POST {path}")

    async def put_json(self, path: str, body: Any) -> Any:
        raise AssertionError(f"unexpected PUT {path}")


def make_ctx(
    resources: ToolResources | None = None,
    *,
    server: Any = None,
    secrets: Mapping[str, str] | None = None,
    render: Callable[[Any], Any] | None = None,
    variables: Mapping[str, Any] | None = None,
    **extra: Any,
) -> ToolContext:
    kwargs: dict[str, Any] = {}
    if render is not None:
        kwargs["render"] = render
    return ToolContext(
        execution_id=101,
        step="step",
        command_id="cmd-1",
        worker_id="worker-test",
        server_url="http://127.0.0.1:1",
        variables=dict(variables or {}),
        secrets=dict(secrets or {}),
        server=server if server is not None else NoServer(),
        resources=resources if resources is not None else ToolResources(),
        settings=Settings.from_env({}),
        **kwargs,
        **extra,
    )


def process_alive(pid: int) -> bool:
    """True while ``pid`` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
