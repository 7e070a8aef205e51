from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from noetl_worker.credentials import (
    ResolvedConfig,
    keychain_env_secrets,
    resolve_credentials,
    resolve_keychain_refs,
)
from noetl_worker.errors import CredentialError, HTTPStatusError, ToolError, TransportError
from noetl_worker.sealed import SealingKey, seal

from .fake_server_api import FakeServer


def credential(kind: str, **data: Any) -> dict[str, Any]:
    return {"id": "1", "name": "c", "type": kind, "data": data, "tags": []}


async def resolve(
    config: dict[str, Any],
    server: FakeServer,
    *,
    attempts: int = 0,
    sealing: SealingKey | None = None,
    worker_id: str = "w-1",
) -> ResolvedConfig:
    with trio.fail_after(5):
        return await resolve_credentials(
            config,
            server=server,
            execution_id=42,
            attempts=attempts,
            sealing=sealing,
            worker_id=worker_id,
        )


async def test_postgres_fields_mapped_without_overwriting() -> None:
    server = FakeServer(
        {
            ("GET", "/api/credentials/pg"): credential(
                "Postgres", db_host="db", db_port="5433", db_user="u", db_password="pw", db_name="d"
            )
        }
    )
    out = await resolve({"kind": "postgres", "auth": "pg", "database": "mine"}, server)
    assert out.config == {
        "kind": "postgres", "host": "db", "port": 5433, "user": "u", "password": "pw",
        "database": "mine",
    }  # fmt: skip
    assert out.secrets == {"pg.password": "pw"}
    assert server.calls[0].params == {"include_data": "true", "execution_id": 42}


async def test_bad_port_is_terminal() -> None:
    server = FakeServer({("GET", "/api/credentials/pg"): credential("postgres", port="x")})
    with pytest.raises(CredentialError, match="port must be an integer") as info:
        await resolve({"credential": "pg"}, server)
    assert not info.value.retryable and isinstance(info.value, ToolError)


@pytest.mark.parametrize(
    ("kind", "data", "auth", "secret"),
    [
        ("bearer", {"access_token": "tok123"}, {"type": "bearer", "credential": "a"}, "tok123"),
        (
            "api_key",
            {"key": "k-123"},
            {"type": "api_key", "credential": "a", "header": "X-API-Key"},
            "k-123",
        ),
        (
            "basic",
            {"user": "bob", "password": "pw1"},
            {"type": "basic", "credential": "a", "username": "bob"},
            "pw1",
        ),
    ],
)
async def test_http_auth_types(kind: str, data: dict[str, Any], auth: dict[str, Any], secret: str) -> None:
    server = FakeServer({("GET", "/api/credentials/a"): credential(kind, **data)})
    out = await resolve({"kind": "http", "auth": "a", "credential": "other"}, server)
    assert out.config == {"kind": "http", "auth": auth}
    assert out.secrets == {"a": secret}


async def test_auth_string_wins_over_credential() -> None:
    server = FakeServer({("GET", "/api/credentials/first"): credential("bearer", token="t")})
    await resolve({"auth": "first", "credential": "second"}, server)
    assert [c.path for c in server.calls] == ["/api/credentials/first"]


async def test_object_auth_is_left_alone() -> None:
    server = FakeServer()
    config = {"kind": "http", "auth": {"type": "bearer", "token": "x"}}
    assert (await resolve(config, server)).config == config
    assert server.calls == []


async def test_snowflake_and_messaging() -> None:
    server = FakeServer(
        {
            ("GET", "/api/credentials/sf"): credential(
                "snowflake", sf_account="acc", sf_password="pw", role="r"
            ),
            ("GET", "/api/credentials/n"): credential(
                "nats", nats_url="nats://h", nats_username="u", nats_token="tk", bucket="b"
            ),
        }
    )
    sf = await resolve({"credential": "sf", "role": "mine"}, server)
    assert sf.config == {"account": "acc", "password": "pw", "role": "mine"}
    assert sf.secrets == {"sf.password": "pw"}
    nats = await resolve({"credential": "n"}, server)
    assert nats.config == {
        "url": "nats://h", "user": "u", "token": "tk", "nats_url": "nats://h",
        "nats_username": "u", "nats_token": "tk", "bucket": "b",
    }  # fmt: skip
    assert nats.secrets == {"n.token": "tk"}


async def test_unsupported_type_names_supported_ones() -> None:
    server = FakeServer({("GET", "/api/credentials/g"): credential("gcp_adc")})
    with pytest.raises(CredentialError, match=r"unsupported type 'gcp_adc'.*postgres"):
        await resolve({"credential": "g"}, server)


@pytest.mark.parametrize(
    ("error", "attempts", "retryable"),
    [
        (HTTPStatusError(404, "no"), 0, False),
        (HTTPStatusError(500, "Decryption failed"), 0, False),
        (HTTPStatusError(503, "busy"), 0, True),
        (HTTPStatusError(429, "slow down"), 2, True),
        (HTTPStatusError(503, "busy"), 3, False),
        (TransportError("refused"), 1, True),
        (TransportError("refused"), 3, False),
        (HTTPStatusError(403, "forbidden"), 0, False),
    ],
)
async def test_failure_classification(error: Exception, attempts: int, retryable: bool) -> None:
    server = FakeServer({("GET", "/api/credentials/x"): error})
    with pytest.raises(CredentialError) as info:
        await resolve({"auth": "x"}, server, attempts=attempts)
    assert info.value.retryable is retryable
    assert "'x'" in str(info.value)


