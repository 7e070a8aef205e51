from __future__ import annotations

import re
from typing import Any

import pytest

from noetl_worker.cases import (
    CaseError,
    Continue,
    Exit,
    Fail,
    Goto,
    Retry,
    SetVar,
    evaluate,
    parse_cases,
)

VARIABLES = {"threshold": 10, "name": "alice", "workload": {"limit": 3}}


def render(value: Any) -> Any:
    """A tiny stand-in for templating.render: {{ name }} looks up a variable."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", value)
        if whole:
            return VARIABLES[whole.group(1)]
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(VARIABLES[m.group(1)]), value)
    if isinstance(value, list):
        return [render(v) for v in value]
    return value


def run(when: list[dict[str, Any]], data: Any) -> bool:
    cases, errors = parse_cases([{"when": when, "then": "continue"}])
    assert errors == []
    return evaluate(cases, data, VARIABLES, render) == Continue()


def test_actions_parse() -> None:
    raw = [
        {"when": [], "then": "continue"},
        {"when": [], "then": {"exit": {"status": "done", "data": {"a": 1}}}},
        {"when": [], "then": {"set_var": {"name": "x", "value": [1]}}},
        {"when": [], "then": {"goto": {"step": "next"}}},
        {"when": [], "then": {"retry": {"delay_ms": 500}}},
        {"when": [], "then": {"fail": {"message": "bad"}}},
    ]
    cases, errors = parse_cases(raw)
    assert errors == []
    assert [c.then for c in cases] == [
        Continue(), Exit("done", {"a": 1}), SetVar("x", [1]), Goto("next"), Retry(500), Fail("bad"),
    ]  # fmt: skip


def test_bad_cases_reported_not_dropped_silently() -> None:
    raw = [
        {"when": [{"left": "result", "op": "bogus"}], "then": "continue"},
        {"when": [], "then": {"explode": {}}},
        {"when": [], "then": {"goto": {}}},
        "nope",
        {"then": "continue"},
        {"when": [{"left": "result", "op": "truthy"}], "then": {"fail": {"message": "m"}}},
    ]
    cases, errors = parse_cases(raw)
    assert [c.index for c in cases] == [5]
    assert len(errors) == 5
    assert errors[0].startswith("cases[0].when[0].op: 'bogus' is not one of eq, ne")
    assert "cases[1].then: action 'explode'" in errors[1]
    assert errors[2].startswith("cases[2].then.goto.step: required")
    assert parse_cases({"when": []})[1] == ["cases: expected a list of {when, then} objects, got dict"]


def test_first_match_wins_and_conditions_are_anded() -> None:
    big = {"left": "result.n", "op": "gt", "right": 5}
    cases, _ = parse_cases(
        [
            {"when": [big, {"left": "result.ok", "op": "truthy"}], "then": {"goto": {"step": "a"}}},
            {"when": [big], "then": {"goto": {"step": "b"}}},
            {"when": [], "then": {"goto": {"step": "c"}}},
        ]
    )
    assert evaluate(cases, {"n": 6, "ok": True}, VARIABLES, render) == Goto("a")
    assert evaluate(cases, {"n": 6, "ok": False}, VARIABLES, render) == Goto("b")
    assert evaluate(cases, {"n": 1}, VARIABLES, render) == Goto("c")
    assert evaluate(cases[:1], {"n": 1}, VARIABLES, render) is None


@pytest.mark.parametrize(
    ("left", "data", "expected"),
    [
        ("result", {"a": 1}, {"a": 1}),
        ("result.rows.1.id", {"rows": [{"id": 1}, {"id": 2}]}, 2),
        ("result.missing.deep", {"a": 1}, None),
        ("result.rows.9", {"rows": []}, None),
        ("name", None, "alice"),
        ("{{ threshold }}", None, 10),
        ("{{ name }}-x", None, "alice-x"),
        ("plain words", None, "plain words"),
    ],
)
def test_left_resolution(left: str, data: Any, expected: Any) -> None:
    assert run([{"left": left, "op": "eq", "right": expected}], data)


@pytest.mark.parametrize(
    ("op", "left", "right", "holds"),
    [
        ("eq", 1, 1.0, True),
        ("eq", 1, True, False),
        ("eq", {"a": [1]}, {"a": [1]}, True),
        ("ne", "a", "b", True),
        ("eq", None, None, True),  # missing right is null
        ("gt", "11", "{{ threshold }}", True),
        ("lt", None, 1, True),
        ("gte", True, 1, True),
        ("lte", 2.5, "2.5", True),
        ("contains", "hello world", "lo w", True),
        ("contains", 123, "1", False),
        ("matches", "abc123", r"\d+$", True),
        ("matches", "abc", "^b", False),
        ("truthy", "false", None, True),
        ("falsy", {}, None, True),
        ("falsy", 0, None, True),
        ("truthy", [0], None, True),
        ("in", "b", ["a", "b"], True),
        ("in", "b", "abc", False),
        ("not_in", "b", "abc", True),
        ("not_in", 1, [1.0], False),
    ],
)
def test_operators(op: str, left: Any, right: Any, holds: bool) -> None:
    condition: dict[str, Any] = {"left": "result", "op": op}
    if right is not None:
        condition["right"] = right
    assert run([condition], left) is holds


def test_default_op_is_eq() -> None:
    assert run([{"left": "result", "right": 3}], 3)


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (
            {"left": "result", "op": "matches", "right": "("},
            r"cases\[0\].when\[0\]: matches: invalid",
        ),
        ({"left": "result", "op": "gt", "right": 1}, "left 'abc' is not a number"),
        ({"left": "{{ threshold }}", "op": "lt", "right": [1]}, r"right \[1\] is not a number"),
        ({"left": "{{ unknown }}", "op": "eq"}, "rendering failed"),
    ],
)
def test_evaluation_errors_are_clear(condition: dict[str, Any], message: str) -> None:
    cases, _ = parse_cases([{"when": [condition], "then": "continue"}])
    with pytest.raises(CaseError, match=message):
        evaluate(cases, "abc", VARIABLES, render)
