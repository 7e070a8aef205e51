"""Templating: bare expressions yield objects, lenient undefined, filters, sandbox."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from noetl_worker.errors import TemplateError, ToolError
from noetl_worker.templating import build_variables, render

VARS = {
    "obj": {"a": {"b": [1, 2, 3]}, "_ref": "nats://x"},
    "n": 5,
    "name": "world",
    "items": ["x", "y"],
    "none": None,
}


def test_bare_expression_returns_the_object_not_its_text() -> None:
    assert render("{{ obj.a }}", VARS) == {"b": [1, 2, 3]}
    assert render("{{ n }}", VARS) == 5
    assert render("{{ none }}", VARS) is None
    assert render("{{ n + 1 }}", VARS) == 6
    assert render("  {{ items }}\n", VARS) == ["x", "y"]  # YAML block scalars add newlines


def test_text_renders_to_string() -> None:
    assert render("hello {{ name }}", VARS) == "hello world"
    assert render("{{ n }}{{ n }}", VARS) == "55"
    assert render("{% for i in items %}{{ i }}{% endfor %}", VARS) == "xy"


def test_nested_structures_render_every_string_but_not_keys() -> None:
    value = {"{{ name }}": ["{{ n }}", {"deep": "a-{{ name }}"}, 7, None], "t": ("{{ n }}",)}
    assert render(value, VARS) == {"{{ name }}": [5, {"deep": "a-world"}, 7, None], "t": [5]}


def test_plain_strings_come_back_untouched() -> None:
    text = "no templates here, just {braces} and % signs"
    assert render(text, VARS) is text


@given(st.text().filter(lambda s: "{{" not in s and "{%" not in s))
def test_strings_without_template_markers_are_identity(text: str) -> None:
    assert render({"k": [text]}, VARS) == {"k": [text]}


def test_undefined_is_lenient() -> None:
    assert render("{{ missing }}", VARS) is None
    assert render("a{{ missing }}b", VARS) == "ab"
    assert render("{{ missing.deeper.still }}", VARS) is None
    assert render("x{{ obj.nope.nothing }}y", VARS) == "xy"
    assert render("{{ missing | default('d') }}", VARS) == "d"
    assert render("{{ missing | tojson }}", VARS) == "null"
    assert render("{{ [missing, 1] }}", VARS) == [None, 1]


def test_filters() -> None:
    assert render("{{ obj.a | tojson }}", VARS) == '{"b": [1, 2, 3]}'
    assert render("{{ obj.a | to_json }}", VARS) == '{"b": [1, 2, 3]}'
    assert render('{{ "it\'s <x>" | tojson }}', VARS) == '"it\'s <x>"'  # not HTML-escaped
    assert render("{{ '{\"k\": 1}' | from_json }}", VARS) == {"k": 1}
    assert render("{{ '[1]' | fromjson }}", VARS) == [1]
    assert render("{{ name | b64encode }}", VARS) == "d29ybGQ="
    assert render("{{ 'd29ybGQ' | b64decode }}", VARS) == "world"  # padding optional
    assert render("{{ '42' | int + 1 }}", VARS) == 43
    assert render("{{ n | string }}", VARS) == "5"
    assert render("{{ 'a-b' | regex_replace('-', '_') }}", VARS) == "a_b"


def test_underscore_dict_keys_stay_readable() -> None:
    assert render("{{ obj._ref }}", VARS) == "nats://x"


@pytest.mark.parametrize(
    "template",
    [
        "{{ obj.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "x {{ n.__class__ }} y",
        "{{ obj['__class__'] }}",
        "{{ render.__globals__ }}",
        "{{ missing.__class__.__base__ }}",
    ],
)
def test_sandbox_escapes_are_refused(template: str) -> None:
    variables = {**VARS, "render": render}
    with pytest.raises(TemplateError, match="sandbox"):
        render(template, variables)


def test_syntax_error_names_the_template() -> None:
    with pytest.raises(TemplateError) as info:
        render({"k": "{{ obj.a "}, VARS)
    assert "{{ obj.a " in str(info.value)
    assert info.value.template == "{{ obj.a "
    assert isinstance(info.value, ToolError)


def test_errors_inside_filters_become_template_errors() -> None:
    with pytest.raises(TemplateError, match="JSONDecodeError"):
        render("{{ 'nope' | from_json }}", VARS)


def test_build_variables_adds_shims_only_when_absent() -> None:
    rc = {"message": "hi", "execution_id": "123"}
    v = build_variables(
        rc,
        execution_id=123,
        step="greet",
        command_id="c1",
        worker_id="w1",
        server_url="http://s",
        tool_kind="python",
        cursor={"frame": 2, "row": 4},
    )
    assert v["ctx"] == rc and v["workload"] == rc
    assert v["execution_id"] == "123"  # the server's own value wins
    assert (v["action"], v["node_name"], v["step"]) == ("python", "greet", "greet")
    assert (v["command_id"], v["worker_id"], v["server_url"]) == ("c1", "w1", "http://s")
    assert v["event"] == {"command_id": "c1"}
    assert (v["__cursor_frame"], v["__cursor_row"]) == (2, 4)
    assert render("{{ ctx.message }} {{ workload.message }} {{ message }}", v) == "hi hi hi"


def test_build_variables_keeps_existing_ctx_and_workload() -> None:
    rc = {"ctx": {"a": 1}, "workload": {"w": 2}, "action": "x", "event": {"name": "e"}}
    v = build_variables(
        rc,
        execution_id=1,
        step="s",
        command_id="c",
        worker_id="w",
        server_url="u",
        tool_kind="python",
    )
    assert v["ctx"] == {"a": 1} and v["workload"] == {"w": 2} and v["action"] == "x"
    assert v["event"] == {"name": "e", "command_id": "c"}
    assert "__cursor_frame" not in v
    assert rc["event"] == {"name": "e"}  # the input is not mutated
