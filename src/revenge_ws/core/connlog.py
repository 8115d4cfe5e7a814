"""The connection log (``revenge_ws.connections``): one line per connect and disconnect,
or, during a reconnect storm, one summary line per second.

A restart of a node with 10,000 users would write 20,000 lines within seconds: a flood
for whoever reads the log, and in a profile of a storm about 15 % of the node's CPU
(a ``LogRecord``, its formatting and a ``write()`` each). While the node's
:class:`~revenge_ws.core.admission.StormMeter` says "storm", connects and disconnects
are counted instead, and a line ``storm: N connects, M disconnects in the last 1.0 s``
(``event: "connections_summary"``) is written each second; per-connection lines resume
when the storm is over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

__all__ = ["SUMMARY_INTERVAL", "ConnectionLog"]

log = logging.getLogger("revenge_ws.connections")

#: Seconds between summary lines during a storm.
SUMMARY_INTERVAL = 1.0


class ConnectionLog:
    """Writes connection lines, or counts them while ``storming(now)`` is true."""

    def __init__(
        self, storming: Callable[[float], bool], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._storming = storming
        self._clock = clock
        self._connects = 0
        self._disconnects = 0
        self._codes: dict[int | None, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def connected(self, user_id: str, session_id: str) -> None:
        if self._summarize():
            self._connects += 1
            return
        log.info(
            "connect user=%s session=%s",
            user_id,
            session_id,
            extra={"event": "connect", "user_id": user_id, "session_id": session_id},
        )

    def disconnected(
        self, user_id: str, session_id: str, code: int | None, duration: float
    ) -> None:
        if self._summarize():
            self._disconnects += 1
            self._codes[code] = self._codes.get(code, 0) + 1
            return
        log.info(
            "disconnect user=%s session=%s code=%s duration=%.1fs",
            user_id,
            session_id,
            code,
            duration,
            extra={
                "event": "disconnect",
                "user_id": user_id,
                "session_id": session_id,
                "close_code": code,
                "duration": round(duration, 3),
            },
        )

    def _summarize(self) -> bool:
        if not log.isEnabledFor(logging.INFO) or not self._storming(self._clock()):
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SUMMARY_INTERVAL, self.flush)
        return True

    def flush(self) -> None:
        """Write the summary of what was counted (nothing when nothing was)."""
        self._timer = None
        if not (self._connects or self._disconnects):
            return
        codes = dict(sorted(self._codes.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        log.info(
            "storm: %d connects, %d disconnects in the last %.1f s (close codes %s); "
            "one line per connection again when the storm is over",
            self._connects,
            self._disconnects,
            SUMMARY_INTERVAL,
            codes,
            extra={
                "event": "connections_summary",
                "connects": self._connects,
                "disconnects": self._disconnects,
                "close_codes": {str(k): v for k, v in codes.items()},
            },
        )
        self._connects = self._disconnects = 0
        self._codes.clear()

    def close(self) -> None:
        """Write what is counted now (the node stops)."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
