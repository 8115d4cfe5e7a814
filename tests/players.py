"""A simulated media player for SyncPlay tests and benchmarks (the client's ``Player``).

Its position advances with its rate (times ``1 + drift``) on a clock in milliseconds: the
caller's (``clock=``: a fake clock, the wall clock, a member's own skewed clock), or, without
one, the player's own, moved only by :meth:`SimPlayer.advance`. ``seek_snap`` rounds seeks
down to a keyframe grid like real players do. ``rates``, ``seeks`` and ``played_at`` record
what was done to it.
"""

from __future__ import annotations

from collections.abc import Callable


class SimPlayer:
    def __init__(
        self,
        clock: Callable[[], float] | None = None,
        *,
        position: float = 0.0,
        drift: float = 0.0,
        seek_snap: float = 0.0,
    ) -> None:
        self._elapsed = 0.0
        self._clock: Callable[[], float] = clock or (lambda: self._elapsed)
        self._pos = position
        self._since = self._clock()
        self._playing = False
        self._rate = 1.0
        self.drift = drift
        self.seek_snap = seek_snap
        self.rates: list[float] = []
        self.seeks: list[float] = []
        #: The clock's time of the last ``play()``.
        self.played_at: float | None = None

    def advance(self, ms: float) -> None:
        """Move the player's own clock (a player given a clock follows that one)."""
        self._elapsed += ms

    def _mark(self) -> None:
        self._pos, self._since = self.position(), self._clock()

    def position(self) -> float:
        if not self._playing:
            return self._pos
        elapsed = self._clock() - self._since
        return self._pos + elapsed / 1000.0 * self._rate * (1.0 + self.drift)

    def is_playing(self) -> bool:
        return self._playing

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        self._mark()
        self._rate = rate
        self.rates.append(rate)

    def seek(self, position: float) -> None:
        if self.seek_snap:
            position -= position % self.seek_snap
        self._pos, self._since = position, self._clock()
        self.seeks.append(position)

    def play(self) -> None:
        self._mark()
        self.played_at = self._since
        self._playing = True

    def pause(self) -> None:
        self._mark()
        self._playing = False
