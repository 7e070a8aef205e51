"""Python tool: a cold ``python -c`` subprocess per call vs the warm fork-server path.

Usage: PYTHONPATH=src python bench/python_tool.py [N]   (default N=200, sequential calls)

Both sides run the same trivial step (``def main(): return 1``) and return its JSON result; the
cold side is what a worker that starts an interpreter per step pays.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import trio

from noetl_worker import templating
from noetl_worker.config import Settings
from noetl_worker.tools import resolve
from noetl_worker.tools.base import ToolContext, ToolResources

CODE = "def main():\n    return 1\n"
COLD = f"import json\nns = {{}}\nexec({CODE!r}, ns)\nprint(json.dumps({{'result': ns['main']()}}))\n"


def cold(n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, check=True)
        assert json.loads(out.stdout)["result"] == 1
    return (time.perf_counter() - started) / n * 1000


async def warm(n: int) -> tuple[float, float]:
    resources = ToolResources()
    ctx = ToolContext(
        execution_id=1,
        step="bench",
        command_id="c",
        worker_id="w",
        server_url="http://127.0.0.1:1",
        variables={},
        secrets={},
        server=None,  # type: ignore[arg-type]  # the python tool never calls the server
        resources=resources,
        settings=Settings.from_env({}),
        render=lambda value: templating.render(value, {}),
    )
    tool = resolve("python")
    try:
        started = time.perf_counter()
        first = await tool({"code": CODE}, ctx)  # includes starting the fork server
        first_ms = (time.perf_counter() - started) * 1000
        assert first.data == 1
        started = time.perf_counter()
        for _ in range(n):
            result = await tool({"code": CODE}, ctx)
            assert result.data == 1, result
        return first_ms, (time.perf_counter() - started) / n * 1000
    finally:
        await resources.aclose()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    cold_ms = cold(n)
    first_ms, warm_ms = trio.run(warm, n)
    print(f"N={n} sequential calls of `def main(): return 1`")
    print(f"cold `python -c` subprocess : {cold_ms:7.2f} ms/call")
    print(f"warm fork server (tool run) : {warm_ms:7.2f} ms/call")
    print(f"first warm call incl. start : {first_ms:7.1f} ms")
    print(f"speed-up                    : {cold_ms / warm_ms:7.1f}x")


if __name__ == "__main__":
    main()
