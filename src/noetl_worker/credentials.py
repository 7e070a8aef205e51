"""Credential aliases, keychain references and operator-mounted secrets.

A tool config names a credential by a **string** in ``auth`` (checked first) or ``credential``.
:func:`resolve_credentials` fetches it (plain, or sealed to this worker's key) and merges its
fields into the config by credential type without ever overwriting a field the playbook set.
Every secret value it hands to the tool is also returned in ``secrets`` so the result scrubber
replaces it wherever it shows up.

Failures raise :class:`~noetl_worker.errors.CredentialError`; ``retryable`` only for a transient
server answer (408/425/429/502/503/504) or no answer at all, and only on the first
``MAX_PREDISPATCH_ATTEMPTS`` attempts.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import attrs

from .errors import ControlPlaneError, CredentialError, HTTPStatusError, TransportError
from .tools.base import ServerAPI

if TYPE_CHECKING:  # the sealed module loads cryptography (~8 MiB): only on a sealed fetch
    from .sealed import SealingKey

log = logging.getLogger(__name__)

MAX_PREDISPATCH_ATTEMPTS: Final = 3
_TRANSIENT_STATUSES: Final = frozenset({408, 425, 429, 502, 503, 504})
SUPPORTED_TYPES: Final = (
    "postgres", "snowflake", "bearer", "bearer_token", "api_key", "basic", "nats", "pubsub",
    "kafka",
)  # fmt: skip

_POSTGRES_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "host": ("db_host", "host"),
    "port": ("db_port", "port"),
    "user": ("db_user", "user"),
    "password": ("db_password", "password"),
    "database": ("db_name", "database"),
}
_SNOWFLAKE_NAMES: Final = (
    "account", "user", "password", "private_key", "public_key", "private_key_passphrase",
    "warehouse", "database", "schema", "role",
)  # fmt: skip
_SNOWFLAKE_FIELDS: Final = tuple((name, (f"sf_{name}", name)) for name in _SNOWFLAKE_NAMES)
_SNOWFLAKE_SECRETS: Final = ("password", "private_key", "private_key_passphrase")
_MESSAGING_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "url": ("nats_url",),
    "user": ("nats_user", "nats_username"),
    "password": ("nats_password",),
    "token": ("nats_token",),
}


@attrs.frozen
class ResolvedConfig:
    """A tool config with its credential applied, and the secret values it now carries."""

    config: dict[str, Any]
    secrets: dict[str, str] = attrs.field(factory=dict, repr=False)


def _classify(alias: str, exc: ControlPlaneError, attempts: int, what: str) -> CredentialError:
    early = attempts < MAX_PREDISPATCH_ATTEMPTS
    if isinstance(exc, HTTPStatusError):
        if exc.status == 404:
            return CredentialError(f"{what} {alias!r} not found (HTTP 404)")
        transient = exc.status in _TRANSIENT_STATUSES
        return CredentialError(
            f"fetching {what} {alias!r} failed: HTTP {exc.status}: {exc.body[:200]}",
            retryable=transient and early,
        )
    if isinstance(exc, TransportError):
        return CredentialError(
            f"fetching {what} {alias!r} failed: no answer from the server: {exc}", retryable=early
        )
    return CredentialError(f"fetching {what} {alias!r} failed: {exc}")


async def fetch_credential(
    alias: str,
    *,
    server: ServerAPI,
    execution_id: int,
    attempts: int,
    sealing: SealingKey | None,
    worker_id: str,
) -> dict[str, Any]:
    """The credential JSON ``{id, name, type, data, …}`` of an alias."""
    path = f"/api/credentials/{quote(alias, safe='')}"
    sealed = sealing is not None and bool(worker_id)
    if sealing is not None and not worker_id:
        log.warning("sealed credentials need a worker id; fetching %r in plain text", alias)
    try:
        if sealed:
            params = {"worker_id": worker_id, "execution_id": execution_id}
            answer = await server.get_json(path + "/sealed", params=params)
        else:
            params = {"include_data": "true", "execution_id": execution_id}
            answer = await server.get_json(path, params=params)
    except ControlPlaneError as exc:
        raise _classify(alias, exc, attempts, "credential") from exc
    if sealed:
        assert sealing is not None
        from .sealed import SealedEnvelopeError, open_envelope

        try:
            plaintext = bytearray(open_envelope(sealing, answer))
        except SealedEnvelopeError as exc:
            raise CredentialError(f"credential {alias!r}: {exc}") from None
        try:
            answer = json.loads(plaintext)
        except ValueError:
            raise CredentialError(f"credential {alias!r}: sealed plaintext is not JSON") from None
        finally:
            plaintext[:] = bytes(len(plaintext))  # best effort: the parsed copy remains
    if not isinstance(answer, Mapping):
        raise CredentialError(f"credential {alias!r}: the answer is not a JSON object")
    data = answer.get("data")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise CredentialError(f"credential {alias!r}: 'data' must be an object")
    return {**answer, "data": dict(data)}


def _first(data: Mapping[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        value = data.get(name)
        if value is not None:
            return value
    return None


def _port(alias: str, value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if isinstance(value, bool) or not 0 <= port <= 65535:
        raise CredentialError(f"credential {alias!r}: port must be an integer 0-65535, got {value!r}")
    return port


def _secret(secrets: dict[str, str], name: str, value: Any) -> None:
    if isinstance(value, str) and value:
        secrets[name] = value


def _apply(config: dict[str, Any], alias: str, credential: Mapping[str, Any]) -> dict[str, str]:
    """Merge ``credential`` into ``config`` (in place, never overwriting); the secrets used."""
    kind = str(credential.get("type") or "").lower()
    data: Mapping[str, Any] = credential["data"]
    secrets: dict[str, str] = {}

    def setdefault(name: str, value: Any) -> None:
        if value is not None and name not in config:
            config[name] = value

    if kind == "postgres":
        for target, sources in _POSTGRES_FIELDS.items():
            value = _first(data, sources)
            if target == "port" and value is not None:
                value = _port(alias, value)
            setdefault(target, value)
        _secret(secrets, f"{alias}.password", config.get("password"))
    elif kind == "snowflake":
        for target, sources in _SNOWFLAKE_FIELDS:
            setdefault(target, _first(data, sources))
        for name in _SNOWFLAKE_SECRETS:
            _secret(secrets, f"{alias}.{name}", config.get(name))
    elif kind in ("bearer", "bearer_token"):
        setdefault("auth", {"type": "bearer", "credential": alias})
        secrets[alias] = str(_first(data, ("token", "access_token", "bearer_token")) or "")
    elif kind == "api_key":
        header = data.get("header") or "X-API-Key"
        setdefault("auth", {"type": "api_key", "credential": alias, "header": header})
        secrets[alias] = str(_first(data, ("api_key", "key", "token")) or "")
    elif kind == "basic":
        username = _first(data, ("username", "user"))
        setdefault("auth", {"type": "basic", "credential": alias, "username": username})
        secrets[alias] = str(_first(data, ("password", "db_password")) or "")
    elif kind in ("nats", "pubsub", "kafka"):
        for target, sources in _MESSAGING_FIELDS.items():
            setdefault(target, _first(data, sources))
        for key, value in data.items():
            setdefault(key, value)
        for name in ("password", "token"):
            _secret(secrets, f"{alias}.{name}", config.get(name))
    else:
        raise CredentialError(
            f"credential {alias!r} has unsupported type {credential.get('type')!r}: "
            f"expected one of {', '.join(SUPPORTED_TYPES)}"
        )
    return secrets


def _alias(config: Mapping[str, Any]) -> str | None:
    for key in ("auth", "credential"):
        value = config.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


async def _resolve_one(config: Mapping[str, Any], fetch: _Fetcher) -> tuple[dict[str, Any], dict[str, str]]:
    alias = _alias(config)
    if alias is None:
        return await _resolve_auth_map(config, fetch)
    credential = await fetch(alias)
    # String aliases go; an object ``auth`` is the playbook's own and stays.
    out = {k: v for k, v in config.items() if not (k in ("auth", "credential") and isinstance(v, str))}
    return out, _apply(out, alias, credential)


# Fields of a credential's data that are secret (scrubbed from results); the rest (host, user,
# header name, …) may legitimately appear in results.
_SECRET_FIELDS: Final = frozenset(
    {
        "token", "access_token", "bearer_token", "password", "db_password", "api_key", "value",
        "secret", "client_secret", "private_key", "private_key_passphrase", "nats_password",
        "nats_token", "secret_access_key",
    }
)  # fmt: skip


def _auth_entries(auth: Mapping[str, Any]) -> list[tuple[str | None, Mapping[str, Any]]]:
    """The entries of an ``auth`` object that name a stored credential by ``key``.

    Two forms: flat ``{type, key, …}`` (entry name ``None``), and noetl's map form
    ``{<alias>: {type, key, …}, …}``.
    """
    if isinstance(auth.get("key"), str):
        return [(None, auth)]
    return [
        (str(name), entry)
        for name, entry in auth.items()
        if isinstance(entry, Mapping) and isinstance(entry.get("key"), str) and entry["key"].strip()
    ]


async def _resolve_auth_map(
    config: Mapping[str, Any], fetch: _Fetcher
) -> tuple[dict[str, Any], dict[str, str]]:
    """Resolve ``auth: {type, key}`` / ``auth: {<alias>: {type, key}}`` (noetl's forms).

    Each entry's credential data is merged into the entry (what the playbook wrote wins) and
    ``key`` becomes ``credential``, so resolving twice fetches once. A ``postgres`` entry also
    supplies the connection fields the postgres tool reads, as a string ``auth`` does.
    """
    out = dict(config)
    auth = out.get("auth")
    if not isinstance(auth, Mapping):
        return out, {}
    entries = _auth_entries(auth)
    if not entries:
        return out, {}
    secrets: dict[str, str] = {}
    resolved: dict[str, Any] = dict(auth)
    connection_applied = False
    for name, entry in entries:
        key = str(entry["key"]).strip()
        credential = await fetch(key)
        data: Mapping[str, Any] = credential["data"]
        merged = {k: v for k, v in data.items() if k not in entry}
        merged.update({k: v for k, v in entry.items() if k != "key"})
        merged["credential"] = key
        merged.setdefault("type", credential.get("type"))
        for field, value in merged.items():
            if field in _SECRET_FIELDS:
                _secret(secrets, f"{key}.{field}", value)
        kind = str(merged.get("type") or "").lower()
        if kind == "postgres" and not connection_applied:
            connection_applied = True
            secrets.update(_apply(out, key, {**credential, "type": "postgres"}))
        if name is None:
            resolved = merged
        else:
            resolved[name] = merged
    out["auth"] = resolved
    return out, secrets


class _Fetcher:
    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._cache: dict[str, dict[str, Any]] = {}

    async def __call__(self, alias: str) -> dict[str, Any]:
        if alias not in self._cache:
            self._cache[alias] = await fetch_credential(alias, **self._kwargs)
        return self._cache[alias]


async def resolve_credentials(
    tool_config: Mapping[str, Any],
    *,
    server: ServerAPI,
    execution_id: int,
    attempts: int,
    sealing: SealingKey | None,
    worker_id: str,
) -> ResolvedConfig:
    """Apply credential aliases to a tool config.

    ``task_sequence`` configs (``{"tool_config": [{label: spec}, …]}``) resolve each task's
    spec separately; ``transfer`` configs resolve ``source`` and ``target`` separately.
    """
    fetch = _Fetcher(
        server=server,
        execution_id=execution_id,
        attempts=attempts,
        sealing=sealing,
        worker_id=worker_id,
    )
    secrets: dict[str, str] = {}
    tasks = tool_config.get("tool_config")
    if isinstance(tasks, list):
        resolved_tasks: list[Any] = []
        for task in tasks:
            if not isinstance(task, Mapping):
                resolved_tasks.append(task)
                continue
            resolved_task: dict[str, Any] = {}
            for label, spec in task.items():
                if isinstance(spec, Mapping):
                    spec, found = await _resolve_one(spec, fetch)
                    secrets.update(found)
                resolved_task[label] = spec
            resolved_tasks.append(resolved_task)
        return ResolvedConfig({**tool_config, "tool_config": resolved_tasks}, secrets)
    if tool_config.get("kind") == "transfer":
        out = dict(tool_config)
        for side in ("source", "target"):
            if isinstance(out.get(side), Mapping):
                out[side], found = await _resolve_one(out[side], fetch)
                secrets.update(found)
        return ResolvedConfig(out, secrets)
    config, secrets = await _resolve_one(tool_config, fetch)
    return ResolvedConfig(config, secrets)


def keychain_env_secrets(names: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """Operator-mounted secrets (``NOETL_KEYCHAIN_ENV_VARS``): name → value, blanks skipped."""
    return {name: environ[name] for name in names if environ.get(name, "").strip()}


# --- keychain template references --------------------------------------------------------

_KEYCHAIN_RE: Final = re.compile(
    r"\{\{\s*keychain\.([A-Za-z_][A-Za-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_-]*)\s*\}\}"
)


def _keychain_names(value: Any, found: set[str]) -> None:
    if isinstance(value, str):
        found.update(m.group(1) for m in _KEYCHAIN_RE.finditer(value))
    elif isinstance(value, Mapping):
        for item in value.values():
            _keychain_names(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _keychain_names(item, found)


async def _keychain_entry(
    name: str, server: ServerAPI, catalog_id: str, execution_id: int, attempts: int
) -> Mapping[str, Any]:
    path = f"/api/keychain/{quote(catalog_id, safe='')}/{quote(name, safe='')}"
    try:
        answer = await server.get_json(path, params={"execution_id": execution_id})
    except ControlPlaneError as exc:
        raise _classify(name, exc, attempts, "keychain entry") from exc
    if not isinstance(answer, Mapping):
        raise CredentialError(f"keychain entry {name!r}: the answer is not a JSON object")
    status = answer.get("status")
    if status != "success":
        raise CredentialError(
            f"keychain entry {name!r} of catalog {catalog_id} is {status or 'unavailable'}"
            " (declare it in the playbook's keychain section)"
        )
    token_data = answer.get("token_data")
    if not isinstance(token_data, Mapping):
        raise CredentialError(f"keychain entry {name!r}: 'token_data' must be an object")
    return token_data


def _substitute(value: Any, entries: Mapping[str, Mapping[str, Any]], used: dict[str, str]) -> Any:
    if isinstance(value, str):
        if "keychain." not in value:
            return value

        def lookup(match: re.Match[str]) -> Any:
            name, field = match.group(1), match.group(2)
            fields = entries[name]
            if field not in fields:
                raise CredentialError(
                    f"keychain entry {name!r} has no field {field!r}: "
                    f"available fields are {', '.join(sorted(map(str, fields))) or 'none'}"
                )
            found = fields[field]
            if isinstance(found, str):
                used[f"keychain.{name}.{field}"] = found
            return found

        whole = _KEYCHAIN_RE.fullmatch(value.strip())
        if whole is not None:
            return lookup(whole)  # a whole-string reference keeps the value's JSON type
        return _KEYCHAIN_RE.sub(lambda m: _as_text(lookup(m)), value)
    if isinstance(value, Mapping):
        return {k: _substitute(v, entries, used) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_substitute(v, entries, used) for v in value]
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


async def resolve_keychain_refs(
    obj: Any,
    *,
    server: ServerAPI,
    catalog_id: str | None,
    execution_id: int,
    attempts: int = 0,
) -> tuple[Any, dict[str, str]]:
    """Replace ``{{ keychain.<name>.<field> }}`` in ``obj``; return it and the secrets used."""
    names: set[str] = set()
    _keychain_names(obj, names)
    if not names:
        return obj, {}
    if not catalog_id:
        raise CredentialError(
            f"keychain references ({', '.join(sorted(names))}) need the command's catalog_id,"
            " which is missing"
        )
    entries = {
        name: await _keychain_entry(name, server, catalog_id, execution_id, attempts)
        for name in sorted(names)
    }
    used: dict[str, str] = {}
    return _substitute(obj, entries, used), used
