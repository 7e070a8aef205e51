"""The SQL lexer: statement splitting and parameter-marker rewriting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from noetl_worker.tools import _sql

# Pieces that may follow each other in any order without forming a new construct: code pieces
# end in a space, line comments end in a newline, and several pieces hide a ';'.
PIECES = [
    "x = 1 ",
    "a.b ",
    "'it''s; fine' ",
    "E'back\\'slash; still' ",
    "e'\\\\' ",
    '"odd;""name" ',
    "-- comment; with ' and \" and $$\n",
    "/* block; /* nested; */ still; */ ",
    "$$ body; with 'quotes' $$ ",
    "$fn$ inner $$ ; $x$ text $fn$ ",
    "$1 ",
    "U&'d\\0061t;a' ",
    "f(';') ",
]


@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=6), min_size=1, max_size=5))
def test_split_returns_the_statements_that_were_joined(bodies: list[list[str]]) -> None:
    statements = ["SELECT " + "".join(body) for body in bodies]
    script = ";\n".join(statements) + ";"
    assert _sql.split_statements(script) == [s.strip() for s in statements]


@given(st.text(max_size=200))
def test_segments_reassemble_any_text(text: str) -> None:
    assert "".join(piece for _, piece in _sql.segments(text)) == text


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("select 1; select 2", ["select 1", "select 2"]),
        ("select 1;;  ; select 2;", ["select 1", "select 2"]),
        ("select 1; -- trailing comment only", ["select 1"]),
        ("select 1; /* only a comment */ ;", ["select 1"]),
        ("select 'unterminated; still string", ["select 'unterminated; still string"]),
        ("select $$unterminated; body", ["select $$unterminated; body"]),
        ("select a$b$c; select 2", ["select a$b$c", "select 2"]),
        ("select $1; select $2", ["select $1", "select $2"]),
        (
            "create function f() returns int as $body$ begin return 1; end $body$ language plpgsql;"
            " select f()",
            [
                "create function f() returns int as $body$ begin return 1; end $body$ language plpgsql",
                "select f()",
            ],
        ),
        ("select 'a\\'; select 2", ["select 'a\\'", "select 2"]),  # standard strings: no escape
        ("select E'a\\'; b'; select 2", ["select E'a\\'; b'", "select 2"]),
        ("", []),
    ],
)
def test_split_edge_cases(script: str, expected: list[str]) -> None:
    assert _sql.split_statements(script) == expected


def test_numbered_markers_become_pyformat_in_marker_order() -> None:
    statement = "select $2, '$1 %', $1, $2 -- $3\n where x like 'a%'"
    rewritten = _sql.numbered_to_pyformat(statement, ["one", "two"])
    assert rewritten == (
        "select %s, '$1 %%', %s, %s -- $3\n where x like 'a%%'",
        ["two", "one", "two"],
    )


def test_numbered_markers_absent_or_out_of_range() -> None:
    assert _sql.numbered_to_pyformat("select %s", [1]) is None
    with pytest.raises(IndexError, match=r"\$3"):
        _sql.numbered_to_pyformat("select $3", [1])


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("select $1", True),
        ("select %s", True),
        ("select %(name)s", True),
        ("select ?", True),
        ("select $name", True),
        ("select '$1 ? %s'", False),
        ("select 1 -- $1", False),
        ("select $$ ? $$", False),
    ],
)
def test_has_markers_ignores_quoted_text(statement: str, expected: bool) -> None:
    assert _sql.has_markers(statement) is expected
