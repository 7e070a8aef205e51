"""Tool registry: tool kind → the module that implements it.

Modules are imported on first use, so an idle worker does not pay for psycopg, duckdb or
pyarrow. Add a kind by adding a line to ``_BUILTIN`` (or ``register`` at run time).
"""

from __future__ import annotations

import importlib

from ..errors import ToolError
from .base import ToolContext, ToolFunction, ToolResources, ToolResult

__all__ = [
    "ToolContext",
    "ToolFunction",
    "ToolResources",
    "ToolResult",
    "kinds",
    "register",
    "resolve",
]

_BUILTIN: dict[str, str] = {
    "python": "noetl_worker.tools.python",
    "task_sequence": "noetl_worker.tools.task_sequence",
    "noop": "noetl_worker.tools.noop",
    "shell": "noetl_worker.tools.shell",
    "http": "noetl_worker.tools.http",
    "postgres": "noetl_worker.tools.postgres",
    "duckdb": "noetl_worker.tools.duckdb",
    "playbook": "noetl_worker.tools.playbook",
    "workbook": "noetl_worker.tools.workbook",
}
_loaded: dict[str, ToolFunction] = {}


def register(kind: str, function: ToolFunction) -> None:
    """Register (or replace) a tool kind at run time, e.g. a user's own tool in tests."""
    _loaded[kind] = function


def kinds() -> list[str]:
    return sorted(set(_BUILTIN) | set(_loaded))


def resolve(kind: str) -> ToolFunction:
    """The ``run`` function of a tool kind; ``ToolError('Tool not found: …')`` if unknown."""
    function = _loaded.get(kind)
    if function is not None:
        return function
    module_name = _BUILTIN.get(kind)
    if module_name is None:
        raise ToolError(f"Tool not found: {kind} (known kinds: {', '.join(kinds())})")
    module = importlib.import_module(module_name)
    loaded: ToolFunction = module.run
    _loaded[kind] = loaded
    return loaded
