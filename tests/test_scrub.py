from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noetl_worker.scrub import REDACTED, Scrubber, is_sensitive_key

SENSITIVE_KEYS = [
    "password", "db_password", "x_api_key", "Authorization", "client-secret", "apiKey",
    "accessToken", "api key", "PRIVATE_KEY", "sf_private_key_passphrase", "jwt", "oauth_token",
    "connectionString", "keychain", "tls.cert", "pwd", "dbpassword", "csrftoken", "auth",
    "credentials", "refresh_token", "APIKey", "SSHKey", "secrets",
]  # fmt: skip
SAFE_KEYS = [
    "author", "tokens_used", "monkey", "name", "key", "primary_key", "rows", "columns",
    "authority_level", "keyboard", "passenger", "certain", "tokens", "max_tokens", "id",
    "row_count", "pemberton", "secretary_name", "compwd_ratio", "status", "data",
]  # fmt: skip


@pytest.mark.parametrize("key", SENSITIVE_KEYS)
def test_sensitive_keys_redact_whole_value(key: str) -> None:
    scrubbed = Scrubber.create().scrub({key: {"nested": ["a", 1]}, "other": 1})
    assert scrubbed == {key: REDACTED, "other": 1}


@pytest.mark.parametrize("key", SAFE_KEYS)
def test_ordinary_keys_are_kept(key: str) -> None:
    assert not is_sensitive_key(key)
    value = {key: {"n": 5, "s": "hello world"}}
    assert Scrubber.create().scrub(value) == value


@pytest.mark.parametrize(
    "text",
    [
        "Bearer abcdef123456",
        "basic dXNlcjpwYXNz",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl",
    ],
)
def test_whole_string_value_rules(text: str) -> None:
    assert Scrubber.create().scrub({"value": text}) == {"value": REDACTED}


def test_embedded_tokens_replaced_rest_kept() -> None:
    scrubber = Scrubber.create()
    out = scrubber.scrub_text("calling with key=sk-ant-abcdefghijklmnop done")
    assert out == f"calling with key={REDACTED} done"
    out = scrubber.scrub_text('log: "ghp_0123456789abcdefXYZ" and AIzaSyA1234567890abc end')
    assert out == f'log: "{REDACTED}" and {REDACTED} end'
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl"
    assert scrubber.scrub_text(f"token was {jwt}.") == f"token was {REDACTED}."
    pem = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"
    assert scrubber.scrub_text(f"key:\n{pem}\nok") == f"key:\n{REDACTED}\nok"


def test_prefix_inside_a_word_is_not_a_token() -> None:
    text = "task-abcdefghijklmnop and ask-1234567890123"
    assert Scrubber.create().scrub_text(text) == text


def test_known_secret_values_replaced_in_strings_and_keys() -> None:
    scrubber = Scrubber.create(["hunter22", "abc"])  # "abc" is too short to scrub
    out = scrubber.scrub({"msg": "pw is hunter22!", "hunter22_count": 3, "abc": "abc"})
    assert out == {"msg": f"pw is {REDACTED}!", f"{REDACTED}_count": 3, "abc": "abc"}


def test_longer_secret_wins_over_contained_shorter_one() -> None:
    scrubber = Scrubber.create(["abcd", "xxabcdxx"])
    assert scrubber.scrub_text("1xxabcdxx2 abcd") == f"1{REDACTED}2 {REDACTED}"


def test_numbers_and_ids_untouched() -> None:
    value = {"id": 614025361772412928, "ratio": 0.5, "ok": True, "none": None, "s": "1234"}
    assert Scrubber.create(["1234"]).scrub(value) == {**value, "s": REDACTED}


def test_input_is_not_mutated() -> None:
    value: dict[str, Any] = {"password": "x", "list": [{"token": 1}]}
    Scrubber.create().scrub(value)
    assert value == {"password": "x", "list": [{"token": 1}]}


# --- properties -------------------------------------------------------------------------

SAFE_WORDS = ["author", "tokens_used", "monkey", "rows", "name", "value", "count", "step", "id"]
safe_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ", max_size=30).filter(
    lambda s: not s.strip().lower().startswith(("bearer ", "basic "))
)
# random keys may spell a vocabulary word ("decryptkey"): those are meant to be redacted
safe_keys = safe_text.filter(lambda k: not is_sensitive_key(k))
safe_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | safe_text
safe_trees = st.recursive(
    safe_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(SAFE_WORDS) | safe_keys, children, max_size=4)
    ),
    max_leaves=20,
)


@given(safe_trees)
@settings(max_examples=200)
def test_ordinary_data_never_altered(tree: Any) -> None:
    assert Scrubber.create(["canary-secret-value"]).scrub(tree) == tree


CANARY = "Zq9canaryX7w"


@st.composite
def trees_with_canary(draw: st.DrawFn) -> Any:
    """A random tree with the canary planted somewhere: a value, a key, or inside a string."""
    tree = draw(safe_trees)
    prefix, suffix = draw(safe_text), draw(safe_text)
    planted = prefix + CANARY + suffix
    where = draw(st.sampled_from(["value", "key", "list"]))
    depth = draw(st.integers(0, 3))
    node: Any = {"key": planted} if where == "key" else planted
    if where == "key":
        node = {planted: draw(safe_scalars)}
    elif where == "list":
        node = [draw(safe_scalars), planted]
    for _ in range(depth):
        node = {draw(st.sampled_from(SAFE_WORDS)): node, "sibling": tree}
    return [tree, node]


@given(trees_with_canary())
@settings(max_examples=300)
def test_canary_secret_never_survives(tree: Any) -> None:
    dumped = json.dumps(Scrubber.create([CANARY]).scrub(tree))
    assert CANARY not in dumped


def test_clean_subtrees_are_shared_not_copied() -> None:
    clean = {"rows": [{"id": 1, "name": "a"}] * 3}
    value = {"data": clean, "dirty": {"password": "x"}}
    out = Scrubber.create().scrub(value)
    assert out["data"] is clean and out["dirty"] == {"password": REDACTED}
    assert value["dirty"] == {"password": "x"}
