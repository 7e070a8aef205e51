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

import base64
import datetime as _dt
import decimal
import functools
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from .errors import TemplateError

__all__ = ["build_variables", "render", "render_string"]

_CACHE_SIZE = 2048
# ``{{ expr }}`` and nothing else; the inner text must not open or close another block.
_BARE = re.compile(r"\s*\{\{-?(?P<expr>(?:(?!\{\{|\}\}|\{%|%\}).)*?)-?\}\}\s*", re.DOTALL)


class _StrictSandbox(SandboxedEnvironment):
    """A sandbox whose unsafe attribute access fails loudly instead of being undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _json_default(value: Any) -> Any:
    if isinstance(value, jinja2.Undefined):
        return None
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _tojson(value: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes quotes and angle brackets; playbooks embed JSON in SQL and
    # shell, where plain JSON is wanted.
    if isinstance(value, jinja2.Undefined):
        return "null"
    return json.dumps(value, default=_json_default, ensure_ascii=False, indent=indent, sort_keys=sort_keys)


def _from_json(value: Any) -> Any:
    if isinstance(value, str | bytes | bytearray):
        return json.loads(value)
    if isinstance(value, jinja2.Undefined):
        return None
    return value  # already decoded: pass through, as upstream's lenient helpers do


def _b64encode(value: Any) -> str:
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


def _b64decode(value: Any) -> str:
    text = value.decode("ascii") if isinstance(value, bytes) else str(value)
    raw = base64.b64decode(text + "=" * (-len(text) % 4))
    return raw.decode("utf-8", errors="replace")


def _regex_replace(value: Any, pattern: str, replacement: str = "", ignorecase: bool = False) -> str:
    flags = re.IGNORECASE if ignorecase else 0
    return re.sub(pattern, replacement, str(value), flags=flags)


def _make_environment() -> SandboxedEnvironment:
    env = _StrictSandbox(
        undefined=jinja2.ChainableUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        extensions=["jinja2.ext.loopcontrols"],
    )
    env.filters.update(
        {
            "tojson": _tojson,
            "to_json": _tojson,
            "from_json": _from_json,
            "fromjson": _from_json,
            "b64encode": _b64encode,
            "b64decode": _b64decode,
            "base64_encode": _b64encode,
            "base64_decode": _b64decode,
            "regex_replace": _regex_replace,
        }
    )
    return env


_ENV = _make_environment()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _template(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _expression(expr: str) -> Any:
    return _ENV.compile_expression(expr, undefined_to_none=True)


def _strip_undefined(value: Any) -> Any:
    if isinstance(value, jinja2.Undefined):
        return None
    if isinstance(value, list | tuple):
        return [_strip_undefined(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_undefined(v) for k, v in value.items()}
    return value


def render_string(source: str, variables: Mapping[str, Any]) -> Any:
    """Render one string; see the module docstring for what comes back."""
    if "{{" not in source and "{%" not in source:
        return source
    try:
        bare = _BARE.fullmatch(source)
        if bare is not None:
            expr = bare.group("expr").strip()
            value = _expression(expr)(variables)
            # Literal lists/dicts may hold undefined members; a plain lookup returns user data
            # as is (it can be large, so it is not walked).
            if expr[:1] in "[{(":
                value = _strip_undefined(value)
            return value
        return _template(source).render(variables)
    except TemplateError:
        raise
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(source, f"syntax error: {exc.message} (line {exc.lineno})") from exc
    except SecurityError as exc:
        raise TemplateError(source, f"refused by the sandbox: {exc}") from exc
    except Exception as exc:
        raise TemplateError(source, f"{type(exc).__name__}: {exc}") from exc


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
    """The template variables of one command (upstream-rust-worker.md §4.2 shims).

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
