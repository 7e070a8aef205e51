"""Results, secrets, credentials, claim-context references and cases, end to end.

Real worker tree, real nats-server, the stub control plane over real HTTP; every assertion is on
what the server received (events, result store, request log) — what a user of NoETL sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from noetl_worker.config import Settings
from noetl_worker.testing import Publisher, StubServer, StubState, open_worker, seal_credential

from .support import (
    call_done,
    failure,
    make_stub_state,
    payload,
    publish,
    request_bodies,
    run_commands,
    tool_result,
    value,
    worker_events,
)

RUST = [pytest.param({"flavor": "rust"}, id="rust")]

MakeSettings = Callable[..., Settings]
INLINE_MAX = "2048"
SHM_DIR = "/dev/shm"
PUT_ATTEMPTS = 3  # the worker's tries of a durable result PUT before it gives up
CREDENTIAL_HTTP_ATTEMPTS = 3  # the HTTP client's tries of a credential GET per lookup


@pytest.fixture
def stub_state(request: pytest.FixtureRequest) -> StubState:
    return make_stub_state(request)


def big_rows(n: int = 200) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"row {i}", "score": i * 1.5} for i in range(n)]


def shm_segments() -> set[str]:
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith("noetl_")}
    except FileNotFoundError:
        return set()


async def resolve(stub: StubServer, ref: str) -> Any:
    async with httpx.AsyncClient(base_url=stub.url) as client:
        response = await client.get("/api/result/resolve", params={"ref": ref})
    response.raise_for_status()
    return response.json()


# ---- results over the inline budget ---------------------------------------------------------


@pytest.mark.parametrize("stub_state", RUST, indirect=True)
async def test_large_result_is_stored_and_referenced_with_and_without_shared_memory(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    rows = big_rows()
    before = shm_segments()

    def large(step: str) -> Any:
        return state.enqueue_command(step=step, tool_kind="noop", tool_config={"result": {"rows": rows}})

    both_ok, durable_failed = large("both_ok"), large("durable_failed")
    shm_off_ok, nothing_stored = large("shm_off_ok"), large("nothing_stored")
    staged: list[str] = []
    with trio.fail_after(40):
        async with open_worker(make_settings(NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES=INLINE_MAX)):
            await publish(stub, publisher, both_ok)
            await state.wait_terminal([both_ok], timeout=20)
            state.inject("PUT", r"^/api/result/", 500, times=PUT_ATTEMPTS)
            await publish(stub, publisher, durable_failed)
            await state.wait_terminal([durable_failed], timeout=20)
            staged = [
                call_done(state, both_ok)["reference"]["ipc"]["shm_name"],
                call_done(state, durable_failed)["reference"]["shm_name"],
            ]
            # The segments exist while the worker that staged them runs.
            assert set(staged) <= shm_segments()
        settings = make_settings(
            NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES=INLINE_MAX, NOETL_IPC_CACHE_BUDGET_BYTES="0"
        )
        async with open_worker(settings):
            await publish(stub, publisher, shm_off_ok)
            await state.wait_terminal([shm_off_ok], timeout=20)
            state.inject("PUT", r"^/api/result/", 500, times=PUT_ATTEMPTS)
            await publish(stub, publisher, nothing_stored)
            await state.wait_terminal([nothing_stored], timeout=20)

        # durable ok, shared memory ok: a result_ref (with the same-node hint) and context._ref
        result = call_done(state, both_ok)
        reference = result["reference"]
        assert reference["kind"] == "result_ref"
        assert result["context"] == {"data": {"_ref": reference["ref"]}}
        assert reference["meta"]["bytes"] > int(INLINE_MAX)
        assert reference["uri"].endswith(f"/{both_ok.execution_id}/both_ok/0/0/1")
        assert reference["ipc"]["kind"] == "arrow_ipc"
        assert len(state.requests_to(rf"^/api/result/{both_ok.execution_id}$", "PUT")) == 1
        stored = await resolve(stub, reference["ref"])
        assert stored["status"] == "success"
        assert stored["data"] == {"rows": rows}

        # durable failed, shared memory ok: only the bare same-node hint
        result = call_done(state, durable_failed)
        assert set(result) == {"status", "reference"}
        assert result["reference"]["kind"] == "arrow_ipc"
        assert len(state.requests_to(rf"^/api/result/{durable_failed.execution_id}$", "PUT")) == PUT_ATTEMPTS

        # durable ok, shared memory off: a result_ref without a hint
        result = call_done(state, shm_off_ok)
        assert result["reference"]["kind"] == "result_ref"
        assert "ipc" not in result["reference"]
        assert (await resolve(stub, result["reference"]["ref"]))["data"] == {"rows": rows}

        # neither: the status alone, and the command still completes
        assert call_done(state, nothing_stored) == {"status": "success"}
        assert payload(state, nothing_stored, "command.completed")["status"] == "success"

    assert not set(staged) & shm_segments(), "the worker left shared-memory segments behind"
    assert not {name for name in shm_segments() - before if name in staged}


async def test_large_result_on_the_python_server_travels_as_a_reference_it_resolves(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    rows = big_rows()
    before = shm_segments()
    command = state.enqueue_command(step="big", tool_kind="noop", tool_config={"result": {"rows": rows}})
    with trio.fail_after(30):
        await run_commands(
            stub, publisher, make_settings(NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES=INLINE_MAX), [command]
        )
    result = call_done(state, command)
    # No inline `response`: the server reads the step result behind result.reference.ref.
    assert "response" not in payload(state, command, "call.done")
    assert set(result) == {"status", "reference"} and result["status"] == "COMPLETED"
    assert result["reference"]["ref"].startswith(f"noetl://execution/{command.execution_id}/")
    assert "ipc" not in result["reference"]  # the Python server cannot read shared memory
    assert shm_segments() - before == set()
    assert (await resolve(stub, result["reference"]["ref"])) == {"rows": rows}
    assert state.step_results[command.execution_id]["big"] == {"rows": rows}


# ---- scrubbing ------------------------------------------------------------------------------


async def test_secrets_never_reach_the_server(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "kc-9f8e7d6c5b4a-secret"
    monkeypatch.setenv("E2E_MOUNTED_TOKEN", secret)
    state = stub.state
    printed = state.enqueue_command(
        step="printed", tool_kind="shell", tool_config={"command": 'echo "token is $E2E_MOUNTED_TOKEN"'}
    )
    many = state.enqueue_command(
        step="many",
        tool_kind="shell",
        tool_config={"command": 'for i in $(seq 1 300); do echo "line $i $E2E_MOUNTED_TOKEN"; done'},
    )
    keys = state.enqueue_command(
        step="keys",
        tool_kind="noop",
        tool_config={"result": {"password": "hunter2-hunter2", "author": "Ada", "note": "fine"}},
    )
    crashed = state.enqueue_command(
        step="crashed", tool_kind="shell", tool_config={"command": "true", "cwd": f"/nonexistent/{secret}"}
    )
    commands = [printed, many, keys, crashed]
    settings = make_settings(
        WORKER_MAX_CONCURRENT="4",
        NOETL_KEYCHAIN_ENV_VARS="E2E_MOUNTED_TOKEN",
        NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES=INLINE_MAX,
    )
    with trio.fail_after(30):
        await run_commands(stub, publisher, settings, commands)
        stored = await resolve(stub, call_done(state, many)["reference"]["ref"])

    assert value(state, printed)["stdout"] == "token is [REDACTED]\n"
    assert stored["stdout"].startswith("line 1 [REDACTED]\nline 2 [REDACTED]\n")
    assert value(state, keys) == {"password": "[REDACTED]", "author": "Ada", "note": "fine"}
    assert "[REDACTED]" in failure(state, crashed)
    bodies = request_bodies(state)
    assert secret not in bodies
    assert "hunter2-hunter2" not in bodies


# ---- credentials ----------------------------------------------------------------------------


def bearer_call(state: StubState, stub: StubServer, step: str, alias: str) -> Any:
    return state.enqueue_command(
        step=step,
        tool_kind="http",
        tool_config={"url": f"{stub.url}/api/worker/pools", "params": {"who": step}, "auth": alias},
    )


def authorization_seen_by(state: StubState, step: str) -> list[str | None]:
    return [
        r.headers.get("authorization")
        for r in state.requests_to(r"^/api/worker/pools$")
        if r.query.get("who") == step
    ]


async def test_credential_aliases(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    token = "tok-0123456789abcdef"
    state.add_credential("api_token", "bearer", {"token": token})
    bearer = bearer_call(state, stub, "bearer", "api_token")
    unknown = bearer_call(state, stub, "unknown", "no_such_alias")
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="2"), [bearer, unknown])
        # A transient 503 on the credential endpoint is retried and the command succeeds.
        retried = bearer_call(state, stub, "retried", "api_token")
        state.inject("GET", r"^/api/credentials/api_token$", 503, times=1)
        await run_commands(stub, publisher, make_settings(), [retried])
        # An outage outlasting the HTTP client's own retries is retried by the pipeline.
        outlasted = bearer_call(state, stub, "outlasted", "api_token")
        state.inject("GET", r"^/api/credentials/api_token$", 503, times=CREDENTIAL_HTTP_ATTEMPTS)
        await run_commands(stub, publisher, make_settings(), [outlasted])

    assert value(state, bearer)["status_code"] == 200
    assert authorization_seen_by(state, "bearer") == [f"Bearer {token}"]
    error = failure(state, unknown)
    assert "no_such_alias" in error and "not found" in error
    assert authorization_seen_by(state, "unknown") == []
    assert value(state, retried)["status_code"] == 200
    assert authorization_seen_by(state, "retried") == [f"Bearer {token}"]
    assert value(state, outlasted)["status_code"] == 200
    assert authorization_seen_by(state, "outlasted") == [f"Bearer {token}"]
    answered = [r.status for r in state.requests_to(r"^/api/credentials/api_token$", "GET")]
    assert answered == [200, 503, 200, *[503] * CREDENTIAL_HTTP_ATTEMPTS, 200]
    assert token not in request_bodies(state)


@pytest.mark.parametrize("stub_state", [{"sealer": seal_credential}], indirect=True)
async def test_sealed_credential_delivery(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    state = stub.state
    token = "sealed-tok-fedcba987654"
    state.add_credential("sealed_api", "bearer", {"token": token})
    command = bearer_call(state, stub, "sealed", "sealed_api")
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(NOETL_SEALED_CREDENTIALS="true"), [command])

    assert value(state, command)["status_code"] == 200
    assert authorization_seen_by(state, "sealed") == [f"Bearer {token}"]
    (sealed,) = state.requests_to(r"^/api/credentials/sealed_api/sealed$", "GET")
    assert sealed.status == 200
    assert sealed.query["worker_id"] == state.registrations[0]["name"]
    assert state.requests_to(r"^/api/credentials/sealed_api$") == []  # never in plain text


# ---- reference envelopes in the claim context ------------------------------------------------


async def test_claim_context_over_8k_arrives_as_references_and_still_renders(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    stub.state.externalize_over = 8192
    state = stub.state
    filler = ["x" * 100] * 120  # ~12 KiB of render context
    command = state.enqueue_command(
        step="big_context",
        tool_kind="shell",
        tool_config={"command": "echo {{ workload.name }} {{ workload.filler | length }}"},
        render_context={"workload": {"name": "large", "filler": filler}},
    )
    assert command.context["render_context"]["kind"] == "result_ref"
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(), [command])

    assert value(state, command)["stdout"] == "large 120\n"
    assert len(state.requests_to(r"^/api/result/resolve$", "GET")) == 1


# ---- cases ----------------------------------------------------------------------------------


def when_exit_code(code: int) -> list[dict[str, Any]]:
    return [{"left": "result.exit_code", "op": "eq", "right": code}]


# Cases (``context.cases``) come only from the Rust server; the Python server never sends them.
@pytest.mark.parametrize("stub_state", RUST, indirect=True)
async def test_cases(stub: StubServer, publisher: Publisher, make_settings: MakeSettings) -> None:
    state = stub.state
    render_context = {"workload": {"who": "ada"}}
    exits = state.enqueue_command(
        step="exits",
        tool_kind="shell",
        tool_config={"command": "echo done"},
        render_context=render_context,
        cases=[
            {"when": when_exit_code(1), "then": {"fail": {"message": "not this one"}}},
            {
                "when": when_exit_code(0),
                "then": {"exit": {"status": "finished", "data": "{{ workload.who }}"}},
            },
        ],
    )
    sets = state.enqueue_command(
        step="sets",
        tool_kind="noop",
        tool_config={"result": {"count": 3}},
        cases=[
            {
                "when": [{"left": "result.count", "op": "gt", "right": 2}],
                "then": {"set_var": {"name": "many", "value": "yes"}},
            }
        ],
    )
    fails = state.enqueue_command(
        step="fails",
        tool_kind="shell",
        tool_config={"command": "exit 4"},
        render_context=render_context,
        cases=[{"when": when_exit_code(4), "then": {"fail": {"message": "{{ workload.who }} saw exit 4"}}}],
    )
    warns = state.enqueue_command(
        step="warns",
        tool_kind="noop",
        tool_config={},
        cases=[{"when": [{"left": "result.status", "op": "resembles", "right": "ok"}], "then": "continue"}],
    )
    commands = [exits, sets, fails, warns]
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="4"), commands)

    assert worker_events(state, exits) == ["command.started", "call.done", "step.exit", "command.completed"]
    step_exit = payload(state, exits, "step.exit")
    assert (step_exit["status"], step_exit["data"]) == ("finished", "ada")

    assert tool_result(state, sets)["data"] == {"count": 3}
    assert state.variables[str(sets.execution_id)]["many"]["value"] == "yes"

    assert worker_events(state, fails) == ["command.started", "call.done", "command.failed"]
    assert payload(state, fails, "command.failed")["error"] == "ada saw exit 4"
    assert state.command(fails).status == "FAILED"

    assert tool_result(state, warns)["status"] == "success"
    (warning,) = payload(state, warns, "command.completed")["warnings"]
    assert "cases[0].when[0].op" in warning and "resembles" in warning


async def test_auth_map_form_in_a_step_and_in_a_task_is_applied_and_scrubbed(
    stub: StubServer, publisher: Publisher, make_settings: MakeSettings
) -> None:
    """``auth: {api: {type: bearer, key: <credential>}}`` as noetl playbooks write it, in a plain
    step and inside a task sequence (resolved when the task starts); the token never reaches the
    server in an event, even when a later task's result carries it."""
    state = stub.state
    token = "tok-map-form-5e6f7a8b"
    state.add_credential("api_bearer", "bearer", {"token": token})
    url = f"{stub.url}/api/worker/pools"
    step = state.enqueue_command(
        step="step",
        tool_kind="http",
        tool_config={
            "url": url,
            "params": {"who": "step"},
            "auth": {"api": {"type": "bearer", "key": "api_bearer"}},
        },
    )
    sequence = state.enqueue_command(
        step="seq:task_sequence",
        tool_kind="task_sequence",
        tool_config={
            "tasks": [
                {
                    "name": "call",
                    "kind": "http",
                    "url": url,
                    "params": {"who": "task"},
                    "auth": {"api": {"type": "bearer", "key": "{{ workload.cred }}"}},
                },
                {"name": "leak", "kind": "noop", "result": {"echo": f"token={token}"}},
            ]
        },
        render_context={"workload": {"cred": "api_bearer"}},
    )
    with trio.fail_after(30):
        await run_commands(stub, publisher, make_settings(WORKER_MAX_CONCURRENT="2"), [step, sequence])
    assert authorization_seen_by(state, "step") == [f"Bearer {token}"]
    assert authorization_seen_by(state, "task") == [f"Bearer {token}"]
    assert value(state, step)["status_code"] == 200
    data = value(state, sequence)
    assert data["status"] == "ok"
    assert data["results"]["leak"] == {"echo": "token=[REDACTED]"}
    assert token not in request_bodies(state)
