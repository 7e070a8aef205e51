"""Settings from the environment: every variable, its default and its validation.

``docs/configuration.md`` is the single table of these variables; ``tests/test_config_table.py``
keeps that table and the names read in ``src/`` in lockstep. Read a variable only through
``Env`` (or ``os.environ.get`` with a literal name in a tool module) so the check can see it.

Invalid values raise :class:`ConfigError` naming the variable, the value and what is accepted;
the CLI turns that into one line on stderr and exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs

from .errors import ConfigError

SNOWFLAKE_DEFAULT_EPOCH_MS: Final = 1_704_067_200_000  # 2024-01-01T00:00:00Z, the server's epoch
MAX_NODE_ID: Final = 1023
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
# The spellings operators type (Rust's tracing, syslog, Python's logging), any case → our level.
LOG_LEVEL_ALIASES: Final = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "information": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "err": "error",
    "critical": "critical",
    "crit": "critical",
    "fatal": "critical",
}
LOG_FORMATS: Final = ("auto", "json", "text")
DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DEFAULT_PYTHON_MEMORY_LIMIT_MB: Final = 1024
DELIVER_POLICIES: Final = ("by_start_time", "new", "all", "last")
DEFAULT_DELIVER_WINDOW: Final = 300.0
DEFAULT_CLAIM_MAX_BYTES: Final = 64 * 1024 * 1024
SERVER_DIALECTS: Final = ("auto", "python", "rust")  # dialect.py; kept here to avoid an import cycle


@attrs.frozen
class Bind:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class NatsAuth:
    url: str  # without userinfo
    user: str | None
    password: str | None = attrs.field(repr=False)


@attrs.frozen
class Settings:
    """The worker's effective configuration (immutable)."""

    worker_id: str
    pool_name: str
    heartbeat_interval: float
    max_concurrent: int
    metrics_bind: Bind
    lag_poll_interval: float
    server_url: str
    nats: NatsAuth
    stream: str
    consumer: str
    subject: str
    filter_subjects: tuple[str, ...]
    pool_segment: str | None
    snowflake_node_id: int
    snowflake_node_source: str
    snowflake_epoch_ms: int
    keychain_env_vars: tuple[str, ...]
    ipc_cache_budget_bytes: int
    result_inline_max_bytes: int
    command_timeout: float
    shutdown_grace: float
    ack_wait: float
    max_deliver: int
    internal_api_token: str | None = attrs.field(repr=False)
    sealed_credentials: bool
    max_waiting: int
    log_level: str
    log_format: str
    hostname: str
    ipc_node_id: str  # which node a shared-memory result lives on (readers on another refuse it)
    python_memory_limit_mb: int = DEFAULT_PYTHON_MEMORY_LIMIT_MB
    # Inputs shown by `noetl-worker config` that have no field of their own above.
    sources: tuple[tuple[str, str | None], ...] = ()
    # Origins (scheme://host[:port]) a notification's server_url may name (see origins.py).
    server_url_allowlist: frozenset[str] = frozenset()
    deliver_policy: str = "by_start_time"  # of a consumer the worker creates
    deliver_window: float = DEFAULT_DELIVER_WINDOW
    claim_max_bytes: int = DEFAULT_CLAIM_MAX_BYTES
    server_dialect: str = "auto"  # auto | python | rust (see dialect.py)
    events_stream: bool = False  # GET /events on the metrics port

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        return _load(Env(os.environ if environ is None else environ))

    def masked(self) -> dict[str, object]:
        """The effective configuration as a flat dict, secrets masked (``noetl-worker config``)."""
        return {
            "WORKER_ID": self.worker_id,
            "WORKER_POOL_NAME": self.pool_name,
            "WORKER_HEARTBEAT_INTERVAL": self.heartbeat_interval,
            "WORKER_MAX_CONCURRENT": self.max_concurrent,
            "WORKER_METRICS_BIND": str(self.metrics_bind),
            "WORKER_NATS_LAG_POLL_INTERVAL": self.lag_poll_interval,
            "NOETL_SERVER_URL": self.server_url,
            "NOETL_SERVER_DIALECT": self.server_dialect,
            "NATS_URL": self.nats.url,
            "NATS_USER": self.nats.user,
            "NATS_PASSWORD": "***" if self.nats.password else None,
            "NATS_STREAM": self.stream,
            "NATS_CONSUMER": self.consumer,
            "NATS_SUBJECT": self.subject,
            "NATS_FILTER_SUBJECT": ",".join(self.filter_subjects),
            "NOETL_SNOWFLAKE_NODE_ID": f"{self.snowflake_node_id} ({self.snowflake_node_source})",
            "NOETL_SNOWFLAKE_EPOCH_MS": self.snowflake_epoch_ms,
            "NOETL_KEYCHAIN_ENV_VARS": ",".join(self.keychain_env_vars),
            "NOETL_IPC_CACHE_BUDGET_BYTES": self.ipc_cache_budget_bytes,
            "NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES": self.result_inline_max_bytes,
            "NOETL_WORKER_COMMAND_TIMEOUT_SECONDS": self.command_timeout,
            "NOETL_WORKER_SHUTDOWN_GRACE_SECONDS": self.shutdown_grace,
            "NOETL_WORKER_NATS_ACK_WAIT_SECONDS": self.ack_wait,
            "NOETL_WORKER_NATS_MAX_DELIVER": self.max_deliver,
            "NOETL_INTERNAL_API_TOKEN": "***" if self.internal_api_token else None,
            "NOETL_SEALED_CREDENTIALS": self.sealed_credentials,
            "NOETL_WORKER_MAX_WAITING": self.max_waiting,
            "NOETL_LOG_LEVEL": self.log_level,
            "NOETL_LOG_FORMAT": self.log_format,
            "HOSTNAME": self.hostname,
            "NOETL_PYTHON_MEMORY_LIMIT_MB": self.python_memory_limit_mb,
            # As given (None: unset); their effect shows in the values above.
            **dict(self.sources),
            "NOETL_SERVER_URL_ALLOWLIST": ",".join(sorted(self.server_url_allowlist)),
            "NATS_DELIVER_POLICY": self.deliver_policy,
            "NATS_DELIVER_WINDOW_SECONDS": self.deliver_window,
            "NOETL_CLAIM_MAX_BYTES": self.claim_max_bytes,
            "WORKER_EVENTS_STREAM": self.events_stream,
        }


