"""Prometheus metrics: the Rust worker's command-worker inventory (same names, types, labels and
buckets — dashboards and alerts keep working) plus a few of our own, all in one registry."""

from __future__ import annotations

import platform

import attrs
import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

from . import __version__

# `_created` series double the exposition for nothing a dashboard uses; the Rust worker has none.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PULL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DISPATCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
EMIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
PUT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PULL_OUTCOMES = ("claimed", "already_claimed", "retry_later", "failed")
# noetl_worker_commands_total{status}: the tool's own statuses, `failed` (no result: the tool raised,
# its config was invalid, a pre-dispatch step such as a credential failed, or a case said `fail`) and
# `cancelled` (the drain deadline cancelled it before it had an outcome; the message is nak'd).
COMMAND_STATUSES = ("success", "error", "timeout", "failed", "cancelled")
# Statuses that also count in noetl_worker_dispatch_errors_total: every outcome but success and
# cancelled (a drain hand-back is not the command's failure; another worker runs it).
ERROR_STATUSES = frozenset({"error", "timeout", "failed"})


@attrs.define(eq=False, slots=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.pulls = Counter(
            "noetl_worker_pulls_total",
            "Claim calls that got an HTTP answer, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.pull_duration = Histogram(
            "noetl_worker_pull_duration_seconds",
            "Receive + claim time of one notification.",
            buckets=PULL_BUCKETS,
            registry=r,
        )
        self.dispatch_duration = Histogram(
            "noetl_worker_dispatch_duration_seconds",
            "Time from claim to the terminal event, by tool kind.",
            ["tool_kind"],
            buckets=DISPATCH_BUCKETS,
            registry=r,
        )
        self.dispatch_errors = Counter(
            "noetl_worker_dispatch_errors_total",
            "Commands whose outcome was not success: status error, timeout or failed, by tool kind.",
            ["tool_kind"],
            registry=r,
        )
        self.emit_duration = Histogram(
            "noetl_worker_event_emit_duration_seconds",
            "Time to deliver one event (retries included), by event type.",
            ["event_type"],
            buckets=EMIT_BUCKETS,
            registry=r,
        )
        self.emit_retries = Counter(
            "noetl_worker_event_emit_retries_total",
            "Event deliveries retried, by event type.",
            ["event_type"],
            registry=r,
        )
        self.concurrent = Gauge("noetl_worker_concurrent_dispatches", "Commands running now.", registry=r)
        # Ours: the configured ceiling of the gauge above, so saturation can be graphed; its
        # worker_pool label also lets the dashboard select a pool without the chart's relabeling.
        self.concurrency_limit = Gauge(
            "noetl_worker_concurrency_limit",
            "Commands this worker may run at once (WORKER_MAX_CONCURRENT), by pool.",
            ["worker_pool"],
            registry=r,
        )
        self.consumer_pending = Gauge(
            "noetl_worker_nats_consumer_pending",
            "Messages not yet delivered by the consumer.",
            ["stream", "consumer"],
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            "noetl_worker_nats_consumer_ack_pending",
            "Messages delivered and not yet acked.",
            ["stream", "consumer"],
            registry=r,
        )
        self.put_duration = Histogram(
            "noetl_worker_result_store_put_duration_seconds",
            "Durable result-store PUT time.",
            buckets=PUT_BUCKETS,
            registry=r,
        )
        self.put_bytes = Counter(
            "noetl_worker_result_store_put_bytes_total",
            "Bytes of successful durable result PUTs.",
            registry=r,
        )
        self.put_errors = Counter(
            "noetl_worker_result_store_put_errors_total", "Failed durable result PUTs.", registry=r
        )
        self.skipped_pending_callback = Counter(
            "noetl_worker_call_done_skipped_pending_callback_total",
            "call.done left to an external callback, by tool kind.",
            ["tool_kind"],
            registry=r,
        )
        # Ours (not in the Rust inventory).
        self.poison = Counter(
            "noetl_worker_poison_messages_total",
            "NATS messages terminated because they are not valid notifications.",
            registry=r,
        )
        self.skipped = Counter(
            "noetl_worker_notifications_skipped_total",
            "Notifications acked without a claim, by reason.",
            ["reason"],
            registry=r,
        )
        self.commands = Counter(
            "noetl_worker_commands_total",
            "Commands finished, by tool kind and status (success, error, timeout, failed, cancelled).",
            ["tool_kind", "status"],
            registry=r,
        )
        self.restarts = Counter(
            "noetl_worker_task_restarts_total",
            "Supervised background tasks restarted after an error, by task.",
            ["task"],
            registry=r,
        )
        self.tool_operations = Counter(
            "noetl_worker_tool_operations_total",
            "Operations run by the nats, mcp, result_fetch, transfer and websocket tools,"
            " by tool kind, operation and status.",
            ["tool_kind", "operation", "status"],
            registry=r,
        )
        self.transfer_rows = Counter(
            "noetl_worker_transfer_rows_total",
            "Rows moved by the transfer tool, by direction (read, written).",
            ["direction"],
            registry=r,
        )
        self.events_stream_clients = Gauge(
            "noetl_worker_events_stream_clients", "Clients connected to GET /events now.", registry=r
        )
        self.events_stream_dropped = Counter(
            "noetl_worker_events_stream_dropped_total",
            "GET /events clients disconnected because they fell behind (queue full).",
            registry=r,
        )
        self.ready = Gauge("noetl_worker_ready", "1 when /readyz answers 200.", registry=r)
        self.server_url_rejected = Counter(
            "noetl_worker_server_url_rejected_total",
            "Notifications terminated because their server_url names an origin not allowed.",
            registry=r,
        )
        self.nats_connected = Gauge(
            "noetl_worker_nats_connected", "1 while the NATS connection is up.", registry=r
        )
        self.nats_reconnects = Counter(
            "noetl_worker_nats_reconnects_total",
            "Times the NATS connection came back after being lost.",
            registry=r,
        )
        self.build_info = Info("noetl_worker_build", "Version of this worker and its Python.", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        # process_* (RSS, fds, CPU, start time) and python_* like any Prometheus Python service.
        ProcessCollector(registry=r)
        r.register(PLATFORM_COLLECTOR)
        r.register(GC_COLLECTOR)
        for outcome in PULL_OUTCOMES:
            self.pulls.labels(outcome)

    def command_finished(self, tool_kind: str, status: str) -> None:
        """One command's outcome: ``commands_total`` and, unless success/cancelled, dispatch errors."""
        self.commands.labels(tool_kind, status).inc()
        if status in ERROR_STATUSES:
            self.dispatch_errors.labels(tool_kind).inc()

    @staticmethod
    def kind_label(kind: str) -> str:
        """The ``tool_kind`` label for a kind named by a claim answer (untrusted): a registered
        kind, else ``unknown`` — label values, and so series, stay bounded."""
        from . import tools

        return kind if kind in tools.kinds() else "unknown"

    def put_ok(self, seconds: float, nbytes: int) -> None:
        self.put_duration.observe(seconds)
        self.put_bytes.inc(nbytes)

    def put_failed(self) -> None:
        self.put_errors.inc()

    def tool_operation(self, kind: str, operation: str, status: str) -> None:
        self.tool_operations.labels(kind, operation, status).inc()

    def transfer_rows_moved(self, read: int, written: int) -> None:
        self.transfer_rows.labels("read").inc(read)
        self.transfer_rows.labels("written").inc(written)
