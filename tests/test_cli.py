"""The command line: help that lists the settings, `config --describe`, `config` showing every
variable, start-time validation (exit 2) and the version in the start-up log line."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from noetl_worker import __version__, cli
from noetl_worker._config_table import ROWS

from .conftest import PYTHON, subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "noetl_worker", *args],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def doc_rows() -> list[tuple[str, str, str, str, str]]:
    """The rows scripts/config-table reads from docs/configuration.md."""
    loader = importlib.machinery.SourceFileLoader(
        "config_table_script", str(ROOT / "scripts" / "config-table")
    )
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return list(module.rows((ROOT / "docs" / "configuration.md").read_text()))


def test_embedded_table_matches_docs_configuration_md() -> None:
    assert list(ROWS) == doc_rows(), "docs/configuration.md changed: run scripts/config-table"
    assert len(ROWS) >= 30


def test_run_help_lists_every_setting_and_points_at_describe() -> None:
    result = run_cli("run", "--help")
    assert result.returncode == 0
    for _, name, *_ in ROWS:
        assert re.search(rf"\b{name}\b", result.stdout), name
    assert "noetl-worker config --describe" in result.stdout


def test_top_level_help_points_at_describe() -> None:
    result = run_cli("--help")
    assert "config --describe" in result.stdout


def test_config_describe_prints_the_table_without_reading_the_environment() -> None:
    # Works with a broken environment too: it describes, it does not load.
    result = run_cli("config", "--describe", WORKER_MAX_CONCURRENT="0")
    assert result.returncode == 0, result.stderr
    for _, name, default, accepted, _ in ROWS:
        assert f"\n{name}\n    default:  {default}\n    accepted: {accepted}\n" in "\n" + result.stdout, name
    assert "WORKER_MAX_CONCURRENT\n    default:  1\n    accepted: integer 1\u20134096" in result.stdout
    assert "\n== NATS JetStream\n" in result.stdout


def test_describe_does_not_need_docs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no docs/ here, as in the image
    text = cli.describe()
    assert "NOETL_PYTHON_MEMORY_LIMIT_MB" in text and "default:  1024" in text


def test_config_shows_every_variable_the_worker_reads() -> None:
    result = run_cli("config", NOETL_SHARD_ID="5", RUST_LOG="warn", NODE_NAME="node-a")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert sorted(shown) == sorted(name for _, name, *_ in ROWS)
    assert shown["NOETL_PYTHON_MEMORY_LIMIT_MB"] == 1024
    assert shown["NOETL_SHARD_ID"] == "5" and shown["NODE_NAME"] == "node-a"
    assert shown["NOETL_LOG_LEVEL"] == "warning"  # from RUST_LOG


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("NOETL_PYTHON_MEMORY_LIMIT_MB", "abc", "integer >= 0"),
        ("NOETL_PYTHON_MEMORY_LIMIT_MB", "-1", "integer >= 0"),
        ("NOETL_LOG_LEVEL", "loud", "one of debug, info, warning, error, critical"),
        ("NOETL_WORKER_COMMAND_TIMEOUT_SECONDS", "10d", "10m, 1h"),
    ],
)
@pytest.mark.parametrize("command", [(), ("run",), ("config",)])
def test_bad_values_exit_2_at_start_naming_the_variable(
    command: tuple[str, ...], variable: str, value: str, fragment: str
) -> None:
    result = run_cli(*command, **{variable: value})
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert variable in line and repr(value) in line and fragment in line


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("WARN", "warning"),
        ("warning", "warning"),
        ("Warn", "warning"),
        ("TRACE", "debug"),
        ("ERR", "error"),
        ("Fatal", "critical"),
        ("INFO", "info"),
        ("information", "info"),
        ("CRITICAL", "critical"),
    ],
)
def test_log_level_spellings(value: str, level: str) -> None:
    result = run_cli("config", NOETL_LOG_LEVEL=value)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["NOETL_LOG_LEVEL"] == level


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("90S", 90.0),
        ("250ms", 0.25),
        ("2.5", 2.5),
        (" 2M ", 120.0),
    ],
)
def test_durations_accept_units(value: str, seconds: float) -> None:
    result = run_cli("config", NOETL_WORKER_COMMAND_TIMEOUT_SECONDS=value)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["NOETL_WORKER_COMMAND_TIMEOUT_SECONDS"] == seconds


@pytest.mark.parametrize("value", ["10d", "m", "1h30m", "-1m", "0m", "1e3s", "ten"])
def test_bad_durations_are_refused(value: str) -> None:
    result = run_cli("config", WORKER_HEARTBEAT_INTERVAL=value)
    assert result.returncode == 2
    assert "WORKER_HEARTBEAT_INTERVAL" in result.stderr


def test_version_flag() -> None:
    result = run_cli("--version")
    assert result.stdout.strip() == f"noetl-worker {__version__}"