class Env:
    """Typed, validating reads of environment variables. Blank counts as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        accepted = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(name, value, accepted) from None
        if number < minimum or (maximum is not None and number > maximum):
            raise ConfigError(name, value, accepted)
        return number

    def seconds(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        """A positive duration in seconds: a plain number, or with a unit ``ms``, ``s``, ``m``, ``h``."""
        value = self.raw(name)
        if value is None:
            return default
        accepted = f"a duration: seconds > {minimum:g} (10, 2.5) or with a unit (500ms, 10s, 10m, 1h)"
        text = value.lower().strip()
        scale = 1.0
        for unit in ("ms", "s", "m", "h"):  # "ms" before "s" and "m"
            if text.endswith(unit):
                text, scale = text[: -len(unit)].strip(), DURATION_UNITS[unit]
                break
        if not text or not text.replace(".", "", 1).isdigit():
            raise ConfigError(name, value, accepted)
        try:
            number = float(text) * scale
        except ValueError:
            raise ConfigError(name, value, accepted) from None
        if not number > minimum or number != number or number == float("inf"):
            raise ConfigError(name, value, accepted)
        return number

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, value, "one of 1, true, yes, on, 0, false, no, off")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() not in choices:
            raise ConfigError(name, value, "one of " + ", ".join(choices))
        return value.lower()


def _load(env: Env) -> Settings:
    worker_id = env.text("WORKER_ID", "") or str(uuid.uuid4())
    pool_name = env.text("WORKER_POOL_NAME", "default")
    subject = _subject(env, "NATS_SUBJECT", "noetl.commands")
    filter_subjects = _filter_subjects(env, subject, pool_name)
    node_id, node_source = _snowflake_node(env, worker_id)
    hostname = env.text("HOSTNAME", "") or socket.gethostname() or "unknown"
    log_level = _log_level(env)
    shown_as_given: tuple[str, ...] = ("RUST_LOG", "NOETL_SHARD_ID", "NOETL_SNOWFLAKE_NODE_ID_OFFSET")
    shown_as_given += ("NOETL_NODE_ID", "NODE_NAME", "NOETL_DATA_DIR", "NOETL_MCP_URL")
    sources = tuple((name, env.raw(name)) for name in shown_as_given)
    server_url = _server_url(env, "NOETL_SERVER_URL", "http://localhost:8082")
    return Settings(
        worker_id=worker_id,
        pool_name=pool_name,
        heartbeat_interval=env.seconds("WORKER_HEARTBEAT_INTERVAL", 10.0),
        max_concurrent=env.integer("WORKER_MAX_CONCURRENT", 1, minimum=1, maximum=4096),
        metrics_bind=_bind(env, "WORKER_METRICS_BIND", "0.0.0.0:9090"),
        lag_poll_interval=env.seconds("WORKER_NATS_LAG_POLL_INTERVAL", 5.0),
        server_url=server_url,
        nats=_nats_auth(env),
        stream=_name(env, "NATS_STREAM", "noetl_commands"),
        consumer=_name(env, "NATS_CONSUMER", "worker-pool"),
        subject=subject,
        filter_subjects=filter_subjects,
        pool_segment=pool_segment(filter_subjects),
        snowflake_node_id=node_id,
        snowflake_node_source=node_source,
        snowflake_epoch_ms=env.integer(
            "NOETL_SNOWFLAKE_EPOCH_MS", SNOWFLAKE_DEFAULT_EPOCH_MS, minimum=0, maximum=2**53
        ),
        keychain_env_vars=_name_list(env, "NOETL_KEYCHAIN_ENV_VARS"),
        ipc_cache_budget_bytes=env.integer("NOETL_IPC_CACHE_BUDGET_BYTES", 268_435_456, minimum=0),
        result_inline_max_bytes=env.integer("NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES", 102_400, minimum=0),
        command_timeout=env.seconds("NOETL_WORKER_COMMAND_TIMEOUT_SECONDS", 180.0),
        shutdown_grace=env.seconds("NOETL_WORKER_SHUTDOWN_GRACE_SECONDS", 20.0),
        ack_wait=env.seconds("NOETL_WORKER_NATS_ACK_WAIT_SECONDS", 30.0, minimum=0.5),
        max_deliver=env.integer("NOETL_WORKER_NATS_MAX_DELIVER", 1000, minimum=1),
        internal_api_token=env.raw("NOETL_INTERNAL_API_TOKEN"),
        sealed_credentials=env.flag("NOETL_SEALED_CREDENTIALS", False),
        max_waiting=env.integer("NOETL_WORKER_MAX_WAITING", 64, minimum=1),
        log_level=log_level,
        log_format=env.choice("NOETL_LOG_FORMAT", "auto", LOG_FORMATS),
        hostname=hostname,
        ipc_node_id=env.raw("NOETL_NODE_ID") or env.raw("NODE_NAME") or hostname,
        # Validated here so a bad value stops the worker at start, not in the first python step.
        python_memory_limit_mb=env.integer(
            "NOETL_PYTHON_MEMORY_LIMIT_MB", DEFAULT_PYTHON_MEMORY_LIMIT_MB, minimum=0
        ),
        sources=sources,
        server_url_allowlist=_allowlist(env, server_url),
        deliver_policy=env.choice("NATS_DELIVER_POLICY", "by_start_time", DELIVER_POLICIES),
        deliver_window=env.seconds("NATS_DELIVER_WINDOW_SECONDS", DEFAULT_DELIVER_WINDOW),
        claim_max_bytes=env.integer(
            "NOETL_CLAIM_MAX_BYTES", DEFAULT_CLAIM_MAX_BYTES, minimum=1024, maximum=2**40
        ),
        server_dialect=env.choice("NOETL_SERVER_DIALECT", "auto", SERVER_DIALECTS),
        events_stream=env.flag("WORKER_EVENTS_STREAM", False),
    )


def _allowlist(env: Env, server_url: str) -> frozenset[str]:
    """Origins a notification's server_url may name; NOETL_SERVER_URL's origin is always one."""
    from .origins import ServerURLError, origin_of

    try:
        origins = {origin_of(server_url)}
    except ServerURLError as exc:
        raise ConfigError(
            "NOETL_SERVER_URL", server_url, f"an http(s) URL without credentials ({exc})"
        ) from None
    value = env.raw("NOETL_SERVER_URL_ALLOWLIST") or ""
    accepted = "comma-separated http(s) origins (scheme://host[:port], no path), e.g. https://noetl:8082"
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        try:
            origin = origin_of(item)
        except ServerURLError as exc:
            raise ConfigError("NOETL_SERVER_URL_ALLOWLIST", value, f"{accepted}; {item!r}: {exc}") from None
        parts = urlsplit(item)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError("NOETL_SERVER_URL_ALLOWLIST", value, f"{accepted}; {item!r} has a path")
        origins.add(origin)
    return frozenset(origins)


def _bind(env: Env, name: str, default: str) -> Bind:
    value = env.text(name, default)
    accepted = "host:port with a port 0-65535 (e.g. 0.0.0.0:9090, [::]:9090, localhost:9090)"
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(name, value, accepted)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(name, value, accepted) from None
    elif ":" in host:
        raise ConfigError(name, value, accepted)
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(name, value, accepted) from None
    if not 0 <= port <= 65535:
        raise ConfigError(name, value, accepted)
    return Bind(host, port)


def normalize_server_url(url: str) -> str:
    """Strip the trailing ``/`` and any trailing ``/api`` (the worker always adds ``/api/...``)."""
    url = url.strip().rstrip("/")
    while url.endswith("/api"):
        url = url[: -len("/api")].rstrip("/")
    return url


def _server_url(env: Env, name: str, default: str) -> str:
    value = env.text(name, default)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, value, "an http:// or https:// URL with a host")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(name, value, "an http:// or https:// URL with a valid port") from None
    return normalize_server_url(value)


def _nats_auth(env: Env) -> NatsAuth:
    value = env.text("NATS_URL", "nats://localhost:4222")
    accepted = "nats://[user:password@]host:port (comma-separated for a cluster; tls:// also)"
    urls: list[str] = []
    user: str | None = None
    password: str | None = None
    for item in value.split(","):
        parts = urlsplit(item.strip())
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ConfigError("NATS_URL", _mask_url(value), accepted)
        try:
            port = parts.port
        except ValueError:
            raise ConfigError("NATS_URL", _mask_url(value), accepted) from None
        if parts.username and user is None:
            user = unquote(parts.username)
            password = unquote(parts.password) if parts.password else None
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        netloc = host if port is None else f"{host}:{port}"
        urls.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    env_user, env_password = env.raw("NATS_USER"), env.raw("NATS_PASSWORD")
    if env_user and env_password:  # both set: they override credentials inside the URL
        user, password = env_user, env_password
    elif env_user or env_password:
        missing = "NATS_PASSWORD" if env_user else "NATS_USER"
        raise ConfigError(missing, "", "set together with " + ("NATS_USER" if env_user else "NATS_PASSWORD"))
    return NatsAuth(",".join(urls), user, password)


def _mask_url(value: str) -> str:
    parts = urlsplit(value.split(",")[0].strip())
    if parts.password:
        return value.replace(parts.password, "***")
    return value


def _name(env: Env, name: str, default: str) -> str:
    value = env.text(name, default)
    if any(ch in value for ch in " .*>\t/\\"):
        raise ConfigError(name, value, "a JetStream name without spaces, '.', '*', '>', '/' or '\\'")
    return value


def _subject(env: Env, name: str, default: str) -> str:
    value = env.text(name, default)
    tokens = value.split(".")
    if any(not t or " " in t or t in ("*", ">") for t in tokens):
        raise ConfigError(name, value, "a literal NATS subject such as noetl.commands")
    return value


def _filter_subjects(env: Env, subject: str, pool: str) -> tuple[str, ...]:
    explicit = env.raw("NATS_FILTER_SUBJECT")
    if explicit is not None:
        subjects = tuple(s.strip() for s in explicit.split(",") if s.strip())
        for s in subjects:
            tokens = s.split(".")
            if any(not t or " " in t for t in tokens) or ">" in tokens[:-1]:
                raise ConfigError("NATS_FILTER_SUBJECT", explicit, "NATS subjects separated by commas")
        return subjects
    if pool == "default":
        # The Python server publishes on the bare subject unless its routing flag is on, the
        # Rust server on <subject>.<segment>.<execution_id>: the default pool takes both.
        return (subject, f"{subject}.>")
    return (f"{subject}.{pool}.>",)


def pool_segment(filter_subjects: tuple[str, ...]) -> str | None:
    """The pool segment a filter selects (``noetl.commands.system.>`` → ``system``), else None.

    A worker with a segment acks and skips notifications whose ``execution_pool`` differs.
    """
    if len(filter_subjects) != 1:
        return None
    tokens = filter_subjects[0].split(".")
    if "commands" not in tokens:
        return None
    index = tokens.index("commands") + 1
    if index >= len(tokens) or tokens[index] in ("", "*", ">"):
        return None
    return tokens[index]


def _name_list(env: Env, name: str) -> tuple[str, ...]:
    value = env.raw(name)
    if value is None:
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for n in names:
        if not n.replace("_", "a").isalnum():
            raise ConfigError(name, value, "comma-separated environment variable names")
    return names


def fnv1a_64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _snowflake_node(env: Env, worker_id: str) -> tuple[int, str]:
    # A StatefulSet passes its pod index as the node id and each pool its own offset, so the
    # pools' ranges never overlap; the sum must still fit the 10-bit field.
    offset = env.integer("NOETL_SNOWFLAKE_NODE_ID_OFFSET", 0, minimum=0, maximum=MAX_NODE_ID)
    for name in ("NOETL_SNOWFLAKE_NODE_ID", "NOETL_SHARD_ID"):
        if env.raw(name) is not None:
            node = env.integer(name, 0, minimum=0, maximum=MAX_NODE_ID)
            if node + offset > MAX_NODE_ID:
                raise ConfigError(
                    name,
                    str(node),
                    f"a node id that stays <= {MAX_NODE_ID} after adding "
                    f"NOETL_SNOWFLAKE_NODE_ID_OFFSET={offset}",
                )
            return node + offset, name if not offset else f"{name}+NOETL_SNOWFLAKE_NODE_ID_OFFSET"
    # No explicit id: hash an identity. NODE_NAME is the Kubernetes node, shared by every pod on
    # it, so the worker id is always part of the hashed identity to keep pods apart.
    for name in ("NOETL_NODE_ID", "NODE_NAME", "HOSTNAME"):
        identity = env.raw(name)
        if identity is not None:
            return fnv1a_64(f"{identity}/{worker_id}".encode()) & MAX_NODE_ID, f"fnv1a({name})"
    return fnv1a_64(worker_id.encode()) & MAX_NODE_ID, "fnv1a(WORKER_ID)"


def _log_level(env: Env) -> str:
    explicit = env.raw("NOETL_LOG_LEVEL")
    if explicit is not None:
        level = LOG_LEVEL_ALIASES.get(explicit.lower())
        if level is None:
            aliases = ", ".join(a for a in LOG_LEVEL_ALIASES if a not in LOG_LEVELS)
            accepted = f"one of {', '.join(LOG_LEVELS)} or an alias ({aliases}), any case"
            raise ConfigError("NOETL_LOG_LEVEL", explicit, accepted)
        return level
    rust_log = env.raw("RUST_LOG")
    if rust_log is None:
        return "info"
    # RUST_LOG is honoured as an alias: a `noetl_worker=<level>` directive wins, else the bare
    # default level; other crates' directives mean nothing here and are ignored.
    levels = {**LOG_LEVEL_ALIASES, "off": "critical"}
    bare: str | None = None
    for directive in rust_log.split(","):
        target, sep, level = directive.strip().rpartition("=")
        if sep and target in ("noetl_worker", "worker_pool") and level.lower() in levels:
            return levels[level.lower()]
        if not sep and level.lower() in levels:
            bare = levels[level.lower()]
    return bare or "info"
