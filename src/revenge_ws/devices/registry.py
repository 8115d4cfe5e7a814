"""Where devices are found cluster-wide: the registry interface and its in-process form.

A *record* is a device object (contract v1.1 §13) plus two routing fields, ``session_id``
(the connection that is the device) and ``node_id`` (the node holding it). The node that
holds a device is its only writer; everyone else reads.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Any, Literal, Protocol

__all__ = ["DeviceRegistry", "MemoryDeviceRegistry", "Record", "public"]

Record = dict[str, Any]
#: The routing fields of a record, not part of the device object clients see.
ROUTING = ("session_id", "node_id")


def public(record: Record) -> dict[str, Any]:
    """The device object of ``record`` (without its routing fields)."""
    return {k: v for k, v in record.items() if k not in ROUTING}


class DeviceRegistry(Protocol):
    """The cluster's devices, keyed by ``(user_id, device_id)``.

    Guarantees every implementation keeps:

    * :meth:`claim` is atomic: of two concurrent claims of one device, each gets the
      record it replaced, so exactly one connection is told it was taken over.
    * :meth:`refresh` and :meth:`remove` change a record only while it still names the
      caller's ``session_id``: a node never overwrites or deletes a device that another
      connection took over.
    * Records of a node that stops refreshing them (SIGKILL) disappear by themselves
      within the registry's TTL and are then returned once, by one caller, from
      :meth:`expired`. The in-process registry dies with its process and never expires.
    """

    async def claim(self, record: Record) -> Record | None:
        """Store ``record`` as its device's holder; the record it replaced, if any."""
        ...

    async def refresh(self, records: Iterable[Record]) -> builtins.list[Record]:
        """Re-write (and keep alive) records this node holds; the ones it lost to
        another session are returned (and left as they are)."""
        ...

    async def remove(self, user_id: str, device_id: str, session_id: str) -> bool:
        """Forget the device if ``session_id`` still holds it; whether it did."""
        ...

    async def get(self, user_id: str, device_id: str) -> Record | None: ...

    async def list(self, user_id: str) -> builtins.list[Record]: ...

    async def list_all(self, limit: int) -> builtins.list[Record]:
        """Up to ``limit`` records of every user."""
        ...

    async def owner(self, device_id: str) -> str | None:
        """A user holding a device named ``device_id`` (to tell FORBIDDEN from NOT_FOUND)."""
        ...

    async def expired(self, limit: int) -> builtins.list[Record]:
        """Records whose holder stopped refreshing them, each returned once."""
        ...

    @property
    def kind(self) -> Literal["memory", "redis"]: ...


class MemoryDeviceRegistry:
    """The registry of a single node (``memory://`` broker): plain dictionaries."""

    kind: Literal["memory", "redis"] = "memory"

    def __init__(self) -> None:
        self._devices: dict[str, dict[str, Record]] = {}
        self._owners: dict[str, str] = {}

    async def claim(self, record: Record) -> Record | None:
        user, dev = record["user_id"], record["device_id"]
        devices = self._devices.setdefault(user, {})
        previous = devices.get(dev)
        devices[dev] = record
        self._owners[dev] = user
        return previous

    async def refresh(self, records: Iterable[Record]) -> builtins.list[Record]:
        lost = []
        for record in records:
            devices = self._devices.setdefault(record["user_id"], {})
            held = devices.get(record["device_id"])
            if held is not None and held["session_id"] != record["session_id"]:
                lost.append(record)
            else:
                devices[record["device_id"]] = record
                self._owners[record["device_id"]] = record["user_id"]
        return lost

    async def remove(self, user_id: str, device_id: str, session_id: str) -> bool:
        devices = self._devices.get(user_id)
        held = devices.get(device_id) if devices else None
        if devices is None or held is None or held["session_id"] != session_id:
            return False
        del devices[device_id]
        if not devices:
            del self._devices[user_id]
        if self._owners.get(device_id) == user_id:
            del self._owners[device_id]
        return True

    async def get(self, user_id: str, device_id: str) -> Record | None:
        return self._devices.get(user_id, {}).get(device_id)

    async def list(self, user_id: str) -> builtins.list[Record]:
        return builtins.list(self._devices.get(user_id, {}).values())

    async def list_all(self, limit: int) -> builtins.list[Record]:
        out: builtins.list[Record] = []
        for devices in self._devices.values():
            out.extend(devices.values())
            if len(out) >= limit:
                return out[:limit]
        return out

    async def owner(self, device_id: str) -> str | None:
        return self._owners.get(device_id)

    async def expired(self, limit: int) -> builtins.list[Record]:
        return []
