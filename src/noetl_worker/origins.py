"""Server-URL policy: which NoETL servers the worker will talk to.

A notification names the server of its command (``server_url``). Anyone who can publish on the
command subject chooses that value, and the worker sends the claim, the events, result PUTs and
credential look-ups there — with ``Authorization: Bearer $NOETL_INTERNAL_API_TOKEN``. So a
``server_url`` is accepted only when it is an ``http``/``https`` URL that parses and whose
*origin* (scheme, host, port) is on the allowlist (``NOETL_SERVER_URL_ALLOWLIST``; by default
just the origin of ``NOETL_SERVER_URL``). See docs/security.md.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .errors import WorkerError

_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 2048


class ServerURLError(WorkerError):
    """A server URL is not an http(s) URL that parses, or its origin is not allowed."""


def origin_of(url: str) -> str:
    """``scheme://host[:port]``, lower-cased, default port dropped; raises ServerURLError."""
    if len(url) > MAX_URL_LENGTH:
        raise ServerURLError(f"URL is {len(url)} characters long (at most {MAX_URL_LENGTH})")
    if not url.isascii() or any(ch.isspace() or ord(ch) < 0x20 or ch == "\x7f" for ch in url):
        raise ServerURLError("URL contains whitespace, control or non-ASCII characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise ServerURLError(f"URL does not parse: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ServerURLError(f"scheme {parts.scheme!r} is not allowed (only http and https)")
    if not host:
        raise ServerURLError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ServerURLError("URL carries credentials (user:password@)")
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def check_allowed(url: str, allowed: frozenset[str]) -> str:
    """The URL's origin when it is allowed; raises ServerURLError naming why not."""
    origin = origin_of(url)
    if origin not in allowed:
        raise ServerURLError(f"origin {origin} is not in NOETL_SERVER_URL_ALLOWLIST")
    return origin
