"""The stub control plane, over real HTTP (hypercorn on a free port), against upstream shapes."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from noetl_worker.testing import (
    StubCommand,
    StubServer,
    StubState,
    open_stub_server,
    seal_credential,
    serve_stub,
)

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
async def stub() -> AsyncIterator[StubServer]:
    async with open_stub_server() as server:
        yield server


@pytest.fixture
async def client(stub: StubServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stub.url, timeout=10) as http:
        yield http


def enqueue(state: StubState, **kwargs: Any) -> StubCommand:
    kwargs.setdefault("step", "fetch")
    kwargs.setdefault("tool_kind", "shell")
    kwargs.setdefault("tool_config", {"kind": "shell", "cmds": ["true"]})
    return state.enqueue_command(**kwargs)


async def claim(client: httpx.AsyncClient, cmd: StubCommand, worker: str) -> httpx.Response:
    return await client.post(f"/api/commands/{cmd.event_id}/claim", json={"worker_id": worker})


async def post_event(
    client: httpx.AsyncClient, cmd: StubCommand, name: str, payload: Any = None, **extra: Any
) -> httpx.Response:
    body = {
        "execution_id": cmd.execution_id,
        "event_type": name,
        "step": cmd.step,
        "context": {"command_id": cmd.command_id} if payload is None else payload,
        "worker_id": "w1",
        **extra,
    }
    return await client.post("/api/events", json=body)


# ---------------------------------------------------------------------- commands and claims


async def test_claim_returns_the_full_command_and_get_returns_it_without_status(
    stub: StubServer, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state, render_context={"workload": {"n": 1}}, input={"x": 2})
        assert cmd.notification() == {
            "execution_id": cmd.execution_id,
            "event_id": cmd.event_id,
            "command_id": cmd.command_id,
            "step": "fetch",
            "server_url": stub.url,
        }
        response = await claim(client, cmd, "w1")
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {
            "status",
            "event_id",
            "execution_id",
            "node_id",
            "node_name",
            "action",
            "context",
            "meta",
        }
        assert body["status"] == "ok"
        assert body["event_id"] == cmd.event_id  # > 2**53: exact integers survive
        assert body["execution_id"] == cmd.execution_id
        assert (body["node_id"], body["node_name"], body["action"]) == ("fetch", "fetch", "shell")
        assert body["context"]["tool_config"] == {"kind": "shell", "cmds": ["true"]}
        assert body["context"]["render_context"] == {"workload": {"n": 1}}
        assert body["context"]["input"] == {"x": 2}
        assert body["meta"]["command_id"] == cmd.command_id
        assert body["meta"]["execution_id"] == str(cmd.execution_id)
        got = (await client.get(f"/api/commands/{cmd.event_id}")).json()
        assert got == {k: v for k, v in body.items() if k not in ("status", "event_id")}
        assert stub.state.command(cmd.event_id).status == "CLAIMED"
        assert stub.state.event_types(cmd) == ["command.issued", "command.claimed"]


async def test_claim_arbitration_python_flavor(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        assert (await claim(client, cmd, "w1")).status_code == 200
        other = await claim(client, cmd, "w2")
        assert other.status_code == 409
        assert other.headers["retry-after"] == "2"
        assert other.json() == {
            "detail": {
                "code": "active_claim",
                "message": f"Command {cmd.event_id} is claimed by another worker",
                "worker_id": "w1",
            }
        }
        # Same worker while CLAIMED: idempotent 200, no second command.claimed event.
        assert (await claim(client, cmd, "w1")).status_code == 200
        assert stub.state.event_types(cmd).count("command.claimed") == 1
        # Same worker once RUNNING: 409 active_claim (a redelivery must not run it twice).
        assert (await post_event(client, cmd, "command.started")).status_code == 200
        running = await claim(client, cmd, "w1")
        assert running.status_code == 409
        assert running.json()["detail"]["code"] == "active_claim"
        assert running.json()["detail"]["worker_status"] == "running"
        await post_event(client, cmd, "command.completed")
        terminal = await claim(client, cmd, "w2")
        assert terminal.status_code == 409
        assert terminal.json()["detail"]["code"] == "already_terminal"
        missing = await client.post("/api/commands/12345/claim", json={"worker_id": "w1"})
        assert missing.status_code == 404
        assert missing.json() == {"detail": "command not found: 12345"}


async def test_claim_arbitration_rust_flavor() -> None:
    with trio.fail_after(10):
        async with (
            open_stub_server(StubState(flavor="rust")) as stub,
            httpx.AsyncClient(base_url=stub.url) as client,
        ):
            cmd = enqueue(stub.state)
            # The Rust server's command ids are strings "<execution>:<step>:<event>".
            assert cmd.notification()["command_id"] == (f"{cmd.execution_id}:fetch:{cmd.event_id}")
            assert (await claim(client, cmd, "w1")).status_code == 200
            other = await claim(client, cmd, "w2")
            assert other.status_code == 409
            assert other.json() == {
                "error": f"Command {cmd.event_id} already claimed by w1",
                "status": 409,
            }
            await post_event(client, cmd, "command.started")
            # No lease, no running check: the same worker gets 200 again.
            assert (await claim(client, cmd, "w1")).status_code == 200
            await post_event(client, cmd, "command.failed")
            terminal = await claim(client, cmd, "w1")
            assert terminal.status_code == 409
            assert terminal.json()["status"] == 409
            assert "terminal" in terminal.json()["error"]
            missing = await client.post("/api/commands/7/claim", json={"worker_id": "w"})
            assert missing.json() == {"error": "command not found: 7", "status": 404}


async def test_concurrent_claims_have_exactly_one_winner(stub: StubServer, client: httpx.AsyncClient) -> None:
    cmd = enqueue(stub.state)
    statuses: list[int] = []

    async def one(worker: str) -> None:
        statuses.append((await claim(client, cmd, worker)).status_code)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, f"w{i}")
    assert sorted(statuses) == [200] + [409] * 7


async def test_expired_lease_of_an_unregistered_worker_is_reclaimed() -> None:
    with trio.fail_after(10):
        state = StubState(claim_lease_seconds=0.0)
        async with (
            open_stub_server(state) as stub,
            httpx.AsyncClient(base_url=stub.url) as client,
        ):
            registered, orphan = enqueue(state), enqueue(state)
            await client.post("/api/worker/pool/register", json={"name": "alive"})
            assert (await claim(client, registered, "alive")).status_code == 200
            assert (await claim(client, orphan, "gone")).status_code == 200
            # Ready and fresh heartbeat: kept until the hard timeout.
            assert (await claim(client, registered, "thief")).status_code == 409
            # No runtime row for the holder: reclaimed with reason lease_expired.
            assert (await claim(client, orphan, "thief")).status_code == 200
            claimed = [e for e in state.events_for(orphan) if e.event_type == "command.claimed"]
            assert claimed[-1].meta["reclaimed_from_worker"] == "gone"
            assert claimed[-1].meta["reclaimed_reason"] == "lease_expired"
            assert state.command(orphan).worker_id == "thief"


async def test_claim_without_worker_id_is_422(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        response = await client.post(f"/api/commands/{cmd.event_id}/claim", json={})
        assert response.status_code == 422
        assert "worker_id" in response.json()["detail"][0]["msg"]
        bad_json = await client.post(
            f"/api/commands/{cmd.event_id}/claim",
            content=b"{nope",
            headers={"content-type": "application/json"},
        )
        assert bad_json.status_code == 422


# ---------------------------------------------------------------------- events


async def test_event_lifecycle_moves_the_command_row(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        assert stub.state.command(cmd).status == "PENDING"
        await claim(client, cmd, "w1")
        started = await post_event(client, cmd, "command.started")
        assert started.status_code == 200
        assert set(started.json()) == {"status", "event_id", "commands_generated"}
        assert started.json()["status"] == "ok"
        assert stub.state.command(cmd).status == "RUNNING"
        # The other naming style: name / payload / node_name, execution_id as a string.
        done = await client.post(
            "/api/events",
            json={
                "execution_id": str(cmd.execution_id),
                "name": "call.done",
                "node_name": cmd.step,
                "payload": {
                    "command_id": cmd.command_id,
                    "result": {"status": "success", "context": {"data": 1}},
                },
            },
        )
        assert done.status_code == 200
        await post_event(client, cmd, "command.completed")
        assert stub.state.command(cmd).status == "COMPLETED"
        # A late command.started never downgrades a completed row.
        await post_event(client, cmd, "command.started", {"command_id": cmd.command_id, "x": 1})
        assert stub.state.command(cmd).status == "COMPLETED"
        assert stub.state.event_types(cmd) == [
            "command.issued",
            "command.claimed",
            "command.started",
            "call.done",
            "command.completed",
        ]
        call_done = stub.state.events_for(cmd)[3]
        assert (call_done.step, call_done.status) == (cmd.step, "COMPLETED")


@pytest.mark.parametrize(
    "payload",
    [
        {"_internal_data": {}},
        {"result": "not an object"},
        {"result": {"status": "success", "data": {"rows": []}}},
        {"result": {"status": "success", "reference": "noetl://x"}},
        {"result": {"status": "success", "context": [1, 2]}},
        {"result": {"status": "success", "context": {"deep": {"_internal_data": 1}}}},
    ],
)
async def test_payloads_breaking_the_reference_only_contract_are_500(
    stub: StubServer, client: httpx.AsyncClient, payload: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        response = await post_event(client, cmd, "call.done", {"command_id": 1, **payload})
        assert response.status_code == 500
        assert "result" in response.text or "_internal_data" in response.text
        assert "call.done" not in stub.state.event_types(1)


async def test_allowed_result_keys_are_accepted(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        result = {
            "status": "success",
            "reference": {"kind": "result_ref"},
            "context": {"a": 1},
            "command_id": str(cmd.command_id),
        }
        response = await post_event(
            client, cmd, "call.done", {"command_id": cmd.command_id, "result": result}
        )
        assert response.status_code == 200


async def test_terminal_events_are_idempotent_per_command(
    stub: StubServer, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        first = (await post_event(client, cmd, "call.done")).json()["event_id"]
        second = (await post_event(client, cmd, "call.done")).json()["event_id"]
        assert first == second
        assert stub.state.event_types(cmd).count("call.done") == 1
        assert stub.state.duplicate_events[0]["existing_event_id"] == first
        # step.enter is not in the idempotent set: stored twice.
        await post_event(client, cmd, "step.enter")
        await post_event(client, cmd, "step.enter")
        assert stub.state.event_types(cmd).count("step.enter") == 2
        # A retried POST with the same client event_id is stored once.
        a = await post_event(client, cmd, "custom.progress", event_id=99)
        b = await post_event(client, cmd, "custom.progress", event_id=99)
        assert a.json()["event_id"] == b.json()["event_id"]
        assert stub.state.event_types(cmd).count("custom.progress") == 1


async def test_batch_is_accepted_with_202_and_idempotency_key(
    stub: StubServer, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        body = {
            "execution_id": str(cmd.execution_id),
            "worker_id": "w1",
            "events": [
                {
                    "step": cmd.step,
                    "name": "command.started",
                    "payload": {"command_id": cmd.command_id},
                },
                {
                    "node_name": cmd.step,
                    "event_type": "step.enter",
                    "context": {"command_id": cmd.command_id},
                },
            ],
        }
        first = await client.post("/api/events/batch", json=body, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202
        answer = first.json()
        assert set(answer) == {
            "status",
            "request_id",
            "event_ids",
            "commands_generated",
            "queue_depth",
            "duplicate",
            "idempotency_key",
        }
        assert answer["status"] == "accepted"
        assert answer["duplicate"] is False and answer["idempotency_key"] == "k1"
        assert len(answer["event_ids"]) == 2
        again = await client.post("/api/events/batch", json=body, headers={"X-Idempotency-Key": "k1"})
        assert again.status_code == 202
        assert again.json() == {**answer, "duplicate": True}
        assert stub.state.event_types(cmd).count("command.started") == 1
        started = stub.state.events_for(cmd)[-2]
        assert started.actionable is False  # the batch default, unlike /api/events
        assert stub.state.command(cmd).status == "RUNNING"
        status = await client.get(f"/api/events/batch/{answer['request_id']}/status")
        assert status.json()["state"] == "completed"


async def test_batch_limits_and_validation_reject_the_whole_batch(
    stub: StubServer, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        item = {"step": cmd.step, "name": "step.enter", "payload": {"command_id": cmd.command_id}}
        too_many = await client.post(
            "/api/events/batch",
            json={
                "execution_id": str(cmd.execution_id),
                "events": [item] * 257,
            },
        )
        assert too_many.status_code == 422
        bad = {
            "step": cmd.step,
            "name": "call.done",
            "payload": {"command_id": cmd.command_id, "result": {"data": 1}},
        }
        rejected = await client.post(
            "/api/events/batch",
            json={
                "execution_id": str(cmd.execution_id),
                "events": [item, bad],
            },
        )
        assert rejected.status_code == 500
        assert stub.state.event_types(cmd) == ["command.issued"]


# ---------------------------------------------------------------------- waiting


async def test_wait_terminal_wakes_on_the_terminal_event(stub: StubServer, client: httpx.AsyncClient) -> None:
    cmds = [enqueue(stub.state), enqueue(stub.state)]

    async def finish() -> None:
        for cmd in cmds:
            await post_event(client, cmd, "command.completed")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish)
            rows = await stub.state.wait_terminal(cmds, timeout=5)
        assert [row.status for row in rows] == ["COMPLETED", "COMPLETED"]
        with pytest.raises(trio.TooSlowError):
            await stub.state.wait_terminal([enqueue(stub.state)], timeout=0.05)


# ---------------------------------------------------------------------- worker pool registry


async def test_register_heartbeat_deregister_and_list(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        reg = await client.post(
            "/api/worker/pool/register",
            json={
                "name": "w1",
                "component_type": "worker_pool",
                "status": "READY",
                "runtime": {"kind": "python", "worker_public_key": "AAAA"},
                "hostname": "h",
                "labels": {"pool_name": "default"},
            },
        )
        assert reg.status_code == 200
        body = reg.json()
        assert body["status"] == "ok" and body["name"] == "w1" and body["kind"] == "worker_pool"
        assert isinstance(body["runtime_id"], str)
        assert body["runtime"] == {"kind": "python", "worker_public_key": "AAAA"}

        async def beat() -> None:
            for _ in range(3):
                answer = await client.post("/api/worker/pool/heartbeat", json={"name": "w1"})
                assert answer.json() == {
                    "status": "ok",
                    "name": "w1",
                    "runtime_id": body["runtime_id"],
                }

        async with trio.open_nursery() as nursery:
            nursery.start_soon(beat)
            times = await stub.state.wait_heartbeats("w1", 3, timeout=5)
        assert times == sorted(times) and len(times) == 3

        unknown = await client.post("/api/worker/pool/heartbeat", json={"name": "nobody"})
        assert unknown.status_code == 404
        assert unknown.json() == {"detail": {"status": "unknown", "name": "nobody"}}
        assert "retry-after" in unknown.headers

        pools = (await client.get("/api/worker/pools")).json()
        assert pools["count"] == 1
        item = pools["items"][0]
        assert set(item) == {
            "name",
            "runtime",
            "status",
            "capacity",
            "labels",
            "heartbeat",
            "created_at",
            "updated_at",
        }
        assert item["status"] == "ready"  # lower-cased on register

        gone = await client.request("DELETE", "/api/worker/pool/deregister", json={"name": "w1"})
        assert gone.json() == {"status": "ok", "name": "w1", "kind": "worker_pool"}
        assert stub.state.pools["w1"].status == "offline"
        assert (await client.post("/api/worker/pool/deregister", json={"name": "w1"})).status_code == 200
        assert stub.state.deregistrations == ["w1", "w1"]
        offline = (await client.get("/api/worker/pools", params={"status": "ready"})).json()
        assert offline["count"] == 0


# ---------------------------------------------------------------------- results and credentials


async def test_result_put_resolve_and_step_lookup(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        data = {"status": "success", "data": {"rows": [[1, "a"]] * 50}}
        put = await client.put(
            "/api/result/42",
            json={
                "name": "load",
                "data": data,
                "scope": "execution",
                "source_step": "load",
            },
        )
        assert put.status_code == 200
        ref = put.json()
        assert set(ref) == {"ref", "store", "scope", "expires_at", "bytes", "sha256"}
        assert ref["ref"].startswith("noetl://execution/42/result/load/")
        assert (ref["store"], ref["scope"]) == ("memory", "execution")
        raw = json.dumps(data, separators=(",", ":")).encode()
        assert (ref["bytes"], ref["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
        resolved = await client.get("/api/result/resolve", params={"ref": ref["ref"]})
        assert resolved.json() == data
        assert (await client.get("/api/result/42/load")).json() == data
        meta = (await client.get("/api/result/42/load", params={"resolve": "false"})).json()
        assert meta["ref"] == ref["ref"]
        unknown = await client.get("/api/result/resolve", params={"ref": "noetl://nope"})
        assert unknown.status_code == 404
        bad_scope = await client.put("/api/result/42", json={"name": "x", "data": 1, "scope": "galaxy"})
        assert bad_scope.status_code == 400


async def test_large_context_fields_arrive_as_result_refs() -> None:
    with trio.fail_after(10):
        state = StubState(externalize_over=8192)
        async with (
            open_stub_server(state) as stub,
            httpx.AsyncClient(base_url=stub.url) as client,
        ):
            big = {"blob": "x" * 9000}
            cmd = enqueue(state, render_context=big)
            body = (await claim(client, cmd, "w1")).json()
            envelope = body["context"]["render_context"]
            assert envelope["kind"] == "result_ref" and envelope["store"] == "kv"
            assert envelope["ref"].startswith(
                f"noetl://execution/{cmd.execution_id}/result/fetch_render_context/"
            )
            assert body["context"]["tool_config"] == {"kind": "shell", "cmds": ["true"]}
            resolved = await client.get("/api/result/resolve", params={"ref": envelope["ref"]})
            assert resolved.json() == big


async def test_credentials_plain_and_sealed(stub: StubServer, client: httpx.AsyncClient) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    with trio.fail_after(10):
        record = stub.state.add_credential("pg", "postgres", {"db_host": "h", "db_port": 5432})
        plain = await client.get("/api/credentials/pg", params={"include_data": "true", "execution_id": "1"})
        assert plain.json() == {
            "id": record["id"],
            "name": "pg",
            "type": "postgres",
            "data": {"db_host": "h", "db_port": 5432},
            "tags": [],
            "description": None,
        }
        assert isinstance(plain.json()["id"], str)
        by_id = (await client.get(f"/api/credentials/{record['id']}")).json()
        assert by_id["name"] == "pg" and "data" not in by_id
        assert (await client.get("/api/credentials/nope")).status_code == 404

        sealed_url = "/api/credentials/pg/sealed"
        params = {"worker_id": "w1", "execution_id": "1"}
        assert (await client.get(sealed_url, params=params)).status_code == 501
        stub.state.sealer = seal_credential
        assert (await client.get(sealed_url, params=params)).status_code == 404  # unregistered

        secret = X25519PrivateKey.generate()
        public = secret.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        await client.post(
            "/api/worker/pool/register",
            json={
                "name": "w1",
                "runtime": {"worker_public_key": base64.b64encode(public).decode()},
            },
        )
        envelope = (await client.get(sealed_url, params=params)).json()
        assert envelope["alg"] == "x25519-hkdf-sha256-chacha20-poly1305" and envelope["v"] == 1
        shared = secret.exchange(X25519PublicKey.from_public_bytes(base64.b64decode(envelope["eph_pub"])))
        okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=b"noetl-sealed-v1").derive(shared)
        opened = ChaCha20Poly1305(okm[:32]).decrypt(
            okm[32:],
            base64.b64decode(envelope["ciphertext"]),
            b"x25519-hkdf-sha256-chacha20-poly1305|v=1",
        )
        assert json.loads(opened)["data"] == {"db_host": "h", "db_port": 5432}


async def test_keychain_get_post_and_scopes(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        missing = await client.get("/api/keychain/5/token")
        assert missing.status_code == 200
        assert missing.json()["status"] == "not_found"
        stored = await client.post(
            "/api/keychain/5/token",
            json={
                "token_data": {"access_token": "t"},
                "credential_type": "oauth2",
                "scope_type": "local",
                "execution_id": "77",
            },
        )
        assert stored.json()["status"] == "success"
        assert stored.json()["cache_key"] == "token:5:77"
        assert stored.json()["ttl_seconds"] == 3600
        got = (
            await client.get("/api/keychain/5/token", params={"execution_id": "77", "scope_type": "local"})
        ).json()
        assert got["status"] == "success" and got["token_data"] == {"access_token": "t"}
        assert got["expired"] is False and got["access_count"] == 1
        assert (await client.get("/api/keychain/5/token", params={"scope_type": "global"})).json()[
            "status"
        ] == "not_found"
        assert (await client.get("/api/keychain/catalog/5")).status_code == 422


async def test_vars_roundtrip(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        assert (await client.post("/api/vars/9", json={"answer": 42})).status_code == 200
        got = (await client.get("/api/vars/9")).json()
        assert got["variables"]["answer"]["value"] == 42


async def test_execute_and_scripted_child_completion() -> None:
    with trio.fail_after(10):
        state = StubState(auto_complete_after_polls=2)
        async with (
            open_stub_server(state) as stub,
            httpx.AsyncClient(base_url=stub.url) as client,
        ):
            assert (await client.post("/api/execute", json={"payload": {}})).status_code == 422
            started = await client.post(
                "/api/execute",
                json={
                    "path": "child/playbook",
                    "workload": {"n": 1},
                    "parent_execution_id": "1",
                },
            )
            body = started.json()
            assert set(body) == {"execution_id", "status", "commands_generated"}
            assert body["status"] == "started" and isinstance(body["execution_id"], str)
            status_url = f"/api/executions/{body['execution_id']}/status"
            first = (await client.get(status_url)).json()
            assert (first["completed"], first["failed"]) == (False, False)
            second = (await client.get(status_url)).json()
            assert (second["completed"], second["failed"]) == (True, False)
            row = state.executions[int(body["execution_id"])]
            assert (row.path, row.payload, row.parent_execution_id) == (
                "child/playbook",
                {"n": 1},
                "1",
            )
            other = (await client.post("/api/execute", json={"catalog_id": 3})).json()
            state.complete_execution(other["execution_id"], failed=True)
            final = await client.get(f"/api/executions/{other['execution_id']}/status")
            assert final.json()["failed"] is True and final.json()["completed"] is True


# ---------------------------------------------------------------------- faults and the log


async def test_injected_statuses_then_normal_service(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        cmd = enqueue(stub.state)
        fault = stub.state.inject("POST", r"/claim$", 503, times=2, retry_after=1)
        for _ in range(2):
            answer = await claim(client, cmd, "w1")
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["detail"]["code"] == "pool_saturated"
        assert (await claim(client, cmd, "w1")).status_code == 200
        assert fault.hits == 2
        stub.state.inject("*", r"^/api/events$", 500, body={"detail": "boom"})
        assert (await post_event(client, cmd, "call.done")).json() == {"detail": "boom"}
        assert (await post_event(client, cmd, "call.done")).status_code == 200
        assert stub.state.requests_to(r"/claim$", "POST")[0].status == 503


async def test_injected_delay_hangs_the_request(stub: StubServer, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        stub.state.inject("GET", r"^/api/vars/", None, delay=30)
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/api/vars/1", timeout=0.2)
        assert (await client.get("/api/vars/1")).status_code == 200


async def test_request_log_records_bodies_and_authorization(
    stub: StubServer, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        await client.post("/api/vars/1", json={"a": 1}, headers={"Authorization": "Bearer s3"})
        await client.get("/api/vars/1")
        assert stub.state.authorization_headers == ["Bearer s3", None]
        first = stub.state.request_log[0]
        assert (first.method, first.path, first.body, first.status) == (
            "POST",
            "/api/vars/1",
            {"a": 1},
            200,
        )
        assert (await client.get("/api/nothing")).status_code == 404
        assert (await client.patch("/api/vars/1")).status_code == 405


async def test_serve_stub_reports_its_url_and_stops_with_a_request_in_flight() -> None:
    state = StubState()
    state.inject("GET", "/api/vars/", None, delay=60)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_stub, state)
            assert url == state.server_url and url.startswith("http://127.0.0.1:")

            async def hang() -> None:
                async with httpx.AsyncClient(base_url=url) as client:
                    with pytest.raises(httpx.HTTPError):
                        await client.get("/api/vars/1")

            nursery.start_soon(hang)
            await state.wait_for(lambda: len(state.request_log) == 1, timeout=5)
            nursery.cancel_scope.cancel()


async def test_open_stub_server_exits_promptly_with_a_hanging_request() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as outer, open_stub_server() as stub:
            stub.state.inject("GET", "/api/vars/", None, delay=60)

            async def hang() -> None:
                async with httpx.AsyncClient(base_url=stub.url) as client:
                    try:
                        await client.get("/api/vars/1")
                    except httpx.HTTPError:
                        pass

            outer.start_soon(hang)
            await stub.state.wait_for(lambda: len(stub.state.request_log) == 1, timeout=5)
            # Leaving the block stopped hypercorn within its graceful timeout (1 s) even
            # though a request was still hanging; the client sees the connection close.


async def test_heartbeat_recreates_a_lost_runtime_when_enabled() -> None:
    state = StubState(auto_recreate_runtime=True)
    with trio.fail_after(10):
        async with (
            open_stub_server(state) as stub,
            httpx.AsyncClient(base_url=stub.url) as client,
        ):
            registration = {"name": "w9", "runtime": {"kind": "python"}}
            answer = await client.post(
                "/api/worker/pool/heartbeat", json={"name": "w9", "registration": registration}
            )
            assert answer.status_code == 200
            assert answer.json()["status"] == "recreated"
            assert state.pools["w9"].status == "ready"
            assert len(state.heartbeats["w9"]) == 1


async def test_rust_flavor_faults_and_validation_use_the_error_shape() -> None:
    state = StubState(flavor="rust")
    with trio.fail_after(10):
        async with (
            open_stub_server(state) as stub,
            httpx.AsyncClient(base_url=stub.url) as client,
        ):
            state.inject("POST", "/api/events", 502)
            injected = await client.post("/api/events", json={})
            assert injected.json() == {"error": "injected fault: HTTP 502", "status": 502}
            invalid = await client.post("/api/events", json={"execution_id": 1})
            assert invalid.status_code == 422
            assert invalid.json()["status"] == 422 and "name" in invalid.json()["error"]


# ---- what the server does with the events: step results, failure, routing ----------------------


async def test_api_health_answers_as_each_server_does(stub: StubServer, client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/health")).json() == {"status": "ok"}
    async with (
        open_stub_server(StubState(flavor="rust")) as rust,
        httpx.AsyncClient(base_url=rust.url) as http,
    ):
        body = (await http.get("/api/health")).json()
    assert body["version"] and body["nats"] and body["database"] == "connected"


async def test_python_flavor_stores_the_response_and_fails_on_call_error(
    stub: StubServer, client: httpx.AsyncClient
) -> None:
    state = stub.state
    good, bad = enqueue(state, step="good"), enqueue(state, step="bad")
    cid = good.command_id
    done = {"command_id": cid, "response": {"greeting": "hi"}, "result": {"status": "COMPLETED"}}
    assert (await post_event(client, good, "call.done", done)).status_code == 200
    assert (await post_event(client, good, "command.completed", {"command_id": cid})).status_code == 200
    assert state.step_results[good.execution_id]["good"] == {"greeting": "hi"}
    assert state.execution_outcome(good.execution_id) == "COMPLETED"
    # A Rust-shaped call.done is stored as it is: templates would read {{ good.result... }}.
    rust_shaped = {"command_id": bad.command_id, "result": {"status": "error", "context": {"data": 1}}}
    await post_event(client, bad, "call.done", rust_shaped)
    assert state.step_results[bad.execution_id]["bad"] == {"status": "error", "context": {"data": 1}}
    error = {"command_id": bad.command_id, "error": "exit 7", "result": {"status": "FAILED"}}
    await post_event(client, bad, "call.error", error)
    await post_event(client, bad, "command.failed", {**error})
    assert state.executions[bad.execution_id].failure == "exit 7"
    assert state.execution_outcome(bad.execution_id) == "FAILED"


async def test_python_flavor_hydrates_a_referenced_result(
    stub: StubServer, client: httpx.AsyncClient
) -> None:
    state = stub.state
    cmd = enqueue(state)
    put = await client.put(
        f"/api/result/{cmd.execution_id}", json={"name": "fetch", "data": {"rows": [1, 2]}}
    )
    reference = {"kind": "result_ref", "ref": put.json()["ref"], "store": "memory"}
    payload = {"command_id": cmd.command_id, "result": {"status": "COMPLETED", "reference": reference}}
    assert (await post_event(client, cmd, "call.done", payload)).status_code == 200
    assert state.step_results[cmd.execution_id]["fetch"] == {"rows": [1, 2]}


async def test_rust_flavor_unwraps_context_data_and_only_command_failed_fails() -> None:
    state = StubState(flavor="rust")
    async with open_stub_server(state) as rust, httpx.AsyncClient(base_url=rust.url) as http:
        cmd = enqueue(state)
        cid = cmd.command_id
        result = {"status": "error", "context": {"status": "error", "data": {"x": 1}}}
        await post_event(http, cmd, "call.done", {"command_id": cid, "result": result})
        await post_event(http, cmd, "call.error", {"command_id": cid, "error": "ignored by this server"})
        assert state.step_results[cmd.execution_id]["fetch"] == {"x": 1}
        assert state.executions[cmd.execution_id].failure is None
        await post_event(http, cmd, "command.completed", {"command_id": cid, "status": "error"})
        assert state.execution_outcome(cmd.execution_id) == "COMPLETED"  # a tool error does not fail it


async def test_a_workflow_routes_values_and_errors_and_ends_failed_after_the_handler(
    client: httpx.AsyncClient, stub: StubServer
) -> None:
    from noetl_worker.testing import Arc, WorkflowStep

    state = stub.state
    issued: list[StubCommand] = []
    state.on_issue = issued.append
    steps = [
        WorkflowStep("start", "python", {"code": "..."}, next=(Arc("risky"),)),
        WorkflowStep(
            "risky",
            "shell",
            {"cmds": ["exit 3"]},
            input={"greeting": "{{ start.greeting }}"},
            next=(Arc("handler", on="call.error"), Arc("never", on="call.done")),
        ),
        WorkflowStep("handler", "noop"),
        WorkflowStep("never", "noop"),
    ]
    row = state.run_workflow(steps, workload={"who": "ada"}, path="demo/flow")
    (start,) = issued
    assert start.context["render_context"]["workload"] == {"who": "ada"}
    ok = {
        "command_id": start.command_id,
        "response": {"greeting": "hi ada"},
        "result": {"status": "COMPLETED"},
    }
    await post_event(client, start, "call.done", ok)
    await post_event(client, start, "command.completed", {"command_id": start.command_id})
    risky = issued[1]
    assert risky.step == "risky"
    assert risky.context["render_context"]["start"] == {"greeting": "hi ada"}  # for {{ start.greeting }}
    failed = {"command_id": risky.command_id, "error": "exit 3", "result": {"status": "FAILED"}}
    await post_event(client, risky, "call.error", failed)
    await post_event(client, risky, "command.failed", failed)
    assert [c.step for c in issued] == ["start", "risky", "handler"]
    assert state.playbook_terminal(row.execution_id) is None  # the handler is pending
    handler = issued[2]
    await post_event(client, handler, "call.done", {"command_id": handler.command_id, "response": None})
    await post_event(client, handler, "command.completed", {"command_id": handler.command_id})
    assert state.playbook_terminal(row.execution_id) == "playbook.failed"
    assert state.execution_outcome(row.execution_id) == "FAILED"
    assert row.failed_step == "risky"
