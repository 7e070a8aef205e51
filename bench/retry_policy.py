"""Bench: the worker's own retry loop (retry.RetryPolicy) against stamina's, on Trio.

What a retry costs besides the wait itself: the same failing call retried N times with every
wait set to zero, so only the policy's bookkeeping is timed (per attempt, CPU time). stamina is
not a dependency: install it next to the dev venv to run the comparison
(`.venv/bin/pip install stamina`); without it only the hand-written loop is measured.

    .venv/bin/python bench/retry_policy.py [attempts]
"""

from __future__ import annotations

import sys
import time

import trio

from noetl_worker.retry import RetryPolicy


class Flaky(Exception):
    pass


async def hand_written(attempts: int) -> int:
    policy = RetryPolicy(attempts=attempts, initial=0.0, cap=0.0)
    tries = 0
    attempt = 0
    while True:
        attempt += 1
        try:
            tries += 1
            raise Flaky
        except Flaky:
            if attempt >= policy.attempts:
                return tries
            await trio.sleep(policy.delay(attempt))


async def with_stamina(attempts: int) -> int:
    import stamina

    tries = 0
    try:
        async for attempt in stamina.retry_context(
            on=Flaky, attempts=attempts, timeout=None, wait_initial=0.0, wait_max=0.0, wait_jitter=0.0
        ):
            with attempt:
                tries += 1
                raise Flaky
    except Flaky:
        return tries
    raise AssertionError("stamina stopped retrying without re-raising")


def measure(name: str, fn: object, attempts: int) -> None:
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    tries = trio.run(fn, attempts)  # type: ignore[arg-type]
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started_wall
    assert tries == attempts
    print(f"{name:<19} {attempts} attempts: {cpu / attempts * 1e6:6.1f} µs CPU/attempt, {wall:.2f} s wall")


def main() -> None:
    attempts = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    measure("hand-written", hand_written, attempts)
    try:
        import stamina
    except ImportError:
        print("stamina             not installed: `.venv/bin/pip install stamina` to compare")
        return
    import stamina.instrumentation

    # Its default hook logs every retry (to stderr when logging is not set up): measure both.
    measure("stamina", with_stamina, attempts)
    stamina.instrumentation.set_on_retry_hooks([])
    measure("stamina (no hooks)", with_stamina, attempts)


if __name__ == "__main__":
    main()
