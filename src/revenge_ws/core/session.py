"""The connection session, sans I/O: one client's protocol state.

It decodes and validates envelopes, enforces the inbound rate limit, keeps the
"exactly one reply per id" promise (a repeated id within the dedupe window replays the
first reply instead of acting twice), and tracks heartbeat and token expiry. It never
touches a socket or a clock: every method takes ``now`` (monotonic seconds), and results
are values the adapter acts on.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..codes import CloseCode, ErrorCode
from ..exceptions import ProtocolError
from ..protocol import Envelope, decode_envelope, encode_error
from .ratelimit import TokenBucket

__all__ = ["Close", "Dispatch", "Replay", "Reply", "Session", "SessionLimits"]

# Replies to these are never replayed: they report fresh state or time, and running them
# twice is harmless (subscribe/unsubscribe are idempotent by nature).
NOT_REPLAYED = frozenset(
    {
        "ping",
        "subscribe",
        "unsubscribe",
        "notification.list",
        "syncplay.list",
        "syncplay.report",
    }
)
# A malformed frame costs more of the inbound budget than a good one.
INVALID_COST = 5.0
MAX_REMEMBERED_REPLIES = 1024


@dataclass(frozen=True, slots=True)
class SessionLimits:
    inbound_rate: float = 100.0
    inbound_burst: int = 200
    rate_limit_strikes: int = 50
    inflight_requests: int = 32
    heartbeat_timeout: float = 90.0
    expiry_grace: float = 25.0
    dedupe_window: float = 300.0


@dataclass(frozen=True, slots=True)
class Reply:
    """Send this payload (an ``error``) to the client."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Replay:
    """A repeated request id: send the first reply again, do not act."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run the handler of ``envelope.type``; then call :meth:`Session.complete`."""

    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with this code."""

    code: int
    reason: str


Action = Reply | Replay | Dispatch | Close | None


class Session:
    """Protocol state of one connection. ``now`` is monotonic seconds throughout."""

    __slots__ = (
        "_bucket",
        "_done",
        "_inflight",
        "_limits",
        "_strike_since",
        "expires_at",
        "last_seen",
        "session_id",
        "strikes",
        "user_id",
    )

    def __init__(
        self,
        session_id: str,
        user_id: str,
        expires_at: float,
        limits: SessionLimits,
        now: float,
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        #: Monotonic time at which the token expires.
        self.expires_at = expires_at
        self.last_seen = now
        self.strikes = 0
        self._strike_since = now
        self._limits = limits
        self._bucket = TokenBucket(limits.inbound_rate, limits.inbound_burst, now)
        self._inflight: dict[str, int] = {}
        self._done: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    # -- inbound -------------------------------------------------------------------
    def receive(self, raw: str | bytes, now: float) -> Action:
        """Judge one text frame. Exactly one of: an error reply, a replay, a dispatch,
        a close, or nothing (a duplicate of a request still in flight)."""
        self.last_seen = now
        try:
            env = decode_envelope(raw)
        except ProtocolError as exc:
            if not self._bucket.take(now, INVALID_COST):
                return self._limited(exc.request_id, now)
            return Reply(encode_error(exc.request_id, exc.code, exc.message, exc.retryable))
        if not self._bucket.take(now):
            return self._limited(env.id, now)
        if env.id is not None and env.type not in NOT_REPLAYED:
            if env.id in self._inflight:
                self._inflight[env.id] += 1
                return None
            done = self._done.get(env.id)
            if done is not None and now - done[0] <= self._limits.dedupe_window:
                return Replay(done[1])
        if env.id is not None:
            if len(self._inflight) >= self._limits.inflight_requests:
                return Reply(
                    encode_error(
                        env.id, ErrorCode.RATE_LIMITED, "too many requests in flight", True
                    )
                )
            self._inflight[env.id] = self._inflight.get(env.id, 0) + 1
        return Dispatch(env)

    def control(self, now: float) -> Reply | Close | None:
        """Judge one WebSocket ping or pong frame. It proves liveness and spends the
        inbound budget like a message, so a ping flood ends in 4004 as a message flood
        does (each ping would otherwise cost a pong, unmetered). None: within budget,
        answer a ping."""
        self.last_seen = now
        if self._bucket.take(now):
            return None
        return self._limited(None, now)

    def _limited(self, msg_id: str | None, now: float) -> Reply | Close:
        if now - self._strike_since > 10.0:
            self.strikes = 0
            self._strike_since = now
        self.strikes += 1
        if self.strikes > self._limits.rate_limit_strikes:
            return Close(CloseCode.RATE_LIMITED, "rate limited")
        return Reply(
            encode_error(
                msg_id,
                ErrorCode.RATE_LIMITED,
                f"more than {self._limits.inbound_rate:g} messages/s",
                True,
            )
        )

    def complete(self, env: Envelope, payload: bytes, now: float) -> int:
        """Record the reply to a dispatched request; returns how many times to send it
        (1, or more when the same id arrived again while it was in flight)."""
        if env.id is None:
            return 1
        count = self._inflight.pop(env.id, 1)
        if env.type not in NOT_REPLAYED:
            self._done[env.id] = (now, payload)
            self._done.move_to_end(env.id)
            self._expire(now)
        return count

    def _expire(self, now: float) -> None:
        window = self._limits.dedupe_window
        done = self._done
        while done:
            first = next(iter(done.values()))
            if len(done) > MAX_REMEMBERED_REPLIES or now - first[0] > window:
                done.popitem(last=False)
            else:
                break

    # -- liveness ------------------------------------------------------------------
    def touch(self, now: float) -> None:
        """Any inbound traffic (including WebSocket pong frames) proves liveness."""
        self.last_seen = now

    def refresh(self, expires_at: float) -> None:
        self.expires_at = expires_at

    def check(self, now: float) -> Close | None:
        """Heartbeat and token-expiry verdict at ``now``."""
        if now - self.last_seen > self._limits.heartbeat_timeout:
            return Close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        if now > self.expires_at + self._limits.expiry_grace:
            return Close(CloseCode.TOKEN_EXPIRED, "token expired")
        return None
