"""Devices, now playing and remote control (contract v1.1 §13): request validation and
the cluster-wide device registry. Pure of the core: the feature in
:mod:`revenge_ws.features.devices` drives them."""

from .registry import DeviceRegistry, MemoryDeviceRegistry, Record, public

__all__ = ["DeviceRegistry", "MemoryDeviceRegistry", "Record", "public"]
