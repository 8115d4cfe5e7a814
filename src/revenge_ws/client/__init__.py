"""The Python client of the ``revenge.v1`` hub: a connection that loses nothing.

::

    async with Client("ws://127.0.0.1:8080/api/v1/ws", token=token) as c:
        await c.subscribe("activity")
        async for msg in c.messages():
            print(msg["type"], msg.get("data"))

What it does by itself (details and numbers in ``docs/client.md``):

- reconnects after a network loss and after every reconnect-class close code
  (:func:`revenge_ws.codes.should_reconnect`) with full-jitter exponential backoff
  (0.5 s → 20 s); after 1001/1012 (server restart), and after any close whose reason
  advises a window (4002, 4003: ``"slow consumer; window=5"``), the first attempt is
  spread uniformly over that window (5 s by default for 1001/1012); 4004 waits at least
  5 s, then the spread; a handshake refused with 503 waits ``Retry-After`` plus a spread
  over ``Reconnect-Window``; 4001 asks the token provider for a fresh token first. It
  never reconnects after a terminal code: :class:`~revenge_ws.exceptions.ConnectionClosed`
  is stored and raised to the application (``messages()``, ``request()``,
  ``wait_closed()``);
- after a reconnect it re-subscribes every channel (automatic ones too) with ``since``
  = the last delivered position, drops duplicates by ``(channel, seq)`` (notifications
  by ``data.id``), and when the server answers ``recovered: false`` (or sends
  ``subscription.reset``) it calls ``on_recovery_failed(channel)`` and emits a
  ``client.recovery_failed`` event, so the application reloads that state over REST;
- pings every ``heartbeat.interval`` (three quick pings at connect), estimates the
  server clock NTP-style (:class:`ClockSync`: min-delay of the last 8 samples; every
  local timestamp comes from the ``clock`` given, the system clock by default) and
  reconnects when nothing arrives for ``heartbeat.timeout`` (watchdog);
- refreshes the token (``auth.refresh``) before it expires when given a provider;
- as a device (``device=DeviceInfo(...)``, contract §13) says ``device.hello`` on every
  connection, reports what it plays (:meth:`Client.report_playback`, repeated while
  playing and after a reconnect) and answers remote commands (:meth:`Client.on_command`);
  any client sends them (:meth:`Client.send_command`) and lists devices.

Only the standard library, aiohttp, orjson and the contract's shared modules
(:mod:`revenge_ws.protocol`, :mod:`revenge_ws.codes`, :mod:`revenge_ws.exceptions`)
are used here: no server code (import-linter contract ``clients``).

This module is the public face: it re-exports the public names (``__all__``). The
application API is in ``_client.py``, the connection loop in ``_connection.py``, the
device's hello, reporter and command answers in ``_device.py``, the types in
``_types.py``, reading the hub's frames and headers in ``_wire.py``, reconnect timing in
``_backoff.py``, the server clock estimate in ``_clock.py``, positions and
de-duplication in ``_tracker.py``, presence in ``_presence.py``.
"""

from __future__ import annotations

from ._backoff import (
    ReconnectPolicy,
    advised_window,
    backoff_delay,
    reconnect_delay,
    restart_delay,
)
from ._client import Client
from ._clock import ClockSample, ClockSync
from ._presence import OnlineUsers, PresenceData, PresenceUser, parse_presence
from ._types import ClientConfig, ClientStats, DeviceInfo, SubscribeError

__all__ = [
    "Client",
    "ClientConfig",
    "ClientStats",
    "ClockSample",
    "ClockSync",
    "DeviceInfo",
    "OnlineUsers",
    "PresenceData",
    "PresenceUser",
    "ReconnectPolicy",
    "SubscribeError",
    "advised_window",
    "backoff_delay",
    "parse_presence",
    "reconnect_delay",
    "restart_delay",
]