async def test_task_sequence_and_transfer_resolve_each_part() -> None:
    server = FakeServer(
        {
            ("GET", "/api/credentials/pg"): credential("postgres", host="h"),
            ("GET", "/api/credentials/tok"): credential("bearer", token="t0k3n"),
        }
    )
    tasks = {
        "kind": "task_sequence",
        "tool_config": [
            {"a": {"kind": "postgres", "auth": "pg"}},
            {"b": {"kind": "http", "auth": "tok"}},
        ],
    }
    out = await resolve(tasks, server)
    assert out.config["tool_config"][0] == {"a": {"kind": "postgres", "host": "h"}}
    assert out.config["tool_config"][1]["b"]["auth"]["type"] == "bearer"
    assert out.secrets == {"tok": "t0k3n"}
    transfer = {"kind": "transfer", "source": {"credential": "pg"}, "target": {"auth": "pg"}}
    moved = await resolve(transfer, server)
    assert moved.config["source"] == moved.config["target"] == {"host": "h"}


async def test_sealed_fetch() -> None:
    key = SealingKey.generate()
    plaintext = json.dumps(credential("bearer", token="sealed-tok")).encode()
    server = FakeServer({("GET", "/api/credentials/s/sealed"): seal(key.public_key_b64(), plaintext)})
    out = await resolve({"auth": "s"}, server, sealing=key)
    assert out.secrets == {"s": "sealed-tok"}
    assert server.calls[0].params == {"worker_id": "w-1", "execution_id": 42}
    wrong = SealingKey.generate()
    with pytest.raises(CredentialError, match="authentication") as info:
        await resolve({"auth": "s"}, server, sealing=wrong)
    assert not info.value.retryable


async def test_sealed_without_worker_id_falls_back_to_plain() -> None:
    server = FakeServer({("GET", "/api/credentials/s"): credential("bearer", token="t")})
    await resolve({"auth": "s"}, server, sealing=SealingKey.generate(), worker_id="")
    assert server.calls[0].path == "/api/credentials/s"


def test_keychain_env_secrets() -> None:
    env = {"A": "1", "B": "  ", "C": "3"}
    assert keychain_env_secrets(["A", "B", "MISSING", "C"], env) == {"A": "1", "C": "3"}


async def test_keychain_refs() -> None:
    entry = {"status": "success", "token_data": {"access_token": "kc-secret", "port": 5}}
    server = FakeServer({("GET", "/api/keychain/cat1/api"): entry})
    obj = {
        "headers": {"Authorization": "Bearer {{ keychain.api.access_token }}"},
        "port": "{{keychain.api.port}}",
        "other": ["{{ workload.x }}"],
    }
    with trio.fail_after(5):
        out, used = await resolve_keychain_refs(obj, server=server, catalog_id="cat1", execution_id=9)
    assert out == {
        "headers": {"Authorization": "Bearer kc-secret"},
        "port": 5,
        "other": ["{{ workload.x }}"],
    }
    assert used == {"keychain.api.access_token": "kc-secret"}
    assert len(server.calls) == 1 and server.calls[0].params == {"execution_id": 9}


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"status": "not_found"}, "is not_found"),
        ({"status": "success", "token_data": {"a": 1}}, "no field 'token'.*available fields are a"),
    ],
)
async def test_keychain_ref_failures(answer: dict[str, Any], message: str) -> None:
    server = FakeServer({("GET", "/api/keychain/c/k"): answer})
    with trio.fail_after(5), pytest.raises(CredentialError, match=message):
        await resolve_keychain_refs("{{ keychain.k.token }}", server=server, catalog_id="c", execution_id=1)


async def test_keychain_ref_without_catalog() -> None:
    with pytest.raises(CredentialError, match="catalog_id"):
        await resolve_keychain_refs(
            "{{ keychain.k.t }}", server=FakeServer(), catalog_id=None, execution_id=1
        )
    assert await resolve_keychain_refs({"a": 1}, server=FakeServer(), catalog_id=None, execution_id=1) == (
        {"a": 1},
        {},
    )


async def test_auth_map_form_merges_each_credential_into_its_entry() -> None:
    """noetl's ``auth: {<alias>: {type, key: <credential>}}``: the entry gets the credential's
    fields (what the playbook wrote wins), ``key`` becomes ``credential``, secrets are kept."""
    server = FakeServer(
        {
            ("GET", "/api/credentials/api_token"): credential("bearer", token="tok-9"),
            ("GET", "/api/credentials/svc"): credential("api_key", api_key="k-1", header_name="X-K"),
        }
    )
    config = {
        "kind": "http",
        "auth": {
            "api": {"type": "bearer", "key": "api_token"},
            "other": {"type": "api_key", "key": "svc", "header_name": "X-Mine"},
        },
    }
    out = await resolve(config, server)
    assert out.config["auth"] == {
        "api": {"type": "bearer", "token": "tok-9", "credential": "api_token"},
        "other": {"type": "api_key", "api_key": "k-1", "header_name": "X-Mine", "credential": "svc"},
    }
    assert out.secrets == {"api_token.token": "tok-9", "svc.api_key": "k-1"}
    again = await resolve(out.config, server)  # resolving twice fetches nothing more
    assert again.config == out.config and len(server.calls) == 2


async def test_auth_map_postgres_entry_supplies_the_connection() -> None:
    server = FakeServer(
        {
            ("GET", "/api/credentials/pg"): credential(
                "postgres", db_host="db", db_port="5432", db_user="u", db_password="pw", db_name="d"
            )
        }
    )
    out = await resolve({"kind": "postgres", "auth": {"main": {"type": "postgres", "key": "pg"}}}, server)
    assert (out.config["host"], out.config["port"], out.config["database"]) == ("db", 5432, "d")
    assert out.secrets["pg.password"] == "pw" and out.secrets["pg.db_password"] == "pw"
    flat = await resolve({"kind": "postgres", "auth": {"type": "postgres", "key": "pg"}}, server)
    assert flat.config["user"] == "u"
