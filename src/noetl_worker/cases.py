"""Case evaluation after a tool returns (``context.cases``, as the Rust worker evaluates them).

``cases`` is a list of ``{"when": [{"left", "op", "right"}, …], "then": <action>}``. The first
case whose conditions all hold wins. Unlike upstream, a case that cannot be parsed is not
silently dropped: :func:`parse_cases` returns one message per bad case naming the field and the
accepted values, for dispatch to log (and surface) while the good cases still run.

Dispatch applies the action: ``Exit`` → ``step.exit``; ``SetVar`` → ``POST /api/vars/{eid}``;
``Fail`` → ``command.failed``; ``Goto``/``Retry``/``Continue`` are reported for the server.
Action payloads are returned as written; dispatch renders them if it wants templated values.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from .errors import WorkerError

OPERATORS: Final = (
    "eq", "ne", "gt", "lt", "gte", "lte", "contains", "matches", "truthy", "falsy", "in", "not_in",
)  # fmt: skip
ACTIONS: Final = ("continue", "exit", "set_var", "goto", "retry", "fail")
_UNARY: Final = frozenset({"truthy", "falsy"})


class CaseError(WorkerError):
    """Evaluating a case failed (invalid regex, non-numeric comparison, render error)."""


@attrs.frozen
class Continue:
    pass


@attrs.frozen
class Exit:
    status: str
    data: Any = None


@attrs.frozen
class SetVar:
    name: str
    value: Any = None


@attrs.frozen
class Goto:
    step: str


@attrs.frozen
class Retry:
    delay_ms: int | None = None


@attrs.frozen
class Fail:
    message: str


CaseAction = Continue | Exit | SetVar | Goto | Retry | Fail


@attrs.frozen
class Condition:
    left: str
    op: str = "eq"
    right: Any = None


@attrs.frozen
class Case:
    index: int  # position in the original list, for messages
    when: tuple[Condition, ...]
    then: CaseAction


class _ParseError(Exception):
    pass


def _require_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _ParseError(f"{where}.{key}: required non-empty string, got {value!r}")
    return value


def _parse_condition(raw: Any, where: str) -> Condition:
    if not isinstance(raw, Mapping):
        raise _ParseError(f"{where}: expected an object {{left, op, right}}, got {raw!r}")
    left = raw.get("left")
    if not isinstance(left, str):
        raise _ParseError(f"{where}.left: required string, got {left!r}")
    op = raw.get("op", "eq")
    if op not in OPERATORS:
        raise _ParseError(f"{where}.op: {op!r} is not one of {', '.join(OPERATORS)}")
    return Condition(left, op, raw.get("right"))


def _parse_action(raw: Any, where: str) -> CaseAction:
    if raw == "continue":
        return Continue()
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise _ParseError(
            f'{where}: expected "continue" or an object with one key of {", ".join(ACTIONS)}, got {raw!r}'
        )
    ((tag, body),) = raw.items()
    inner = f"{where}.{tag}"
    if tag == "continue" and body in (None, {}):
        return Continue()
    if not isinstance(body, Mapping):
        raise _ParseError(f"{inner}: expected an object, got {body!r}")
    if tag == "exit":
        return Exit(_require_str(body, "status", inner), body.get("data"))
    if tag == "set_var":
        return SetVar(_require_str(body, "name", inner), body.get("value"))
    if tag == "goto":
        return Goto(_require_str(body, "step", inner))
    if tag == "retry":
        delay = body.get("delay_ms")
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
            raise _ParseError(f"{inner}.delay_ms: expected an integer >= 0, got {delay!r}")
        return Retry(delay)
    if tag == "fail":
        return Fail(_require_str(body, "message", inner))
    raise _ParseError(f"{where}: action {tag!r} is not one of {', '.join(ACTIONS)}")


def parse_cases(raw: Any) -> tuple[list[Case], list[str]]:
    """The cases that parse, and one message per case that does not."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [f"cases: expected a list of {{when, then}} objects, got {type(raw).__name__}"]
    cases: list[Case] = []
    errors: list[str] = []
    for index, item in enumerate(raw):
        where = f"cases[{index}]"
        try:
            if not isinstance(item, Mapping):
                raise _ParseError(f"{where}: expected an object {{when, then}}, got {item!r}")
            when = item.get("when")
            if isinstance(when, Mapping):
                when = [when]
            if not isinstance(when, list):
                raise _ParseError(f"{where}.when: required list of conditions, got {when!r}")
            if "then" not in item:
                raise _ParseError(f"{where}.then: required action")
            conditions = tuple(_parse_condition(c, f"{where}.when[{i}]") for i, c in enumerate(when))
            cases.append(Case(index, conditions, _parse_action(item["then"], f"{where}.then")))
        except _ParseError as exc:
            errors.append(str(exc))
    return cases, errors


