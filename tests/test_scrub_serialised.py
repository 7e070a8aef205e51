"""``scrub_serialised`` (the large-result path) gives exactly what ``scrub`` + serialise gives."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from noetl_worker.ipc_cache import compact_json
from noetl_worker.scrub import REDACTED, Scrubber, scrub_serialised

SECRET = "s3cr3t-Value-42"
# Strings a rule acts on, and look-alikes it must leave alone.
TEXTS = [
    SECRET, f"prefix {SECRET} suffix", "Bearer abc.def", "  bAsIc dXNlcjpwYXNz", "\tbearer\tx",
    "the basic plan", "bearer", "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", "key sk-ABCDEFGHIJKLMNOP",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", "ghp_short",
    "ordinary text", "", "quote \" and \\ backslash", "ünïcödé ✓", "line\nbreak",
]  # fmt: skip
KEYS = ["id", "name", "password", "apiKey", "monkey", "tokens_used", SECRET, "author", "x_api_key"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(TEXTS), st.text(max_size=12),
)  # fmt: skip
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=40,
)
# Tabular shapes: rows of dicts with the same keys (the path that iterates in C).
tables = st.lists(
    st.fixed_dictionaries({"id": st.integers(0, 10**6), "note": scalars, "tags": trees}), max_size=8
).map(lambda rows: {"status": "success", "data": {"rows": rows}})


def check(tree: Any, secrets: list[str]) -> None:
    scrubber = Scrubber.create(secrets)
    expected = scrubber.scrub(tree)
    scrubbed, body = scrub_serialised(scrubber, tree, compact_json)
    assert scrubbed == expected
    assert body == compact_json(expected)


@settings(max_examples=400, deadline=None)
@given(tree=trees, with_secret=st.booleans())
def test_same_result_as_the_tree_scrub(tree: Any, with_secret: bool) -> None:
    check(tree, [SECRET] if with_secret else [])


@settings(max_examples=200, deadline=None)
@given(table=tables)
def test_same_result_on_tabular_results(table: Any) -> None:
    check(table, [SECRET])


def test_a_clean_result_is_shared_and_a_dirty_one_scrubbed() -> None:
    rows = [{"id": i, "note": "ordinary"} for i in range(1000)]
    clean = {"data": {"rows": rows}}
    scrubbed, body = scrub_serialised(Scrubber.create([SECRET]), clean, compact_json)
    assert scrubbed is clean and body == compact_json(clean)
    dirty = {"data": {"rows": [*rows, {"id": 1, "note": f"has {SECRET}"}]}}
    scrubbed, body = scrub_serialised(Scrubber.create([SECRET]), dirty, compact_json)
    assert scrubbed["data"]["rows"][-1]["note"] == f"has {REDACTED}"
    assert SECRET.encode() not in body
    keyed = {"data": {"rows": [*rows, {"id": 2, "db_password": "x"}]}}
    scrubbed, body = scrub_serialised(Scrubber.create(), keyed, compact_json)
    assert scrubbed["data"]["rows"][-1]["db_password"] == REDACTED and b'"x"' not in body
