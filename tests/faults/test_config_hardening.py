"""The new settings: accepted values, defaults, and errors that name the variable."""

from __future__ import annotations

import pytest

from noetl_worker.config import Settings
from noetl_worker.errors import ConfigError
from noetl_worker.origins import ServerURLError, check_allowed


def test_the_allowlist_defaults_to_the_origin_of_noetl_server_url() -> None:
    s = Settings.from_env({"NOETL_SERVER_URL": "HTTP://NoETL:80/api/"})
    assert s.server_url_allowlist == frozenset({"http://noetl"})
    assert check_allowed("http://noetl/some/path", s.server_url_allowlist) == "http://noetl"
    with pytest.raises(ServerURLError, match="not in NOETL_SERVER_URL_ALLOWLIST"):
        check_allowed("http://noetl:8080", s.server_url_allowlist)


def test_the_allowlist_adds_origins() -> None:
    s = Settings.from_env(
        {"NOETL_SERVER_URL": "http://a:8082", "NOETL_SERVER_URL_ALLOWLIST": "https://b, http://[::1]:9/"}
    )
    assert s.server_url_allowlist == frozenset({"http://a:8082", "https://b", "http://[::1]:9"})


@pytest.mark.parametrize("value", ["ftp://b", "http://b/path", "b:8082", "http://u:p@b", "http://b:99999"])
def test_a_bad_allowlist_entry_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="NOETL_SERVER_URL_ALLOWLIST"):
        Settings.from_env({"NOETL_SERVER_URL_ALLOWLIST": value})


def test_deliver_policy_and_window() -> None:
    s = Settings.from_env({})
    assert (s.deliver_policy, s.deliver_window) == ("by_start_time", 300.0)
    s = Settings.from_env({"NATS_DELIVER_POLICY": "NEW", "NATS_DELIVER_WINDOW_SECONDS": "90s"})
    assert (s.deliver_policy, s.deliver_window) == ("new", 90.0)
    with pytest.raises(ConfigError, match=r"NATS_DELIVER_POLICY.*by_start_time, new, all, last"):
        Settings.from_env({"NATS_DELIVER_POLICY": "everything"})


def test_claim_max_bytes() -> None:
    assert Settings.from_env({}).claim_max_bytes == 64 * 1024 * 1024
    with pytest.raises(ConfigError, match="NOETL_CLAIM_MAX_BYTES"):
        Settings.from_env({"NOETL_CLAIM_MAX_BYTES": "10"})