# --- evaluation --------------------------------------------------------------------------

_MISSING: Final = object()


def _dot_path(data: Any, path: str) -> Any:
    current = data
    for segment in path.split("."):
        if isinstance(current, Mapping):
            current = current.get(segment)
        elif isinstance(current, list) and segment.isdigit():
            position = int(segment)
            current = current[position] if position < len(current) else None
        else:
            return None
    return current


def _resolve_left(left: str, data: Any, variables: Mapping[str, Any], render: Callable[[Any], Any]) -> Any:
    if left == "result":
        return data
    if left.startswith("result."):
        return _dot_path(data, left[len("result.") :])
    if left in variables:
        return variables[left]
    if "{{" in left or "{%" in left:
        rendered = render(left)
        if isinstance(rendered, str):
            try:
                return json.loads(rendered)
            except ValueError:
                return rendered
        return rendered
    return left


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: booleans are not numbers; 1 and 1.0 are the same number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _number(value: Any, side: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
        else:
            if not math.isnan(number):
                return number
    raise CaseError(f"{side} {value!r} is not a number (numbers, numeric strings, bools, null)")


def is_truthy(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, str | list | tuple | Mapping):
        return len(value) > 0
    return True


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _holds(op: str, left: Any, right: Any) -> bool:
    if op == "eq":
        return _json_equal(left, right)
    if op == "ne":
        return not _json_equal(left, right)
    if op in ("gt", "lt", "gte", "lte"):
        a, b = _number(left, "left"), _number(right, "right")
        return {"gt": a > b, "lt": a < b, "gte": a >= b, "lte": a <= b}[op]
    if op == "contains":
        return _text(right) in _text(left)
    if op == "matches":
        if not isinstance(right, str):
            raise CaseError(f"matches: the pattern must be a string, got {right!r}")
        try:
            return re.search(right, _text(left)) is not None
        except re.error as exc:
            raise CaseError(f"matches: invalid regular expression {right!r}: {exc}") from None
    if op == "truthy":
        return is_truthy(left)
    if op == "falsy":
        return not is_truthy(left)
    if op == "in":
        return isinstance(right, list) and any(_json_equal(left, item) for item in right)
    if op == "not_in":
        return not (isinstance(right, list) and any(_json_equal(left, item) for item in right))
    raise CaseError(f"op {op!r} is not one of {', '.join(OPERATORS)}")


def evaluate(
    cases: list[Case],
    data: Any,
    variables: Mapping[str, Any],
    render: Callable[[Any], Any],
) -> CaseAction | None:
    """The action of the first case whose conditions all hold, else None.

    ``data`` is the tool result's ``data``; ``render`` renders templates against the command's
    variables. Raises :class:`CaseError` naming the case and condition on an evaluation error.
    """
    for case in cases:
        matched = True
        for position, condition in enumerate(case.when):
            where = f"cases[{case.index}].when[{position}]"
            try:
                left = _resolve_left(condition.left, data, variables, render)
                right = None if condition.op in _UNARY else render(condition.right)
                holds = _holds(condition.op, left, right)
            except CaseError as exc:
                raise CaseError(f"{where}: {exc}") from None
            except Exception as exc:  # the renderer's own errors
                raise CaseError(f"{where}: rendering failed: {exc}") from exc
            if not holds:
                matched = False
                break
        if matched:
            return case.then
    return None
