"""Database values become JSON values."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from noetl_worker.tools._jsonsafe import json_safe

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.decimals(),
    st.text(),
    st.binary(),
    st.datetimes(),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.uuids(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner) | st.tuples(inner, inner),
    max_leaves=20,
)


@given(values)
def test_any_value_serialises_as_strict_json(value: Any) -> None:
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text) == json_safe(value)


def test_known_conversions() -> None:
    assert json_safe(Decimal("12.50")) == 12.5
    assert json_safe(Decimal("10")) == 10
    assert json_safe(Decimal("NaN")) == "NaN"
    assert json_safe(dt.timedelta(minutes=1, milliseconds=500)) == 60.5
    assert json_safe(b"\x01\x02") == "AQI="
    assert json_safe(uuid.UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert json_safe({"at": dt.date(2026, 1, 2)}) == {"at": "2026-01-02"}
