"""docs/configuration.md and the code stay in lockstep.

Every environment variable read anywhere in src/ (through config.Env methods, os.environ or
os.getenv, with a literal name) must have a row in the table, and every row must be read.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_METHODS = {"raw", "text", "integer", "seconds", "flag", "choice"}


NAME = re.compile(r"[A-Z][A-Z0-9_]+")
# config.py helpers whose second argument is the variable name.
NAMED_HELPERS = {"_bind", "_server_url", "_name", "_subject", "_name_list"}


def _is_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id in {"environ", "env_vars"}
    )


def _name_argument(node: ast.AST) -> ast.expr | None:
    """The expression naming the variable, if ``node`` reads one."""
    if isinstance(node, ast.Subscript) and _is_environ(node.value):
        # os.environ["X"] = … sets a variable for a child (the python step's HOME): not a read.
        return node.slice if isinstance(node.ctx, ast.Load) else None
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    if isinstance(func, ast.Name) and func.id in NAMED_HELPERS:
        return node.args[1] if len(node.args) > 1 else None
    if not isinstance(func, ast.Attribute):
        return None
    reads_env = isinstance(func.value, ast.Name) and func.value.id == "env" and func.attr in ENV_METHODS
    reads_environ = _is_environ(func.value) and func.attr in {"get", "pop", "setdefault"}
    if reads_env or reads_environ or func.attr == "getenv":
        return node.args[0]
    return None


def _literal_names(nodes: list[ast.expr]) -> set[str]:
    return {
        n.value
        for n in nodes
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and NAME.fullmatch(n.value)
    }


def names_read_in_code() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            argument = _name_argument(node)
            if argument is not None:
                names |= _literal_names([argument])
            # Loops over literal names: `for name in ("A", "B"): env.raw(name)`
            loops_over_names = isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple)
            if loops_over_names and any(
                _name_argument(inner) is not None for stmt in node.body for inner in ast.walk(stmt)
            ):
                names |= _literal_names(node.iter.elts)
    return names


def names_in_table() -> set[str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", text, flags=re.MULTILINE))


def test_every_variable_read_is_documented() -> None:
    missing = names_read_in_code() - names_in_table()
    assert not missing, f"read in src/ but not in docs/configuration.md: {sorted(missing)}"


def test_every_documented_variable_is_read() -> None:
    unused = names_in_table() - names_read_in_code()
    assert not unused, f"in docs/configuration.md but never read in src/: {sorted(unused)}"


def test_the_scan_sees_the_core_variables() -> None:
    # Guards the scanner itself: if it silently found nothing, both tests above would pass.
    assert {
        "WORKER_ID",
        "NATS_URL",
        "NOETL_SNOWFLAKE_NODE_ID",
        "HOSTNAME",
        "RUST_LOG",
    } <= names_read_in_code()
