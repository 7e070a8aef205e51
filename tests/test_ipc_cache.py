from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from noetl_worker.ipc_cache import (
    ARROW_MEDIA_TYPE,
    EncodedPayload,
    IpcCache,
    IpcHintError,
    encode_payload,
    read_hint,
)

SHM = Path("/dev/shm")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> Iterator[IpcCache]:
    namespace = f"t{os.getpid() % 100000}"
    cache = IpcCache(1000, "node-a", "worker-1", namespace=namespace, clock=clock)
    yield cache
    cache.close()
    assert not list(SHM.glob(f"{namespace}_*")), "close() must unlink every segment"


def payload(size: int, fill: bytes = b"x") -> EncodedPayload:
    return EncodedPayload(fill * size, "application/json", "json")


def test_tabular_results_become_arrow_streams() -> None:
    encoded = encode_payload({"status": "success", "data": {"rows": [{"a": 1}, {"a": 2}]}})
    assert (encoded.media_type, encoded.schema_digest, encoded.row_count) == (
        ARROW_MEDIA_TYPE,
        "arrow",
        2,
    )
    encoded = encode_payload({"columns": ["a", "b"], "rows": [[1, "x"], [2, "y"]]})
    assert encoded.row_count == 2


@pytest.mark.parametrize(
    "result",
    [
        {"status": "success", "data": {"rows": []}},
        {"data": {"rows": [[1, 2]]}},  # list rows without columns
        {"data": {"rows": [{"a": 1}, {"a": "text"}]}},  # Arrow cannot type the column
        {"data": [1, 2, 3]},
    ],
)
def test_other_results_stay_json(result: dict[str, object]) -> None:
    encoded = encode_payload(result)
    assert encoded.schema_digest == "json"
    assert json.loads(encoded.data) == result


def test_put_and_another_process_reads_arrow(cache: IpcCache, clock: FakeClock) -> None:
    rows = [{"id": i, "name": f"n{i}"} for i in range(50)]
    cache.budget_bytes = 1 << 20
    hint = cache.put(encode_payload({"data": {"rows": rows}}))
    assert hint is not None
    hint_json = hint.to_json()
    assert hint_json["shm_name"].startswith(cache.namespace + "_")
    assert list(hint_json) == [
        "kind", "shm_name", "schema_digest", "byte_length", "row_count", "producer",
        "node_id", "lease_expires_at", "media_type",
    ]  # fmt: skip
    script = (
        "import json, sys, pyarrow as pa\n"
        "from noetl_worker.ipc_cache import read_hint\n"
        "hint = json.loads(sys.argv[1])\n"
        "data = read_hint(hint, node_id='node-a', now=float(sys.argv[2]))\n"
        "table = pa.ipc.open_stream(data).read_all()\n"
        "print(json.dumps(table.to_pylist()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(hint_json), str(clock.now)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    assert json.loads(done.stdout) == rows
    assert done.stderr == ""  # no resource_tracker "leaked shared_memory" warnings
    # the reader did not unlink it; the producer still owns it
    assert (SHM / hint.shm_name).exists()


def test_eviction_takes_earliest_lease_first(cache: IpcCache, clock: FakeClock) -> None:
    first = cache.put(payload(400, b"a"))
    clock.now += 1
    second = cache.put(payload(400, b"b"))
    clock.now += 1
    third = cache.put(payload(400, b"c"))  # 1200 > 1000: the first must go
    assert first and second and third
    assert cache.names() == [second.shm_name, third.shm_name]
    assert not (SHM / first.shm_name).exists()
    assert cache.used_bytes == 800


def test_payload_over_budget_is_refused(cache: IpcCache) -> None:
    kept = cache.put(payload(10))
    assert cache.put(payload(1001)) is None
    assert kept is not None and cache.names() == [kept.shm_name]


def test_sweep_unlinks_expired_entries(cache: IpcCache, clock: FakeClock) -> None:
    assert cache.empty  # the maintenance loop skips its sweep (and its thread) then
    hint = cache.put(payload(10))
    assert hint is not None and not cache.empty
    clock.now += 59
    assert cache.sweep() == 0
    clock.now += 2
    assert cache.sweep() == 1
    assert not (SHM / hint.shm_name).exists()
    assert cache.used_bytes == 0 and cache.empty


def test_identical_payloads_get_distinct_names(cache: IpcCache) -> None:
    one, two = cache.put(payload(10)), cache.put(payload(10))
    assert one and two and one.shm_name != two.shm_name


def test_read_hint_refusals(cache: IpcCache, clock: FakeClock) -> None:
    hint = cache.put(payload(10, b"z"))
    assert hint is not None
    good = hint.to_json()
    assert read_hint(good, node_id="node-a", now=clock.now) == b"z" * 10
    with pytest.raises(IpcHintError, match="node 'node-a', this is 'node-b'"):
        read_hint(good, node_id="node-b", now=clock.now)
    with pytest.raises(IpcHintError, match="lease expired"):
        read_hint(good, node_id="node-a", now=clock.now + 61)
    with pytest.raises(IpcHintError, match="shm_name"):
        read_hint({**good, "shm_name": "../etc/passwd"}, node_id="node-a", now=clock.now)
    with pytest.raises(IpcHintError, match="kind"):
        read_hint({**good, "kind": "result_ref"}, node_id="node-a", now=clock.now)
    cache.close()
    with pytest.raises(IpcHintError, match="gone"):
        read_hint(good, node_id="node-a", now=clock.now)


def test_namespace_is_sanitised(clock: FakeClock) -> None:
    cache = IpcCache(100, "n", "p", namespace="my-name.space!too-long", clock=clock)
    assert cache.namespace == "mynamespacet"


def test_orphans_of_a_crashed_process_are_swept_after_the_lease(cache: IpcCache) -> None:
    script = (
        "import sys\n"
        "from noetl_worker.ipc_cache import IpcCache, EncodedPayload\n"
        f"cache = IpcCache(100, 'n', 'p', namespace='{cache.namespace}')\n"
        "print(cache.put(EncodedPayload(b'x' * 10, 'application/json', 'json')).shm_name)\n"
        "import os; os._exit(0)  # a crash: no close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    orphan = done.stdout.strip()
    assert done.returncode == 0 and (SHM / orphan).exists()
    own = cache.put(payload(10))
    assert own is not None
    cache.clock = lambda: os.stat(SHM / orphan).st_mtime + 30  # within the lease
    assert cache.sweep_orphans() == 0
    cache.clock = lambda: os.stat(SHM / orphan).st_mtime + 61
    assert cache.sweep_orphans() == 1
    assert not (SHM / orphan).exists() and (SHM / own.shm_name).exists()
