"""One shallow exception hierarchy for the whole worker.

Adapter modules (``bus``, ``control_plane``, tool modules) translate library exceptions
(nats-py, httpx, psycopg, ...) into these at their boundary, so ``dispatch`` and ``service``
never see a third-party exception type.
"""

from __future__ import annotations


def describe(exc: BaseException) -> str:
    """A library exception as ``Type: message`` (just ``Type`` when it has no message), the text
    the adapters wrap when they translate it."""
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class WorkerError(Exception):
    """Base class of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """A configuration value is invalid. The worker exits with code 2 on it at start.

    The message always names the variable, the value given and what is accepted.
    """

    def __init__(self, variable: str, value: str, accepted: str) -> None:
        self.variable = variable
        self.value = value
        self.accepted = accepted
        super().__init__(f"{variable}={value!r} is invalid: expected {accepted}")


class BusError(WorkerError):
    """NATS / JetStream failed (disconnected, API error, timeout). Retried by the caller."""


class NotificationError(WorkerError):
    """A NATS message is not a valid command notification (a poison message: terminated)."""


class ControlPlaneError(WorkerError):
    """The NoETL server could not be reached or answered with an error."""


class TransportError(ControlPlaneError):
    """No HTTP answer at all: connection refused, reset, timed out. Always retryable."""


class HTTPStatusError(ControlPlaneError):
    """The server answered with a non-2xx status."""

    def __init__(self, status: int, body: str, *, retry_after: float | None = None) -> None:
        self.status = status
        self.body = body
        self.retry_after = retry_after
        super().__init__(f"HTTP {status}: {body[:500]}")

    @property
    def retryable(self) -> bool:
        return is_retryable_status(self.status)


def is_retryable_status(status: int) -> bool:
    """Statuses where a later retry can help (408, 425, 429, 5xx); every other 4xx is final."""
    return status in (408, 425, 429) or status >= 500


class ToolError(WorkerError):
    """A tool failed to run at all (as opposed to returning a result with status ``error``).

    Reported as ``call.error`` + ``command.failed``.
    """


class ToolConfigError(ToolError):
    """A tool's configuration is invalid: names the field and what is accepted."""

    def __init__(self, kind: str, field: str, problem: str) -> None:
        self.kind = kind
        self.field = field
        self.problem = problem
        super().__init__(f"Configuration error: {kind}.{field}: {problem}")


class TemplateError(ToolError):
    """A Jinja template in a tool's configuration could not be rendered.

    A ``ToolError`` rather than a ``ToolConfigError``: the renderer is shared by every tool and by
    dispatch and does not know which tool kind or field it is rendering, while
    ``ToolConfigError`` requires both. Dispatch treats the two alike (``call.error`` +
    ``command.failed``, never retried). ``template`` holds the template text (truncated).
    """

    def __init__(self, template: str, problem: str) -> None:
        self.template = template if len(template) <= 500 else template[:500] + "…"
        self.problem = problem
        super().__init__(f"Template error: {problem} in {self.template!r}")


class CredentialError(ToolError):
    """A credential alias or keychain reference could not be resolved before dispatch.

    ``retryable``: a transient failure (408/425/429/502/503/504 or no answer) on an early
    attempt — report nothing and let the server re-issue the command. Otherwise terminal:
    ``call.error`` + ``command.failed``.
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        self.retryable = retryable
        super().__init__(message)
