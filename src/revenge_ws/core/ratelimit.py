"""Token buckets: the one rate-limiting primitive (inbound messages, accepts, chat)."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; the clock is passed in (seconds)."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are enough; never blocks."""
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds from ``now`` until ``cost`` tokens are available; spends nothing."""
        tokens = self._tokens
        elapsed = now - self._last
        if elapsed > 0:
            tokens = min(self.burst, tokens + elapsed * self.rate)
        missing = cost - tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens will be available (as of the last ``take``)."""
        missing = cost - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate
