"""How fast the SQL splitter is on a large script: python bench/sql_splitter.py [statements]."""

from __future__ import annotations

import sys
import time

sys.path.insert(0, "src")

from noetl_worker.tools._sql import split_statements

STATEMENT = (
    "INSERT INTO t (id, note, body) VALUES (1, 'it''s; here', $$dollar; $x$ quoted$$)"
    " /* c; */ -- trailing; comment\n"
)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    script = ";\n".join([STATEMENT] * count)
    started = time.perf_counter()
    statements = split_statements(script)
    elapsed = time.perf_counter() - started
    assert len(statements) == count
    size = len(script) / 1e6
    print(f"{count} statements, {size:.2f} MB: {elapsed:.3f} s ({size / elapsed:.1f} MB/s)")


if __name__ == "__main__":
    main()
