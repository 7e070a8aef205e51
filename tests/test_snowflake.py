from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from noetl_worker.config import fnv1a_64
from noetl_worker.snowflake import MAX_NODE, SnowflakeGenerator, decompose

EPOCH = 1_704_067_200_000


@given(node=st.integers(0, MAX_NODE), steps=st.lists(st.integers(-5_000, 5_000), min_size=1, max_size=300))
def test_ids_strictly_increase_even_when_the_clock_steps_back(node: int, steps: list[int]) -> None:
    now = [EPOCH + 10_000_000]

    def clock() -> int:
        return now[0]

    gen = SnowflakeGenerator(node, EPOCH, clock)
    last = -1
    for step in steps:
        now[0] += step
        for _ in range(3):
            new = gen.next_id()
            assert new > last
            assert 0 < new < 2**63  # positive int64: the server's bigint column
            assert decompose(new, EPOCH)[1] == node
            last = new


def test_layout_matches_the_servers() -> None:
    gen = SnowflakeGenerator(5, EPOCH, lambda: EPOCH + 1234)
    first, second = gen.next_id(), gen.next_id()
    assert first == (1234 << 22) | (5 << 12)
    assert decompose(second, EPOCH) == (EPOCH + 1234, 5, 1)


def test_more_than_4096_ids_in_one_millisecond_stay_unique() -> None:
    gen = SnowflakeGenerator(1, EPOCH, lambda: EPOCH + 50)
    ids = [gen.next_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)


def test_fnv1a_reference_values() -> None:
    # Published FNV-1a 64 test vectors.
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8
