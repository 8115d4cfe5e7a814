"""NTP-style clock estimation from ``ping``/``pong`` exchanges (contract §4), sans I/O.

Each exchange gives four timestamps, all in milliseconds since the Unix epoch:
``t0`` (client send), ``t1`` (server receive), ``t2`` (server send), ``t3`` (client
receive). From them::

    offset = ((t1 - t0) + (t2 - t3)) / 2     # server clock minus client clock
    delay  = (t3 - t0) - (t2 - t1)           # network round trip, server time excluded

The error of ``offset`` is at most half the path asymmetry (``|up - down| / 2``) plus
queueing noise. Queueing only ever adds delay, so the sample with the smallest ``delay``
is the least disturbed one: like Jellyfin's SyncPlay, :class:`ClockSync` keeps the last
eight samples and uses the min-delay one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["ClockSample", "ClockSync"]


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One ping/pong exchange (ms since the Unix epoch) and what it implies."""

    t0: float
    t1: float
    t2: float
    t3: float

    @property
    def offset(self) -> float:
        """Server clock minus client clock (ms)."""
        return ((self.t1 - self.t0) + (self.t2 - self.t3)) / 2.0

    @property
    def delay(self) -> float:
        """Round-trip network delay, server processing excluded (ms, never negative)."""
        return max(0.0, (self.t3 - self.t0) - (self.t2 - self.t1))


class ClockSync:
    """Keeps the last ``size`` samples; the estimate is the min-delay sample's.

    Pure: no clock of its own. Feed it with :meth:`add`; ask :attr:`offset`,
    :attr:`delay` and :meth:`server_time`.
    """

    __slots__ = ("_samples", "size")

    def __init__(self, size: int = 8) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._samples: deque[ClockSample] = deque(maxlen=size)

    def add(self, t0: float, t1: float, t2: float, t3: float) -> ClockSample | None:
        """Record one exchange; returns the sample, or None when the timestamps are
        unusable (not finite, or the client's own clock went backwards)."""
        if not all(math.isfinite(t) for t in (t0, t1, t2, t3)) or t3 < t0:
            return None
        sample = ClockSample(t0, t1, t2, t3)
        self._samples.append(sample)
        return sample

    def reset(self) -> None:
        """Forget every sample (e.g. when the client moved to another node)."""
        self._samples.clear()

    @property
    def samples(self) -> tuple[ClockSample, ...]:
        """The samples kept, oldest first."""
        return tuple(self._samples)

    @property
    def best(self) -> ClockSample | None:
        """The min-delay sample (the newest one among equals), or None."""
        best: ClockSample | None = None
        for s in self._samples:
            if best is None or s.delay <= best.delay:
                best = s
        return best

    @property
    def latest(self) -> ClockSample | None:
        return self._samples[-1] if self._samples else None

    @property
    def offset(self) -> float | None:
        """Estimated server clock minus client clock (ms), or None before any sample."""
        best = self.best
        return None if best is None else best.offset

    @property
    def delay(self) -> float | None:
        """Round-trip delay of the sample the estimate comes from (ms)."""
        best = self.best
        return None if best is None else best.delay

    def server_time(self, local_ms: float) -> float:
        """The server's clock at local time ``local_ms`` (unchanged without a sample)."""
        offset = self.offset
        return local_ms if offset is None else local_ms + offset
