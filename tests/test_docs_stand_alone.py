"""The project's code and docs stand alone: no pointers into files that are not in the
repository (the design notes and specifications it was built from), no private paths, no
references to issue numbers or branches a reader cannot see."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["src", "tests", "docs", "bench", "ops", "scripts", "README.md", "CHANGELOG.md"]
# Built from pieces so this file does not match itself.
FORBIDDEN = {
    "the design notes": re.compile("DESIGN" + r"(\.md)?\s*\u00a7|" + "DESIGN" + r"\.md"),
    "a section sign into a spec": re.compile(r"(?<!RFC \d{4} )(?<!RFC \d{3} )\u00a7"),
    "the spec folder": re.compile(r"\bspec" + "/"),
    "the shared folder": re.compile(r"\.\./" + "shared"),
    "an upstream notes file": re.compile("upstream-" + r"(rust|python)-[a-z]+\.md|trio-" + "notes"),
    "an issue number": re.compile(r"\bissue " + r"#?\d+", re.IGNORECASE),
    "a branch": re.compile(r"\bthis " + "branch", re.IGNORECASE),
    "a private path": re.compile(r"/work" + r"/|/root" + r"/|venv-" + "dev"),
}


def scanned_files() -> list[Path]:
    files: list[Path] = []
    for entry in SCANNED:
        path = ROOT / entry
        candidates = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files += [
            p
            for p in candidates
            if "__pycache__" not in p.parts
            and ".egg-info" not in str(p)
            and p.suffix not in (".pyc", ".whl")
            and p.name != "noetl-4.12.1-constraints.txt"
        ]
    return files


def test_code_and_docs_cite_nothing_outside_the_repository() -> None:
    found = []
    for path in scanned_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()[:120]}")
    assert found == [], "\n".join(found)
