"""Finding a step's processes from outside: every test step carries a unique marker variable."""

from __future__ import annotations

import os
import uuid


def new_marker() -> str:
    return f"noetl-test-{uuid.uuid4().hex}"


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries ``NOETL_TEST_MARKER=<marker>``."""
    needle = f"NOETL_TEST_MARKER={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if needle not in environ.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        if data[data.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X"):
            found.append(int(name))
    return found
