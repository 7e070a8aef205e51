"""Runs every selected case on both stacks at once (the server, not the worker, sets the pace of
one execution, so executions overlap), then hands each test its two runs. The selection is the
cases the session collected (``-k websocket`` runs that playbook only); all of them by default."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import attrs

from .cases import CASES, Case, Env
from .harness import Run, Stack
from .target import Target

# per stack; the real server runs the engine for event batches one at a time, so more only queue
CONCURRENCY = 4


@attrs.define
class Runner:
    stacks: dict[str, Stack]
    target: Target
    pool: ThreadPoolExecutor = attrs.field(factory=lambda: ThreadPoolExecutor(max_workers=2 * CONCURRENCY))
    futures: dict[tuple[str, str], Future[Run]] = attrs.field(factory=dict)
    cases: tuple[Case, ...] = CASES

    def env(self, worker: str) -> Env:
        stack = self.stacks[worker]
        return Env(target=self.target, data_dir=stack.workdir / "data", stack=stack)

    def payload(self, case: Case, worker: str) -> dict[str, object]:
        return {
            "base_url": self.target.url,
            "mcp_url": self.target.mcp_url,
            "ws_url": self.target.ws_url,
            "data_dir": str(self.env(worker).data_dir),
            "nats_url": self.stacks[worker].nats_url,  # the stack's own NATS, for nats steps
            **case.payload,
        }

    def start_all(self) -> None:
        if self.futures:
            return
        for stack in self.stacks.values():
            for case in self.cases:
                for child in case.children:
                    stack.register((case.path.parent / f"{child}.yaml").read_text())
        # interleave the workers so both make progress from the start
        for case in self.cases:
            for worker in self.stacks:
                self.futures[(case.name, worker)] = self.pool.submit(self._run, case, worker)

    def _run(self, case: Case, worker: str) -> Run:
        return self.stacks[worker].run(
            case.content(), self.payload(case, worker), timeout=case.timeout, worker=worker
        )

    def get(self, case: Case, worker: str) -> Run:
        self.start_all()
        key = (case.name, worker)
        if key not in self.futures:  # a case outside the selection (not expected)
            for child in case.children:
                self.stacks[worker].register((case.path.parent / f"{child}.yaml").read_text())
            self.futures[key] = self.pool.submit(self._run, case, worker)
        return self.futures[key].result(timeout=case.timeout + 120)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
