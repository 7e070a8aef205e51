"""docs/deployment.md's walkthrough: its values render for both pools and pass the strict
Kubernetes schemas (kubernetes-validate --strict) and the CRD models; what the page says they
produce is what they produce."""

from __future__ import annotations

import re
import textwrap
from typing import Any

import pytest
from _ops import v

DOC = v.ROOT / "docs" / "deployment.md"


def walkthrough_values() -> dict[str, Any]:
    text = DOC.read_text()
    match = re.search(r"<!-- walkthrough-values -->\n(\s*)```yaml\n(.*?)\n\s*```", text, flags=re.DOTALL)
    assert match, "docs/deployment.md has no <!-- walkthrough-values --> yaml block"
    values: dict[str, Any] = v._yaml().safe_load(textwrap.dedent(match.group(2)))
    return values


def render_pool(pool: str) -> list[dict[str, Any]]:
    values = v.load_values(v.OPS / "helm" / f"values-{pool}.yaml", overrides=walkthrough_values())
    docs: list[dict[str, Any]] = v.render(values, release=v.release_name(pool))
    return docs


@pytest.mark.parametrize("pool", v.POOLS)
def test_walkthrough_values_render_and_pass_strict_schemas(pool: str) -> None:
    docs = render_pool(pool)
    assert sorted(d["kind"] for d in docs) == [
        "PodDisruptionBudget",
        "ScaledObject",
        "Service",
        "Service",
        "ServiceMonitor",
        "StatefulSet",
    ]
    for version in v.KUBE_VERSIONS:
        assert v.validate_kubernetes(docs, version) == []


@pytest.mark.parametrize("pool", v.POOLS)
def test_walkthrough_produces_what_the_page_says(pool: str) -> None:
    docs = render_pool(pool)
    env = v.env_of(docs)
    text = " ".join(DOC.read_text().split())
    cache, python_mb = (
        env["NOETL_IPC_CACHE_BUDGET_BYTES"]["value"],
        env["NOETL_PYTHON_MEMORY_LIMIT_MB"]["value"],
    )
    assert f"NOETL_IPC_CACHE_BUDGET_BYTES={cache}" in text
    assert f"NOETL_PYTHON_MEMORY_LIMIT_MB={python_mb}" in text
    endpoint = v.find(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"][
        "natsServerMonitoringEndpoint"
    ]
    assert f"`{endpoint}`" in text
    assert env["NATS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "nats-worker-auth", "key": "password"}
    }
    assert env["NOETL_KEYCHAIN_ENV_VARS"]["value"] == "OPENAI_API_KEY"
    assert env["WORKER_POOL_NAME"]["value"] == pool
    node_id = env["NOETL_SNOWFLAKE_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert node_id == "metadata.labels['apps.kubernetes.io/pod-index']"
    # The contract holds except the sizes, which the walkthrough raises on purpose for two slots.
    assert sorted(v.check_workload_contract(docs, kind="StatefulSet", pool=pool)) == [
        "resources.limits: expected ('500m', '256Mi'), got ('1', '512Mi')",
        "resources.requests: expected ('100m', '128Mi'), got ('100m', '256Mi')",
    ]
