"""The Redis broker's Lua scripts, shipped as package files (``broker/lua/*.lua``).

Every script names all its keys in KEYS (Dragonfly and Redis Cluster require it) and
takes the time from Redis itself (``TIME``), so node clock skew does not matter. Each
file documents its KEYS, ARGV and reply.
"""

from __future__ import annotations

import functools
from importlib.resources import files

__all__ = ["lua"]


@functools.cache
def lua(name: str) -> str:
    """The source of ``broker/lua/<name>.lua``."""
    return (files("revenge_ws.broker") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
