"""``ops/validate.py`` loaded once for every test module here (it is a script, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load_validate() -> ModuleType:
    if "ops_validate" in sys.modules:
        return sys.modules["ops_validate"]
    path = Path(__file__).resolve().parents[2] / "ops" / "validate.py"
    spec = importlib.util.spec_from_file_location("ops_validate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ops_validate"] = module
    spec.loader.exec_module(module)
    return module


v = _load_validate()
