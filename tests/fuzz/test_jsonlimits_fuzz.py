"""loads_bounded parses with orjson where it can: whatever it returns must be exactly what
``json.loads`` returns for the same bytes (types included: 1 is not 1.0), and whatever
``json.loads`` refuses it must refuse too."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noetl_worker.jsonlimits import JSONLimitError, loads_bounded


def typed(value: Any) -> Any:
    """A form in which equal means the same JSON value of the same Python types (NaN == NaN)."""
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else repr(value))
    if isinstance(value, bool | int | str) or value is None:
        return (type(value).__name__, value)
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    assert isinstance(value, dict)
    return ("dict", [(k, typed(v)) for k, v in value.items()])


def reference(data: bytes) -> Any:
    try:
        return typed(json.loads(data.decode("utf-8")))
    except (ValueError, RecursionError):
        return "refused"


def ours(data: bytes) -> Any:
    try:
        return typed(loads_bounded(data, max_bytes=1 << 20, max_depth=256, what="doc"))
    except JSONLimitError:
        return "refused"


scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: orjson would read those as floats
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()  # lone surrogates included: json accepts them, orjson does not
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(values, st.booleans())
def test_any_value_json_writes_reads_back_as_json_reads_it(value: Any, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert ours(data) == reference(data)


@pytest.mark.parametrize(
    "text",
    [
        "123456789012345678901234567890",  # beyond 64 bits: an int, not 1.2345678901234568e+29
        "-9999999999999999999",  # 19 digits below the signed 64-bit range
        "18446744073709551615",
        '{"id": 614025361772414082, "big": 99999999999999999999}',
        '"12345678901234567890 in a string"',
        "1e400",
        "-1e400",
        "1e-400",
        "NaN",
        "-Infinity",
        '"\\ud800"',
        '{"a": 1, "a": 2}',
        "\ufeff{}",
        "[1.5e-320, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1, -0.0]",
        '"\\u0000\\t\\n"',
        "[] []",
        "",
        " ",
        "01",
        "1.",
        "[1,]",
        '{"a":1,}',
    ],
)
def test_edge_documents_read_as_json_reads_them(text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    assert ours(data) == reference(data)


json_ish = st.text(alphabet='[]{}",:0123456789.eE+-truefalsn \\u', max_size=40).map(str.encode)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64) | json_ish)
def test_arbitrary_bytes_read_as_json_reads_them(data: bytes) -> None:
    assert ours(data) == reference(data)
