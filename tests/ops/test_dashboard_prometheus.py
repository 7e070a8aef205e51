"""The Grafana dashboard's PromQL against a real Prometheus scraping a real worker.

A worker runs commands against the stub server (success, a shell error, a poison message, an
event delivery retried after a 503); a Prometheus server (Debian's ``prometheus`` package, which
``.ci/run`` installs) scrapes its ``/metrics`` every second with a plain static config — no
Kubernetes labels, no relabeling — and every panel's query, with Grafana's variables set to
"All" or to one pool, must be accepted and return series.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from _ops import v
from tests.conftest import poll_until

from noetl_worker.config import Settings
from noetl_worker.testing import Publisher, StubServer, open_worker
from noetl_worker.testing.nats_server import free_port

# Targets that legitimately return nothing here: no task restarted, no notification skipped.
MAY_BE_EMPTY = {("Supervised task restarts", 0), ("Poison messages and skipped notifications (/s)", 1)}


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise v.ToolMissing("prometheus not found; install it with `apt-get install prometheus` (Debian)")
    return found


@asynccontextmanager
async def open_prometheus(target: str, tmp: Path) -> AsyncIterator[str]:
    """A Prometheus server scraping ``target`` every second; yields its base URL."""
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: noetl-worker\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    log = (tmp / "prometheus.log").open("w")
    process = await trio.lowlevel.open_process(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10) as waited:
                await process.wait()
            if waited.cancelled_caught:
                process.kill()
                await process.wait()
        log.close()


async def query(client: httpx.AsyncClient, base: str, expr: str) -> list[Any]:
    answer = await client.get(f"{base}/api/v1/query", params={"query": expr})
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


async def wait_for_scrapes(client: httpx.AsyncClient, base: str, count: int) -> None:
    while True:
        try:
            result = await query(client, base, "count_over_time(up[1m])")
        except (httpx.TransportError, AssertionError, ValueError):  # starting: no answer / not JSON yet
            result = []
        if result and float(result[0]["value"][1]) >= count:
            up = await query(client, base, "up")
            assert up[0]["value"][1] == "1", "Prometheus cannot scrape the worker"
            return
        await trio.sleep(0.25)


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    stub: StubServer, publisher: Publisher, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(
        WORKER_POOL_NAME="shared", NATS_FILTER_SUBJECT="", WORKER_NATS_LAG_POLL_INTERVAL="0.2"
    )
    ok = stub.state.enqueue_command(step="ok", tool_kind="noop", tool_config={})
    bad = stub.state.enqueue_command(step="bad", tool_kind="shell", tool_config={"command": "exit 1"})
    stub.state.inject("POST", r"^/api/events", 503, times=1, retry_after=0.1)
    with trio.fail_after(90):
        async with open_worker(settings) as worker:
            subject = "noetl.commands.shared.1"
            for cmd in (ok, bad):
                await publisher.publish_command(cmd.notification(stub.url), subject=subject)
            await publisher.publish(subject, b"not a notification")
            await stub.state.wait_terminal([ok, bad], timeout=30)
            metrics = worker.runtime.metrics  # type: ignore[union-attr]
            await poll_until(
                lambda: (metrics.registry.get_sample_value("noetl_worker_poison_messages_total") or 0) > 0
            )
            target = worker.urls[0].split("://", 1)[1].rstrip("/")
            async with open_prometheus(target, tmp_path) as base, httpx.AsyncClient(timeout=10) as client:
                await wait_for_scrapes(client, base, 3)
                # Every target: data with $pool at All and at this worker's pool, none for another
                # pool (so each panel really filters by the label the worker exports).
                problems = []
                for title, exprs in v.dashboard_queries().items():
                    for index, expr in enumerate(exprs):
                        for pool, wanted in ((".*", True), ("shared", True), ("system", False)):
                            plain = v.promql(expr.replace("$pool", pool))
                            got = bool(await query(client, base, plain))
                            if got != wanted and not (wanted and (title, index) in MAY_BE_EMPTY):
                                problems.append(f"{title}[{index}] pool={pool}: data={got}: {plain}")
                assert problems == [], "\n".join(problems)

                # $pool: the worker's own label, found without any relabeling ...
                answer = await client.get(
                    f"{base}/api/v1/label/worker_pool/values",
                    params={"match[]": "noetl_worker_concurrency_limit"},
                )
                assert answer.json()["data"] == ["shared"]
                # ... and selecting a pool filters every panel.
                throughput = next(
                    e for t, es in v.dashboard_queries().items() if t.startswith("Commands by") for e in es
                )
                for pool, expected in (("shared", True), ("system", False)):
                    expr = v.promql(throughput.replace("$pool", pool))
                    assert bool(await query(client, base, expr)) is expected, pool
                statuses = {s["metric"]["status"] for s in await query(client, base, v.promql(throughput))}
                assert statuses == {"success", "error"}
                retries = await query(client, base, "noetl_worker_event_emit_retries_total")
                assert retries, "the injected 503 produced no emit retry"


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    import json

    board = json.loads(v.DASHBOARD.read_text())
    board["panels"][0]["targets"][0]["expr"] = (
        "sum by (pool) (rate(noetl_worker_pulls_total[$__rate_interval])"
    )
    broken = tmp_path / "board.json"
    broken.write_text(json.dumps(board))
    assert v.promtool_check() == []
    problems = " ".join(v.promtool_check(broken))
    assert "dashboard:panel0:query0" in problems or "unclosed" in problems or "parse error" in problems, (
        problems
    )


@pytest.mark.parametrize("binary", ["promtool", "prometheus"])
def test_prometheus_tools_are_installed(binary: str) -> None:
    assert shutil.which(binary), f"{binary} missing: .ci/run installs Debian's prometheus package"
