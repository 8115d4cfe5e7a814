"""Reading what the hub sends: JSON frames, numbers that are not booleans, the headers and
welcome fields that advise a reconnect window."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

import orjson


def decode(raw: Any) -> dict[str, Any] | None:
    """A JSON object, or None for anything else."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def is_num(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def header_seconds(headers: Any, name: str) -> float | None:
    """A header holding seconds (``Retry-After``, ``Reconnect-Window``); None when absent
    or not a number (an HTTP-date ``Retry-After`` falls back to the backoff)."""
    if headers is None:
        return None
    value = headers.get(name)
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def welcome_window(data: Mapping[str, Any], maximum: float) -> float | None:
    """A restart window advised in the welcome: ``restart_window`` (s) at the top
    level or under ``reconnect``."""
    value = data.get("restart_window")
    reconnect = data.get("reconnect")
    if value is None and isinstance(reconnect, Mapping):
        value = reconnect.get("restart_window")
    if not is_num(value):
        return None
    return float(min(max(float(value), 0.0), maximum))
