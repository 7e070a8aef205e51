"""The Jinja half of ``templating``: imported on the first string that holds a template, so a
worker whose commands carry no templates never loads Jinja (about 2.7 MiB of idle RSS)."""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import functools
import json
import re
import uuid
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from .errors import TemplateError

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


def render_template(source: str, variables: dict[str, Any]) -> Any:
    """Render one string that holds ``{{`` or ``{%`` (see ``templating.render_string``)."""
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
