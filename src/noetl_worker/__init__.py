"""noetl-worker: the NoETL worker on Trio structured concurrency."""

from __future__ import annotations

import sys

__version__ = "0.1.0"

# httpx's package import pulls in its command-line client (click, rich, pygments: +7.6 MiB of
# resident memory) whenever those happen to be installed, and falls back to a stub when the
# import fails. The worker never runs that client; marking the module missing makes every
# installation pay what the production image (which has none of them) pays.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
