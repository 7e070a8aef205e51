from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noetl_worker.scrub import MIN_SECRET_LENGTH, REDACTED, Scrubber, is_sensitive_key

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


# --- encoded forms, the worker's own key, the log filter ---------------------------------------

printable_secrets = st.text(
    st.characters(min_codepoint=33, max_codepoint=126), min_size=MIN_SECRET_LENGTH + 4, max_size=40
)


@given(printable_secrets, st.binary(max_size=7), st.binary(max_size=7))
@settings(max_examples=300)
def test_encoded_forms_are_scrubbed(secret: str, before: bytes, after: bytes) -> None:
    scrubber = Scrubber.create([secret])
    raw = before + secret.encode() + after
    # Base64 of a text containing the secret at any offset: nothing decodable to it is left.
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        scrubbed = scrubber.scrub_text(f"seen: {encode(raw).decode()} end")
        for token in re.findall(r"[A-Za-z0-9+/_-]+", scrubbed):
            for shift in range(4):
                piece = token[shift:]
                piece = piece[: len(piece) - len(piece) % 4]
                try:
                    decoded = base64.b64decode(piece.replace("-", "+").replace("_", "/"))
                except (ValueError, binascii.Error):
                    continue
                assert secret.encode() not in decoded
    lower_hex = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(secret, safe=""))
    for encoded in (
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        lower_hex,
        json.dumps(secret)[1:-1],
    ):
        assert encoded not in scrubber.scrub_text(f"seen: {encoded} end")


def test_basic_header_password_is_scrubbed() -> None:
    header = "Basic " + base64.b64encode(b"ada:pw-0123456789").decode()
    assert "cHctMDEyMzQ1Njc4OQ" not in Scrubber.create(["pw-0123456789"]).scrub_text(f"auth was {header} !")
    assert Scrubber.create(["pw-0123456789"]).scrub_text(f"x {header} y").count(REDACTED) == 1


def test_sealing_key_material_is_scrubbed() -> None:
    from noetl_worker.config import Settings
    from noetl_worker.pipeline import worker_scrubber
    from noetl_worker.sealed import SealingKey

    key = SealingKey.generate()
    raw = key.secret_bytes()
    settings = Settings.from_env(
        {"NATS_URL": "nats://u:nats-pw-1234@h:4222", "NOETL_INTERNAL_API_TOKEN": "tok-5678"}
    )
    scrubber = worker_scrubber(settings, {"MOUNTED": "mounted-9012"}, key)
    for leak in (base64.b64encode(raw).decode(), raw.hex(), "nats-pw-1234", "tok-5678", "mounted-9012"):
        assert leak not in scrubber.scrub_text(f"leaked {leak} here")


def test_log_lines_are_scrubbed_including_tracebacks_and_fields() -> None:
    import io
    import logging

    from noetl_worker import logs, scrub

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ScrubFilter())
    logger = logging.getLogger("scrub-test")
    logger.addHandler(handler)
    logger.propagate = False
    previous = scrub.active()
    scrub.set_process_scrubber(Scrubber.create(["proc-secret-1"]))
    try:
        scrub.set_command_scrubber(Scrubber.create(["cmd-secret-2", "proc-secret-1"]))
        try:
            raise ValueError("boom cmd-secret-2")
        except ValueError:
            logger.exception("failed with %s", "proc-secret-1", extra={"detail": "cmd-secret-2"})
    finally:
        scrub.set_process_scrubber(previous)
        scrub._command.set(None)
        logger.removeHandler(handler)
    out = buffer.getvalue()
    assert "boom" in out and "[REDACTED]" in out
    assert "cmd-secret-2" not in out and "proc-secret-1" not in out
