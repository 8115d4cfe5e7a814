"""When to reconnect: full-jitter backoff and spread windows, as pure functions.

Every function takes its random source explicitly, so a seeded :class:`random.Random`
makes them deterministic (the tests draw 1,000 samples from them).

Rules (contract §4 and §12; numbers from Centrifugo, see ``docs/client.md``):

- network loss and reconnect-class close codes: full-jitter exponential backoff,
  ``min + U(0, min(max, min · 2^attempt))`` capped at ``max`` (0.5 s → 20 s by default);
- a close whose reason advises a spread window (``"slow consumer; window=5"``: the hub
  sends one with 1001, 1012, 4002, 4003 and 4004): the first attempt is spread uniformly
  over that window, so the clients one incident disconnected together do not come back
  in the same second; 1001 going away / 1012 service restart are spread over the restart
  window (5 s by default, or what the welcome advised) even when the reason names none;
- 4004 rate limited / HTTP 429: wait ``rate_limit_wait`` (5 s, or a longer
  ``Retry-After``), then a uniform spread over the advised window, else
  ``rate_limit_spread`` (5 s): clients refused together would come back together after
  a fixed wait; later attempts wait at least the backoff;
- HTTP 503: ``Retry-After`` plus a uniform spread over the advised window
  (``Reconnect-Window``), else the restart window; at least the backoff.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

__all__ = [
    "ReconnectPolicy",
    "advised_window",
    "backoff_delay",
    "reconnect_delay",
    "restart_delay",
]

#: Close codes after which the first reconnect attempt is spread over a window even
#: when the close reason advises none (the restart window applies).
RESTART_CODES = frozenset({1001, 1012})
#: A server advises a spread window in its close reason: ``"restart; window=10"``,
#: ``"slow consumer; window=5"``, ``"restart window=2500ms"``; seconds unless ``ms``
#: follows.
_WINDOW_RE = re.compile(
    r"(?:^|[\s;,(])(?:restart_|reconnect_)?window\s*[=:]\s*(\d+(?:\.\d+)?)\s*(ms|s)?(?![\w.])",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """The reconnect timing knobs (seconds)."""

    backoff_min: float = 0.5
    backoff_max: float = 20.0
    restart_window: float = 5.0
    rate_limit_wait: float = 5.0
    #: An advised window (close reason, welcome, ``Reconnect-Window``) is clamped to this.
    max_window: float = 300.0
    #: After 4004 / 429 the next attempt is spread uniformly over this many seconds
    #: beyond ``rate_limit_wait``.
    rate_limit_spread: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        if (
            min(self.restart_window, self.rate_limit_wait, self.rate_limit_spread, self.max_window)
            < 0
        ):
            raise ValueError("windows and waits must not be negative")


def backoff_delay(
    attempt: int, rng: random.Random, minimum: float = 0.5, maximum: float = 20.0
) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th retry (0-based).

    ``min + U(0, min(max, min · 2^attempt))``, never above ``max``: attempt 0 waits
    0.5–1 s, attempt 3 waits 0.5–4.5 s, and from attempt 6 on anything in 0.5–20 s.
    """
    step = min(max(attempt, 0), 31)
    spread = min(maximum, minimum * (2.0**step))
    return min(maximum, minimum + rng.uniform(0.0, spread))


def restart_delay(window: float, rng: random.Random) -> float:
    """Delay of the first attempt after a server restart: uniform over ``[0, window)``."""
    if window <= 0 or not math.isfinite(window):
        return 0.0
    return rng.uniform(0.0, window)


def advised_window(reason: str | None, maximum: float = 300.0) -> float | None:
    """The spread window a close reason advises (``window=10`` or ``window=2500ms``),
    clamped to ``[0, maximum]`` seconds; None when it advises none."""
    if not reason:
        return None
    m = _WINDOW_RE.search(reason)
    if m is None:
        return None
    value = float(m.group(1))
    if (m.group(2) or "s").lower() == "ms":
        value /= 1000.0
    return min(max(value, 0.0), maximum)


def reconnect_delay(
    policy: ReconnectPolicy,
    attempt: int,
    rng: random.Random,
    *,
    code: int | None = None,
    http_status: int | None = None,
    retry_after: float | None = None,
    window: float | None = None,
) -> float:
    """Seconds to wait before the next attempt.

    ``attempt`` counts the failed attempts since the last stable connection (0 right
    after a working connection ended); ``code`` is the close code that ended it (None
    for a network loss or a failed handshake), ``http_status``/``retry_after`` describe
    a refused handshake, and ``window`` is a spread window the server advised (close
    reason, welcome, or the ``Reconnect-Window`` header of a refusal).
    """
    lo, hi = policy.backoff_min, policy.backoff_max
    advised = None if window is None else min(max(window, 0.0), policy.max_window)
    if code == 4004 or http_status == 429:
        floor = max(policy.rate_limit_wait, retry_after or 0.0)
        delay = restart_delay(policy.rate_limit_spread if advised is None else advised, rng)
        if attempt > 0:
            delay = max(delay, backoff_delay(attempt, rng, lo, hi))
        return floor + delay
    if http_status == 503 or (retry_after is not None and retry_after > 0):
        spread = policy.restart_window if advised is None else advised
        return max(
            backoff_delay(attempt, rng, lo, hi), (retry_after or 0.0) + restart_delay(spread, rng)
        )
    if code in RESTART_CODES or (code is not None and advised is not None):
        delay = restart_delay(policy.restart_window if advised is None else advised, rng)
        if attempt > 0:
            delay = max(delay, backoff_delay(attempt, rng, lo, hi))
        return delay
    return backoff_delay(attempt, rng, lo, hi)
