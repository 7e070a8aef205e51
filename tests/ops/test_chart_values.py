"""The chart's values: the JSON schema Helm checks at render time, the memory plan, the image
reference and the addresses derived from one another.

Renders go through Helm's own engine (helm-python-sdk), which validates values.schema.json
itself; the schema is also checked on its own with jsonschema so a bad schema cannot pass
by accident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]


from _ops import v  # noqa: E402

SCHEMA = json.loads((v.CHART / "values.schema.json").read_text())
MI = 1024 * 1024


def refused(values: dict[str, Any]) -> str:
    helm = v.require("helm_python", "helm-python-sdk")
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as info:
        v.render(values)
    return str(info.value)


def env_values(values: dict[str, Any]) -> dict[str, str]:
    return {name: e.get("value", "") for name, e in v.env_of(v.render(values)).items()}


# ------------------------------------------------------------------- the schema itself


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    # The chart's own defaults and the shipped pool values satisfy it.
    defaults = v._yaml().safe_load((v.CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, SCHEMA)
    for pool in v.POOLS:
        jsonschema.validate(v.deep_merge(defaults, v.pool_values(pool, "StatefulSet")), SCHEMA)


GOOD = [
    {"config": {"WORKER_MAX_CONCURRENT": "1"}},
    {"config": {"WORKER_MAX_CONCURRENT": 1}},
    {"config": {"NOETL_LOG_LEVEL": "WARN"}},
    {"config": {"NOETL_LOG_LEVEL": "warning"}},
    {"config": {"NOETL_LOG_LEVEL": "Debug"}},
    {"config": {"NOETL_LOG_FORMAT": "JSON"}},
    {"config": {"NOETL_WORKER_COMMAND_TIMEOUT_SECONDS": "10m"}},
    {"config": {"NOETL_WORKER_COMMAND_TIMEOUT_SECONDS": "1h"}},
    {"config": {"WORKER_HEARTBEAT_INTERVAL": "500ms"}},
    {"config": {"WORKER_HEARTBEAT_INTERVAL": 2.5}},
    {"config": {"NOETL_SEALED_CREDENTIALS": "on"}},
    {"config": {"NOETL_SEALED_CREDENTIALS": True}},
    {"config": {"NOETL_SNOWFLAKE_NODE_ID": "1023"}},
    {"config": {"NOETL_PYTHON_MEMORY_LIMIT_MB": "0"}},
    {"config": {"NATS_URL": "nats://user:pw@nats-0:4222, nats://nats-1:4222"}},
    {"image": {"tag": "1.10"}},
    {"image": {"digest": "sha256:" + "a" * 64}},
]


@pytest.mark.parametrize("values", GOOD, ids=lambda values: json.dumps(values))
def test_schema_accepts_what_the_worker_accepts(values: dict[str, Any]) -> None:
    v.render(values)
    jsonschema.validate(values, SCHEMA)


BAD = [
    ({"config": {"WORKER_MAX_CONCURRENT": "0"}}, "/config/WORKER_MAX_CONCURRENT"),
    ({"config": {"WORKER_MAX_CONCURRENT": "4097"}}, "/config/WORKER_MAX_CONCURRENT"),
    ({"config": {"WORKER_MAX_CONCURRENT": 0}}, "/config/WORKER_MAX_CONCURRENT"),
    ({"config": {"NOETL_LOG_LEVEL": "loud"}}, "/config/NOETL_LOG_LEVEL"),
    ({"config": {"NOETL_LOG_FORMAT": "yaml"}}, "/config/NOETL_LOG_FORMAT"),
    (
        {"config": {"NOETL_WORKER_COMMAND_TIMEOUT_SECONDS": "soon"}},
        "/config/NOETL_WORKER_COMMAND_TIMEOUT_SECONDS",
    ),
    (
        {"config": {"NOETL_WORKER_COMMAND_TIMEOUT_SECONDS": "10d"}},
        "/config/NOETL_WORKER_COMMAND_TIMEOUT_SECONDS",
    ),
    ({"config": {"NOETL_PYTHON_MEMORY_LIMIT_MB": "abc"}}, "/config/NOETL_PYTHON_MEMORY_LIMIT_MB"),
    ({"config": {"NOETL_SEALED_CREDENTIALS": "maybe"}}, "/config/NOETL_SEALED_CREDENTIALS"),
    ({"config": {"NOETL_SERVER_URL": "noetl:8082"}}, "/config/NOETL_SERVER_URL"),
    ({"config": {"NATS_URL": "http://nats:4222"}}, "/config/NATS_URL"),
    ({"config": {"NATS_STREAM": "a.b"}}, "/config/NATS_STREAM"),
    ({"config": {"NOETL_SNOWFLAKE_NODE_ID": 1024}}, "/config/NOETL_SNOWFLAKE_NODE_ID"),
    ({"config": {"WORKER_MAX_CONCURENT": "2"}}, "additional properties 'WORKER_MAX_CONCURENT'"),
    ({"image": {"tag": 1.10}}, "/image/tag"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ({"keda": {"natsServerMonitoringEndpoint": "http://nats:8222"}}, "/keda/natsServerMonitoringEndpoint"),
    ({"imagee": {"tag": "1"}}, "additional properties 'imagee'"),
]


@pytest.mark.parametrize(("values", "where"), BAD, ids=lambda x: json.dumps(x) if isinstance(x, dict) else "")
def test_schema_refuses_what_the_worker_would_exit_on(values: dict[str, Any], where: str) -> None:
    message = refused(values)
    assert "values don't meet the specifications of the schema" in message
    assert where in message, message
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, SCHEMA)


def test_schema_rules_match_the_worker_config_rules() -> None:
    # What the schema accepts, the worker accepts too (and the other way round for the bad ones).
    from noetl_worker.config import Settings
    from noetl_worker.errors import ConfigError

    for values in GOOD:
        config = {
            k: str(val).lower() if isinstance(val, bool) else str(val)
            for k, val in values.get("config", {}).items()
        }
        Settings.from_env(config)
    for values, _ in BAD:
        config = values.get("config", {})
        if not config or any(name not in SCHEMA["properties"]["config"]["properties"] for name in config):
            continue
        if "NOETL_SNOWFLAKE_NODE_ID" in config or "NATS_STREAM" in config or "NATS_URL" in config:
            continue  # checked by their own config tests; the others below must exit at start
        with pytest.raises(ConfigError):
            Settings.from_env({k: str(val) for k, val in config.items()})


# ---------------------------------------------------------------------- image reference


def test_an_unquoted_version_in_a_values_file_is_refused(tmp_path: Path) -> None:
    # What a user writes: YAML reads 1.10 as the number 1.1, which would deploy the wrong image.
    values_file = tmp_path / "my-values.yaml"
    values_file.write_text("image:\n  tag: 1.10\n")
    assert "at '/image/tag': got number, want string" in refused(v.load_values(values_file))
    values_file.write_text('image:\n  tag: "1.10"\n')
    assert v.worker_container(v.render(v.load_values(values_file)))["image"] == "noetl-worker:1.10"


def test_image_tag_is_rendered_verbatim() -> None:
    assert v.worker_container(v.render({"image": {"tag": "1.10"}}))["image"] == "noetl-worker:1.10"
    assert v.worker_container(v.render({}))["image"] == "noetl-worker:0.1.0"  # appVersion
    digest = "sha256:" + "0123456789abcdef" * 4
    pinned = v.render({"image": {"repository": "reg.example/noetl-worker", "tag": "1.10", "digest": digest}})
    assert v.worker_container(pinned)["image"] == f"reg.example/noetl-worker@{digest}"


# ------------------------------------------------------------------- in-cluster defaults


def test_defaults_point_the_worker_and_keda_at_the_same_nats() -> None:
    docs = v.render({})
    env = {name: e.get("value") for name, e in v.env_of(docs).items()}
    assert env["NATS_URL"] == "nats://nats.noetl.svc:4222"
    assert env["NOETL_SERVER_URL"] == "http://noetl.noetl.svc:8082"
    trigger = v.find(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]
    assert trigger["natsServerMonitoringEndpoint"] == "nats.noetl.svc:8222"


@pytest.mark.parametrize(
    ("nats_url", "endpoint"),
    [
        ("nats://nats.prod.svc:4222", "nats.prod.svc:8222"),
        ("nats://worker:s3cret@nats-0.nats:4222,nats://nats-1.nats:4222", "nats-0.nats:8222"),
        ("tls://nats.example", "nats.example:8222"),
    ],
)
def test_keda_endpoint_follows_nats_url(nats_url: str, endpoint: str) -> None:
    docs = v.render({"config": {"NATS_URL": nats_url}})
    trigger = v.find(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]
    assert trigger["natsServerMonitoringEndpoint"] == endpoint
    assert "s3cret" not in json.dumps(trigger)
    explicit = v.render(
        {"config": {"NATS_URL": nats_url}, "keda": {"natsServerMonitoringEndpoint": "mon:9222"}}
    )
    assert (
        v.find(explicit, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"]
        == "mon:9222"
    )


# --------------------------------------------------------------------------- memory plan


def test_default_memory_plan_fits_the_default_limit() -> None:
    env = env_values({})
    cache = int(env["NOETL_IPC_CACHE_BUDGET_BYTES"])
    python_mb = int(env["NOETL_PYTHON_MEMORY_LIMIT_MB"])
    limit, reserve = 256 * MI, 96 * MI
    assert cache == (limit - reserve) * 25 // 100 // MI * MI == 40 * MI
    assert python_mb == 120
    assert reserve + cache + python_mb * MI <= limit


@pytest.mark.parametrize(("memory", "slots"), [("512Mi", "2"), ("1Gi", "4"), ("2G", "8")])
def test_derived_limits_fit_every_slot(memory: str, slots: str) -> None:
    env = env_values(
        {"config": {"WORKER_MAX_CONCURRENT": slots}, "resources": {"limits": {"memory": memory}}}
    )
    limit = {"512Mi": 512 * MI, "1Gi": 1024 * MI, "2G": 2 * 10**9}[memory]
    cache = int(env["NOETL_IPC_CACHE_BUDGET_BYTES"])
    python_mb = int(env["NOETL_PYTHON_MEMORY_LIMIT_MB"])
    assert python_mb >= 64
    assert 96 * MI + cache + python_mb * MI * int(slots) <= limit


def test_explicit_memory_settings_that_fit_are_kept() -> None:
    env = env_values(
        {
            "config": {"NOETL_IPC_CACHE_BUDGET_BYTES": "268435456", "NOETL_PYTHON_MEMORY_LIMIT_MB": "512"},
            "resources": {"limits": {"memory": "1Gi"}},
        }
    )
    assert env["NOETL_IPC_CACHE_BUDGET_BYTES"] == "268435456"
    assert env["NOETL_PYTHON_MEMORY_LIMIT_MB"] == "512"


def test_without_a_memory_limit_nothing_is_derived() -> None:
    env = env_values({"resources": {"limits": {"cpu": "500m", "memory": None}}})
    assert "NOETL_IPC_CACHE_BUDGET_BYTES" not in env and "NOETL_PYTHON_MEMORY_LIMIT_MB" not in env


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # The old defaults: a 1024 MiB python guard in a 256Mi pod never fires before the OOM killer.
        ({"config": {"NOETL_PYTHON_MEMORY_LIMIT_MB": "1024"}}, "NOETL_PYTHON_MEMORY_LIMIT_MB (1024 MiB)"),
        # A 256 MiB cache in a 256Mi pod.
        (
            {"config": {"NOETL_IPC_CACHE_BUDGET_BYTES": "268435456"}},
            "does not fit in resources.limits.memory=256Mi",
        ),
        (
            {"config": {"WORKER_MAX_CONCURRENT": "4"}},
            "leaves 30 MiB per python step with WORKER_MAX_CONCURRENT=4",
        ),
        ({"resources": {"limits": {"memory": "64Mi"}}}, "leaves nothing after memoryPlan.workerReserveMi"),
        (
            {"shm": {"enabled": True, "sizeLimit": "16Mi"}},
            "shm.sizeLimit=16Mi is smaller than the IPC cache budget",
        ),
    ],
)
def test_memory_settings_that_contradict_the_limit_fail_the_render(
    values: dict[str, Any], message: str
) -> None:
    assert message in refused(values)


def test_turning_the_python_guard_off_still_checks_the_cache() -> None:
    env = env_values({"config": {"NOETL_PYTHON_MEMORY_LIMIT_MB": "0", "WORKER_MAX_CONCURRENT": "8"}})
    assert env["NOETL_PYTHON_MEMORY_LIMIT_MB"] == "0"
    assert env["NOETL_IPC_CACHE_BUDGET_BYTES"] == str(40 * MI)
