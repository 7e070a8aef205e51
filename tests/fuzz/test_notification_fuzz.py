"""Fuzzing NATS notifications: whatever arrives, the parser answers with a Notification or a
NotificationError naming why — never another exception (which would escape the intake), never
an id outside the 64-bit range, never a server_url that is not http(s)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noetl_worker.errors import NotificationError
from noetl_worker.notification import MAX_ID, Notification, parse_notification
from noetl_worker.origins import origin_of

from ..conftest import fuzz_examples

FUZZ = settings(
    max_examples=fuzz_examples(2000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values of every JSON type, with the awkward ones weighted in: Unicode digits, huge numbers,
# non-finite floats, long strings, nesting.
unicode_digits = st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=30)
huge_ints = st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**19, 10**400, -(10**4000)])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    unicode_digits,
    st.integers(min_value=0, max_value=10**25).map(str),
    st.integers(min_value=0, max_value=2**63).map(lambda n: f" {n}\t"),
    st.sampled_from(
        [
            "http://127.0.0.1:8082",
            "https://noetl.example",
            "file:///etc/passwd",
            "ftp://x",
            "http://[::1",
            "http://user:pw@host",
            "http://h:99999",
            "javascript:alert(1)",
            "http://\u0430.example",
            "",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ("execution_id", "event_id", "command_id", "step", "server_url", "execution_pool")
# Each known field present or not, with a value of any type; plus a stray key or two.
notification_like = st.fixed_dictionaries(
    {}, optional={**{f: json_values for f in FIELDS}, "trace": json_values, "x": json_values}
)


def _encode(value: Any) -> bytes:
    # allow_nan: Python's json writes NaN/Infinity; a hostile publisher can too.
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _check(data: bytes) -> Notification | None:
    try:
        note = parse_notification(data)
    except NotificationError as exc:
        assert str(exc), "a rejection names its reason"
        return None
    assert 0 <= note.execution_id <= MAX_ID and 0 <= note.event_id <= MAX_ID
    assert note.step and isinstance(note.command_id, str)
    if note.server_url:
        assert origin_of(note.server_url).startswith(("http://", "https://"))
    return note


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(notification_like)
def test_notification_shaped_objects_of_any_types(payload: dict[str, Any]) -> None:
    _check(_encode(payload))


@settings(FUZZ, max_examples=fuzz_examples(500))
@given(
    depth=st.integers(min_value=1, max_value=200_000),
    opener=st.sampled_from(["[", '{"a":']),
    where=st.sampled_from(FIELDS),
)
def test_deep_nesting_inside_a_field(depth: int, opener: str, where: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    base = {"execution_id": 1, "event_id": 2, "command_id": "c", "step": "s"}
    text = json.dumps(base)[:-1] + f', "{where}x": {nested}' + "}"
    _check(text.encode())


@FUZZ
@given(
    execution_id=st.integers(min_value=0, max_value=MAX_ID),
    event_id=st.integers(min_value=0, max_value=MAX_ID),
    as_string=st.booleans(),
    command_id=st.one_of(st.integers(min_value=0, max_value=MAX_ID), st.text(min_size=1, max_size=100)),
    step=st.text(min_size=1, max_size=100),
    server_url=st.sampled_from(["", "http://127.0.0.1:8082", "https://noetl:8443/api"]),
)
def test_valid_notifications_round_trip(
    execution_id: int, event_id: int, as_string: bool, command_id: Any, step: str, server_url: str
) -> None:
    payload = {
        "execution_id": str(execution_id) if as_string else execution_id,
        "event_id": str(event_id) if as_string else event_id,
        "command_id": command_id,
        "step": step,
        "server_url": server_url,
    }
    note = _check(_encode(payload))
    assert note is not None
    assert (note.execution_id, note.event_id) == (execution_id, event_id)
    assert note.command_id == str(command_id) and note.step == step and note.server_url == server_url


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("²", "ASCII digits"),
        ("١٢٣", "ASCII digits"),
        ("9" * 5000, "ASCII digits"),
        (2**63, "2\\*\\*63"),
        (-1, "2\\*\\*63"),
        ("-1", "ASCII digits"),
        (1.0, "ASCII digits"),
    ],
)
def test_ids_outside_ascii_digits_or_64_bits_are_refused(value: Any, why: str) -> None:
    payload = {"execution_id": 1, "event_id": value, "command_id": "c", "step": "s"}
    with pytest.raises(NotificationError, match=why):
        parse_notification(_encode(payload))


def test_a_5000_digit_json_number_is_refused_not_raised() -> None:
    data = b'{"execution_id": 1, "event_id": ' + b"9" * 5000 + b', "command_id": "c", "step": "s"}'
    with pytest.raises(NotificationError, match="not JSON"):
        parse_notification(data)


def test_json_nested_100000_deep_is_refused_before_parsing() -> None:
    data = b'{"execution_id": 1, "event_id": 2, "command_id": "c", "step": "s", "t": ' + (
        b"[" * 100_000 + b"]" * 100_000 + b"}"
    )
    with pytest.raises(NotificationError, match=r"deeper than|bytes"):
        parse_notification(data)
    shallow_but_deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(NotificationError):
        parse_notification(shallow_but_deep)


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://noetl/x", "http://[::1", "gopher://h", "http://", "http://u:p@h"],
)
def test_server_urls_that_are_not_http_urls_that_parse_are_poison(url: str) -> None:
    payload = {"execution_id": 1, "event_id": 2, "command_id": "c", "step": "s", "server_url": url}
    with pytest.raises(NotificationError, match="server_url"):
        parse_notification(_encode(payload))
