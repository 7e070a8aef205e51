from __future__ import annotations

import subprocess

import pytest

from noetl_worker.config import Settings, pool_segment
from noetl_worker.errors import ConfigError

from .conftest import PYTHON, subprocess_env


def test_defaults_match_the_deployment_specification() -> None:
    s = Settings.from_env({})
    assert s.pool_name == "default"
    assert s.heartbeat_interval == 10
    assert s.max_concurrent == 1
    assert str(s.metrics_bind) == "0.0.0.0:9090"
    assert s.lag_poll_interval == 5
    assert s.nats.url == "nats://localhost:4222"
    assert (s.stream, s.consumer, s.subject) == ("noetl_commands", "worker-pool", "noetl.commands")
    assert s.snowflake_epoch_ms == 1_704_067_200_000
    assert s.ipc_cache_budget_bytes == 268_435_456
    assert s.command_timeout == 180
    assert s.shutdown_grace < 30  # fits Kubernetes' default terminationGracePeriodSeconds
    assert len(s.worker_id) == 36  # uuid4
    assert Settings.from_env({}).worker_id != s.worker_id


@pytest.mark.parametrize(
    ("pool", "filters", "segment"),
    [
        ("default", ("noetl.commands", "noetl.commands.>"), None),
        ("system", ("noetl.commands.system.>",), "system"),
        ("shared", ("noetl.commands.shared.>",), "shared"),
        ("gpu", ("noetl.commands.gpu.>",), "gpu"),
    ],
)
def test_filter_subject_is_derived_from_the_pool(
    pool: str, filters: tuple[str, ...], segment: str | None
) -> None:
    s = Settings.from_env({"WORKER_POOL_NAME": pool})
    assert s.filter_subjects == filters
    assert s.pool_segment == segment


def test_explicit_filter_subject_wins() -> None:
    s = Settings.from_env({"WORKER_POOL_NAME": "system", "NATS_FILTER_SUBJECT": "noetl.commands.python.>"})
    assert s.filter_subjects == ("noetl.commands.python.>",)
    assert s.pool_segment == "python"
    assert pool_segment(("noetl.commands.>",)) is None


def test_nats_credentials_from_url_and_env() -> None:
    s = Settings.from_env({"NATS_URL": "nats://noetl:p%40ss@nats.svc:4222"})
    assert (s.nats.url, s.nats.user, s.nats.password) == ("nats://nats.svc:4222", "noetl", "p@ss")
    s = Settings.from_env({"NATS_URL": "nats://a:b@h:1", "NATS_USER": "u", "NATS_PASSWORD": "pw"})
    assert (s.nats.user, s.nats.password) == ("u", "pw")
    assert "pw" not in repr(s) and "p@ss" not in repr(Settings.from_env({"NATS_URL": "nats://n:p%40ss@h:1"}))


def test_server_url_trailing_api_is_tolerated() -> None:
    assert Settings.from_env({"NOETL_SERVER_URL": "http://noetl:8082/api/"}).server_url == "http://noetl:8082"


def test_rust_log_is_honoured_as_an_alias() -> None:
    assert Settings.from_env({"RUST_LOG": "info,noetl_worker=debug"}).log_level == "debug"
    assert Settings.from_env({"RUST_LOG": "warn,hyper=debug"}).log_level == "warning"
    assert Settings.from_env({"RUST_LOG": "debug", "NOETL_LOG_LEVEL": "error"}).log_level == "error"


def test_snowflake_node_id_offset_separates_pools() -> None:
    assert (
        Settings.from_env(
            {"NOETL_SNOWFLAKE_NODE_ID": "3", "NOETL_SNOWFLAKE_NODE_ID_OFFSET": "512"}
        ).snowflake_node_id
        == 515
    )
    with pytest.raises(ConfigError, match="NOETL_SNOWFLAKE_NODE_ID_OFFSET=512"):
        Settings.from_env({"NOETL_SNOWFLAKE_NODE_ID": "600", "NOETL_SNOWFLAKE_NODE_ID_OFFSET": "512"})


def test_snowflake_node_id_chain() -> None:
    assert Settings.from_env({"NOETL_SNOWFLAKE_NODE_ID": "7", "NOETL_SHARD_ID": "9"}).snowflake_node_id == 7
    assert Settings.from_env({"NOETL_SHARD_ID": "9"}).snowflake_node_id == 9
    a = Settings.from_env({"NODE_NAME": "node-1", "WORKER_ID": "w-1"})
    b = Settings.from_env({"NODE_NAME": "node-1", "WORKER_ID": "w-2"})
    assert a.snowflake_node_source == "fnv1a(NODE_NAME)"
    # Pods on one Kubernetes node share NODE_NAME; the worker id keeps their ids apart.
    assert a.snowflake_node_id != b.snowflake_node_id
    assert (
        a.snowflake_node_id
        == Settings.from_env({"NODE_NAME": "node-1", "WORKER_ID": "w-1"}).snowflake_node_id
    )


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("WORKER_MAX_CONCURRENT", "0", "integer >= 1"),
        ("WORKER_MAX_CONCURRENT", "four", "integer >= 1"),
        ("WORKER_HEARTBEAT_INTERVAL", "0", "seconds > 0"),
        ("WORKER_HEARTBEAT_INTERVAL", "-5", "seconds > 0"),
        ("WORKER_NATS_LAG_POLL_INTERVAL", "soon", "seconds"),
        ("WORKER_METRICS_BIND", "9090", "host:port"),
        ("WORKER_METRICS_BIND", "0.0.0.0:99999", "host:port"),
        ("NOETL_SERVER_URL", "noetl:8082", "http:// or https://"),
        ("NATS_URL", "http://nats:4222", "nats://"),
        ("NOETL_SNOWFLAKE_NODE_ID", "1024", "<= 1023"),
        ("NOETL_SHARD_ID", "-1", ">= 0"),
        ("NOETL_LOG_LEVEL", "loud", "one of debug"),
        ("NOETL_SEALED_CREDENTIALS", "maybe", "one of 1, true"),
        ("NATS_STREAM", "a.b", "JetStream name"),
    ],
)
def test_invalid_values_name_the_variable_and_what_is_accepted(
    variable: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    message = str(info.value)
    assert variable in message and fragment in message


def test_a_config_error_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "noetl_worker"],
        env=subprocess_env(WORKER_MAX_CONCURRENT="0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "WORKER_MAX_CONCURRENT='0'" in lines[0] and "integer >= 1" in lines[0]


def test_config_command_masks_secrets() -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "noetl_worker", "config"],
        env=subprocess_env(NATS_URL="nats://u:hunter2@h:4222", NOETL_INTERNAL_API_TOKEN="tok-secret-1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and "tok-secret-1" not in proc.stdout
    assert '"NATS_PASSWORD": "***"' in proc.stdout
