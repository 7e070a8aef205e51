"""Jinja rendering of tool configurations, compatible with both upstream workers.

``render(value, variables)`` walks dicts and lists and renders every string in them:

- a string without ``{{`` or ``{%`` is returned as is, without a Jinja parse (the hot path);
- a string that is exactly one expression, ``{{ expr }}`` (surrounding whitespace allowed),
  returns the expression's *object* (dict, list, int, None, …) rather than its text, as the
  upstream Python worker does for python ``input`` values;
- anything else renders to text.

Undefined names (upstream-compatible leniency, since playbooks routinely reference optional
values): in text an undefined value renders as the empty string; a bare ``{{ missing }}`` yields
``None``; attribute or item access on an undefined value (``{{ missing.a.b }}``) does not raise
but stays undefined (Jinja's ``ChainableUndefined``); ``| default(...)`` works as usual; ``tojson``
writes ``null`` for it.

Security: templates run in Jinja's sandbox; touching an unsafe attribute (``__class__``,
``__subclasses__``, ``__globals__``, any ``_``-prefixed attribute of a Python object — dict *keys*
starting with ``_`` such as ``result._ref`` stay readable) raises ``TemplateError`` at once instead
of rendering an empty string.

Syntax errors, sandbox violations and errors raised inside filters become
``errors.TemplateError`` carrying the template text. Compiled templates live in a bounded LRU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["build_variables", "render", "render_string"]


def render_string(source: str, variables: Mapping[str, Any]) -> Any:
    """Render one string; see the module docstring for what comes back."""
    if "{{" not in source and "{%" not in source:
        return source
    from ._jinja import render_template  # Jinja loads on the first template, not at start-up

    return render_template(source, variables if isinstance(variables, dict) else dict(variables))


def _render(value: Any, variables: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return render_string(value, variables)
    if isinstance(value, Mapping):
        return {key: _render(item, variables) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_render(item, variables) for item in value]
    return value


def render(value: Any, variables: Mapping[str, Any]) -> Any:
    """Render every string inside ``value`` (str / dict / list, recursively) against ``variables``.

    Dict keys are not rendered. Raises ``TemplateError`` on a syntax error, a sandbox violation or
    an error raised while evaluating (e.g. ``from_json`` on invalid JSON).
    """
    if not isinstance(variables, dict):
        variables = dict(variables)  # Jinja copies into a dict anyway; do it once, not per string
    return _render(value, variables)


def build_variables(
    render_context: Mapping[str, Any],
    *,
    execution_id: int | str,
    step: str,
    command_id: str,
    worker_id: str,
    server_url: str,
    tool_kind: str,
    cursor: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The template variables of one command, with the Rust worker's shims.

    Starts from the command's ``render_context``; if it has no ``ctx``, ``ctx`` becomes the whole
    render context as one object and ``workload`` the same object when absent (shims the server
    stopped persisting); ``action`` (tool kind), ``node_name`` (step), ``execution_id``, ``step``,
    ``command_id``, ``worker_id`` and ``server_url`` are added only when absent, so a server's
    own value (e.g. ``execution_id`` as a string) wins; ``event.command_id`` is added as the
    Python worker did; ``__cursor_frame`` / ``__cursor_row`` come from ``meta.cursor``.
    """
    variables: dict[str, Any] = dict(render_context)
    if "ctx" not in variables:
        whole = dict(render_context)
        variables["ctx"] = whole
        variables.setdefault("workload", whole)
    for key, value in (
        ("action", tool_kind),
        ("node_name", step),
        ("execution_id", execution_id),
        ("step", step),
        ("command_id", command_id),
        ("worker_id", worker_id),
        ("server_url", server_url),
    ):
        variables.setdefault(key, value)
    event = variables.get("event")
    if event is None:
        variables["event"] = {"command_id": command_id}
    elif isinstance(event, Mapping) and "command_id" not in event:
        variables["event"] = {**event, "command_id": command_id}
    if cursor is not None:
        if "frame" in cursor:
            variables["__cursor_frame"] = cursor["frame"]
        if "row" in cursor:
            variables["__cursor_row"] = cursor["row"]
    return variables
