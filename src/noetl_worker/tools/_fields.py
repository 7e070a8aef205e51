"""Small readers for tool configuration fields, so every tool reports bad input the same way."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ToolConfigError


def first(config: Mapping[str, Any], *names: str) -> tuple[str, Any] | None:
    """The first of ``names`` present with a non-null value, as ``(name, value)``."""
    for name in names:
        value = config.get(name)
        if value is not None:
            return name, value
    return None


def seconds(kind: str, config: Mapping[str, Any], *names: str) -> float | None:
    """A positive duration in seconds from the first present field (number or numeric string)."""
    found = first(config, *names)
    if found is None:
        return None
    name, value = found
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ToolConfigError(kind, name, f"{value!r} is not accepted: expected seconds > 0")
    return number


def flag(kind: str, config: Mapping[str, Any], *names: str, default: bool) -> bool:
    """A boolean from the first present field; accepts true/false and their usual spellings."""
    found = first(config, *names)
    if found is None:
        return default
    name, value = found
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ToolConfigError(kind, name, f"{value!r} is not accepted: expected true or false")


def choice(
    kind: str, config: Mapping[str, Any], name: str, accepted: tuple[str, ...], default: str | None
) -> str | None:
    """A case-insensitive choice among ``accepted`` (returned in its accepted spelling)."""
    value = config.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        for option in accepted:
            if value.strip().lower() == option.lower():
                return option
    raise ToolConfigError(kind, name, f"{value!r} is not accepted: expected one of {', '.join(accepted)}")
