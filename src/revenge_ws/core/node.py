"""The node: owns the hub, the broker, the channel policy and the request handlers.

Transport adapters call three things: :meth:`Node.admit` before the upgrade,
:meth:`Node.open` after it, :meth:`Node.receive` per text frame, and :meth:`Node.closed`
when the socket is gone. Features (SyncPlay, notifications, live channels) plug in with
:meth:`Node.register` (a request type) and the ``on_connect``/``on_disconnect`` hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from ..auth import Claims, TokenVerifier
from ..broker.base import Broker, HistoryResult, PresenceInfo, Publication
from ..codes import CloseCode, ErrorCode
from ..config import Settings
from ..exceptions import (
    AuthError,
    BrokerUnavailable,
    ProtocolError,
    RequestError,
    StoreUnavailable,
)
from ..protocol import (
    SUBPROTOCOL,
    Envelope,
    StreamPosition,
    encode_ack,
    encode_error,
    encode_message,
    now_ms,
)
from .admission import HandshakeGate
from .channels import (
    LATEST_VALUE,
    ChannelPolicy,
    automatic_channels,
    is_personal,
    parse_channel,
)
from .connection import Connection, Flusher, SubState, Transport
from .hub import Hub
from .observer import NullObserver, Observer
from .outbox import Outbox
from .ratelimit import TokenBucket
from .session import Close, Dispatch, Replay, Reply, Session, SessionLimits

__all__ = ["Handler", "Node", "Request"]

log = logging.getLogger("revenge_ws.node")
conn_log = logging.getLogger("revenge_ws.connections")

#: How often the sweeper checks heartbeats and token expiry (s).
SWEEP_INTERVAL = 1.0
#: Channels re-checked against history at once after a broker outage, and tries per channel.
RECOVERY_CONCURRENCY = 16
RECOVERY_ATTEMPTS = 5
#: Revocations are remembered this long (longer than any sane token lifetime).
REVOCATION_TTL = 30 * 24 * 3600.0
#: How long a disconnect waits for the connection's connect hooks to finish (s).
HOOK_WAIT = 10.0
#: Close codes that ask the client to come back: their reason advises a spread window
#: (``"restart; window=10"``, contract v1.1 §12).
COME_BACK = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.SERVICE_RESTART,
        CloseCode.SLOW_CONSUMER,
        CloseCode.HEARTBEAT_TIMEOUT,
        CloseCode.RATE_LIMITED,
    }
)
#: The longest spread window a node advises (s).
MAX_WINDOW = 300.0


@dataclass(slots=True)
class Request:
    """One dispatched client request, as a handler sees it."""

    node: Node
    conn: Connection
    envelope: Envelope
    t_recv_ms: float
    #: Run after the reply is queued (e.g. missed publications follow the subscribe ack).
    after_reply: list[Callable[[], None]] = field(default_factory=list)

    @property
    def data(self) -> dict[str, Any]:
        return self.envelope.data

    @property
    def claims(self) -> Claims:
        return self.conn.claims


T = TypeVar("T")
Handler = Callable[[Request], Awaitable[dict[str, Any]]]
Hook = Callable[[Connection], Awaitable[None]]
#: Checks a handshake to ``/api/v1/ws/playback/{room_id}`` (raises RequestError).
RoomAdmission = Callable[[Claims, str, dict[str, str]], Awaitable[None]]
#: Joins a freshly opened connection to a room (the playback endpoint).
RoomJoin = Callable[[Connection, str, dict[str, str]], Awaitable[None]]


def _since(value: Any, name: str) -> StreamPosition | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("epoch"), str)
        or not isinstance(value.get("seq"), int)
        or isinstance(value.get("seq"), bool)
        or value["seq"] < 0
    ):
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, f"'since' of {name} must be {{epoch: str, seq: int >= 0}}"
        )
    return StreamPosition(value["epoch"], value["seq"])


class Node:
    """One hub process."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        *,
        observer: Observer | None = None,
        verifier: TokenVerifier | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.broker = broker
        #: The broker lives in this process (``in_process``): its calls never wait on I/O
        #: and its state dies with the process.
        self.broker_in_process = bool(getattr(broker, "in_process", False))
        self.observer: Observer = observer or NullObserver()
        self.verifier = verifier or TokenVerifier(settings.jwt)
        self.hub = Hub(on_gap=self._on_gap)
        self.policy = ChannelPolicy()
        self.handlers: dict[str, Handler] = {}
        self.on_connect: list[Hook] = []
        self.on_disconnect: list[Hook] = []
        self.room_admission: RoomAdmission | None = None
        self.room_join: RoomJoin | None = None
        self.clock: Callable[[], float] = time.monotonic
        self.closing = False
        self.started_at = time.time()
        self._admitted: set[str] = set()
        self._admit_counts: dict[str, int] = {}
        #: Connect hooks still running, by session id.
        self._connecting: dict[str, asyncio.Task[Any]] = {}
        #: Called with a user's first connection cluster-wide, and after their last.
        self.on_user_online: list[Hook] = []
        #: Run once when the node starts shutting down, before connections are closed.
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        self.on_user_offline: list[Hook] = []
        lim = settings.limits
        self._limits = SessionLimits(
            inbound_rate=lim.inbound_rate,
            inbound_burst=lim.inbound_burst,
            rate_limit_strikes=lim.rate_limit_strikes,
            inflight_requests=lim.inflight_requests,
            heartbeat_timeout=settings.heartbeat.timeout,
            expiry_grace=settings.jwt.expiry_grace,
            dedupe_window=settings.history.request_dedupe_window,
        )
        self._accept = TokenBucket(
            settings.server.accept_rate, settings.server.accept_burst, time.monotonic()
        )
        self.handshakes = HandshakeGate(settings.server.max_pending_handshakes)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._recovering: set[str] = set()
        self._flusher: Flusher | None = None
        self.register("subscribe", self._subscribe)
        self.register("unsubscribe", self._unsubscribe)
        self.register("auth.refresh", self._refresh)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        await self.broker.start(self)
        self._sweeper = asyncio.create_task(self._sweep(), name="revenge-sweeper")

    async def stop(self, code: int = CloseCode.SERVICE_RESTART, reason: str | None = None) -> None:
        """Refuse new connections, run the stop hooks (flush batches, tell admins), then
        close every open connection with ``code``. Idempotent.

        The reason advises clients to spread their reconnects over
        :meth:`spread_window` seconds (``"restart; window=10"``), so a restart does not
        turn into a reconnect storm.
        """
        window = self.spread_window()
        if reason is None:
            reason = "restart"
        if not self.closing:
            self.closing = True
            for hook in self.on_stop:
                try:
                    await asyncio.wait_for(hook(), self.settings.broker.timeout)
                except Exception as exc:
                    log.warning("stop hook failed: %r", exc)
        for conn in self.hub:
            self.close_connection(conn, code, reason, window)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def close(self) -> None:
        """Release the broker after :meth:`stop` and after the sockets are gone."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.close()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background task the node owns (cancelled on close, errors logged)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, BrokerUnavailable | StoreUnavailable):
                log.warning("%s failed: %s", task.get_name(), exc)
            else:
                log.error("%s failed", task.get_name(), exc_info=exc)

    def register(self, mtype: str, handler: Handler) -> None:
        self.handlers[mtype] = handler

    # -- admission -------------------------------------------------------------------
    def authenticate(self, token: str | None) -> Claims:
        """Verify a token (raises :class:`AuthError`)."""
        return self.verifier.verify(token or "")

    async def admit(self, claims: Claims, session_id: str) -> None:
        """Decide whether this user may open one more connection, before the upgrade.

        On success the connection is counted (cluster-wide); :meth:`closed` or
        :meth:`release` uncounts it. Raises :class:`AuthError` with ``UNAVAILABLE``
        (503), ``RATE_LIMITED`` (429) or ``UNAUTHORIZED`` (401).
        """
        if self.closing:
            raise AuthError("shutting down", ErrorCode.UNAVAILABLE)
        if not self._accept.take(time.monotonic()):
            raise AuthError("too many handshakes, retry later", ErrorCode.UNAVAILABLE)
        if len(self.hub) >= self.settings.server.max_connections:
            raise AuthError("this node is full", ErrorCode.UNAVAILABLE)
        try:
            revoked = await self.call(self.broker.get_value(f"revoked:{claims.sub}"))
            if revoked is not None and (claims.iat is None or claims.iat * 1000 <= float(revoked)):
                raise AuthError("token revoked")
            count = await self.call(self.broker.presence.add_connection(claims.sub, session_id))
        except BrokerUnavailable:
            raise AuthError("broker unavailable", ErrorCode.UNAVAILABLE) from None
        if count > self.settings.limits.connections_per_user:
            await self.release(claims, session_id)
            raise AuthError(
                f"more than {self.settings.limits.connections_per_user} connections for this user",
                ErrorCode.RATE_LIMITED,
            )
        self._admitted.add(session_id)
        self._admit_counts[session_id] = count

    async def release_if_unopened(self, claims: Claims, session_id: str) -> None:
        """Uncount an admitted connection whose upgrade never completed."""
        self._admit_counts.pop(session_id, None)
        if session_id in self._admitted:
            self._admitted.discard(session_id)
            await self.release(claims, session_id)

    def admission_wait(self) -> float:
        """Seconds until this node could admit one more connection (0: it can now),
        without spending from the accept bucket: the adapter asks this before it
        spends CPU on a token. :meth:`admit` still decides."""
        if len(self.hub) >= self.settings.server.max_connections:
            return self.retry_after()
        return self._accept.wait(time.monotonic())

    def retry_after(self) -> float:
        return max(1.0, self._accept.retry_after())

    def spread_window(self) -> float:
        """Seconds over which clients told to come back (a close in :data:`COME_BACK`, a
        503) should spread their reconnects: ``server.restart_window``, or longer when
        this node's connections could not all be admitted within it at
        ``server.accept_rate`` (10,000 connections at 1,000/s: 10 s)."""
        server = self.settings.server
        return min(MAX_WINDOW, max(server.restart_window, len(self.hub) / server.accept_rate))

    def close_connection(
        self, conn: Connection, code: int, reason: str, window: float | None = None
    ) -> None:
        """Close ``conn``; a close that asks the client to come back advises the spread
        window in its reason."""
        if code in COME_BACK:
            w = self.spread_window() if window is None else window
            reason = f"{reason}; window={w:g}"
        conn.close(code, reason)

    async def release(self, claims: Claims, session_id: str) -> int:
        with contextlib.suppress(BrokerUnavailable):
            return await self.call(self.broker.presence.remove_connection(claims.sub, session_id))
        return -1

    async def call(self, aw: Awaitable[T]) -> T:
        """Await a broker call with the broker timeout; every failure is BrokerUnavailable."""
        if self.broker_in_process:
            # The in-process broker never waits on I/O: a timeout would only cost a
            # timer per call (~10 % of a handshake's CPU in the profile, 8-9 calls each).
            return await aw
        try:
            # asyncio.timeout, not wait_for: no extra task per call on the hot path.
            async with asyncio.timeout(self.settings.broker.timeout):
                return await aw
        except TimeoutError:
            raise BrokerUnavailable("broker timed out") from None
        except (OSError, ConnectionError) as exc:
            raise BrokerUnavailable(str(exc)) from None

    # -- connections -----------------------------------------------------------------
    async def open(
        self,
        claims: Claims,
        transport: Transport,
        session_id: str,
        *,
        extra_channels: tuple[str, ...] = (),
    ) -> Connection:
        """Register an upgraded connection, subscribe its automatic channels and queue
        the ``welcome`` (always the first frame)."""
        self._admitted.discard(session_id)
        mono = time.monotonic()
        session = Session(
            session_id,
            claims.sub,
            mono + (claims.exp - time.time()),
            self._limits,
            mono,
        )
        if self._flusher is None:
            self._flusher = Flusher(asyncio.get_running_loop())
        conn = Connection(
            flusher=self._flusher,
            session_id=session_id,
            claims=claims,
            session=session,
            transport=transport,
            loop=asyncio.get_running_loop(),
            outbox=Outbox(self.settings.limits.outbound_queue_bytes),
            node_id=self.node_id,
            on_slow=self._slow,
        )
        self.hub.add(conn)
        self.observer.connection_opened()
        subs: list[dict[str, Any]] = []
        finishers: list[Callable[[], None]] = []
        for name in (*automatic_channels(claims), *extra_channels):
            try:
                entry, finish = await self._attach(conn, name, None)
            except (TimeoutError, BrokerUnavailable):
                log.warning("broker unavailable: %s not subscribed for %s", name, session_id)
                continue
            conn.automatic.add(name)
            subs.append(entry)
            finishers.append(finish)
        conn.send(
            encode_message(
                "welcome",
                {
                    "session_id": session_id,
                    "user_id": claims.sub,
                    "node_id": self.node_id,
                    "protocol": SUBPROTOCOL,
                    "server_time": now_ms(),
                    "expires_at": claims.expires_at_ms,
                    "heartbeat": {
                        "interval": self.settings.heartbeat.interval,
                        "timeout": self.settings.heartbeat.timeout,
                    },
                    "subscriptions": subs,
                },
            )
        )
        for finish in finishers:
            finish()
        conn_log.info(
            "connect user=%s session=%s",
            claims.sub,
            session_id,
            extra={"event": "connect", "user_id": claims.sub, "session_id": session_id},
        )
        if self._admit_counts.pop(session_id, 0) == 1:
            # Awaited: one broker publish, and user_online must precede what follows.
            await self._run_hooks(list(self.on_user_online), conn, "online")
        if self.on_connect:
            # In the background: the adapter must start reading at once. Awaiting these
            # hooks here (store queries per connect, for redelivery) left sockets unread
            # during connection storms until their heartbeats timed out.
            hooks = list(self.on_connect)
            task = self.spawn(self._run_hooks(hooks, conn, "connect"), f"connect-{session_id}")
            self._connecting[session_id] = task
            task.add_done_callback(lambda _t: self._connecting.pop(session_id, None))
        return conn

    async def _run_hooks(self, hooks: list[Hook], conn: Connection, what: str) -> None:
        for hook in hooks:
            if what == "connect" and conn.closed:
                return  # the client left: its setup (a store read, re-sends) is wasted
            try:
                await hook(conn)
            except (BrokerUnavailable, StoreUnavailable) as exc:
                log.warning("%s hook for %s: %s", what, conn.session_id, exc)
            except Exception:
                log.exception("%s hook failed for %s", what, conn.session_id)

    async def closed(self, conn: Connection, code: int | None) -> None:
        """The socket is gone: forget the connection everywhere."""
        if conn.close_code is None:
            conn.close_code = code
        conn.closed = True
        if self.hub.connections.get(conn.session_id) is not conn:
            return
        channels = list(conn.subs)
        emptied = self.hub.remove(conn)
        duration = time.monotonic() - conn.opened_at
        self.observer.connection_closed(conn.close_code, duration)
        conn_log.info(
            "disconnect user=%s session=%s code=%s duration=%.1fs",
            conn.user_id,
            conn.session_id,
            conn.close_code,
            duration,
            extra={
                "event": "disconnect",
                "user_id": conn.user_id,
                "session_id": conn.session_id,
                "close_code": conn.close_code,
                "duration": round(duration, 3),
            },
        )
        # The user's slot first: a client that closes one connection to open another
        # must find it free as soon as the socket is gone from this node.
        remaining = await self.release(conn.claims, conn.session_id)
        setup = self._connecting.pop(conn.session_id, None)
        if setup is not None and not setup.done():
            # Disconnect hooks must follow the connect hooks, never race them.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(setup), HOOK_WAIT)
        await self._run_hooks(list(self.on_disconnect), conn, "disconnect")
        with contextlib.suppress(BrokerUnavailable):
            for ch in emptied:
                await self.call(self.broker.unsubscribe(ch))
            for ch in channels:
                await self._presence_remove(ch, conn.session_id)
        if remaining == 0:
            await self._run_hooks(list(self.on_user_offline), conn, "offline")

    def _slow(self, conn: Connection) -> None:
        if not conn.closed:
            self.observer.slow_connection()
            self.close_connection(conn, CloseCode.SLOW_CONSUMER, "slow consumer")

    # -- inbound ---------------------------------------------------------------------
    def receive(
        self, conn: Connection, raw: str | bytes, t_recv_ms: float
    ) -> Awaitable[None] | None:
        """Handle one text frame. Returns an awaitable when a handler must run; the
        adapter awaits it before reading the next frame (requests run in order)."""
        action = conn.session.receive(raw, time.monotonic())
        if action is None:
            return None
        if isinstance(action, Dispatch):
            env = action.envelope
            self.observer.message_in(
                env.type if env.type in self.handlers or env.type == "ping" else "unknown"
            )
            if env.type == "ping":
                self._pong(conn, env, t_recv_ms)
                return None
            return self._dispatch(conn, env, t_recv_ms)
        if isinstance(action, Reply | Replay):
            self.observer.message_in("invalid" if isinstance(action, Reply) else "replay")
            conn.send(action.payload)
        elif isinstance(action, Close):
            self.close_connection(conn, action.code, action.reason)
        return None

    def _pong(self, conn: Connection, env: Envelope, t1: float) -> None:
        t0 = env.data.get("t0")
        data: dict[str, Any] = {"t0": t0 if isinstance(t0, int | float) else None, "t1": t1}
        conn.session.complete(env, b"", 0.0)
        # t2 as late as we can take it: the pong leaves in this very write when the
        # outbox is empty, which it is for any client that keeps up.
        data["t2"] = now_ms()
        conn.send(encode_message("pong", data, env.id))
        conn.flush()

    async def _dispatch(self, conn: Connection, env: Envelope, t_recv_ms: float) -> None:
        handler = self.handlers.get(env.type)
        req = Request(self, conn, env, t_recv_ms)
        payload: bytes | None
        try:
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {env.type!r}")
            async with asyncio.timeout(self.settings.broker.timeout * 2):
                result = await handler(req)
            payload = encode_ack(env.id, result) if env.id is not None else None
        except ProtocolError as exc:
            payload = encode_error(env.id, exc.code, exc.message, exc.retryable)
        except (BrokerUnavailable, StoreUnavailable, TimeoutError) as exc:
            log.warning("%s failed for %s: %s", env.type, conn.session_id, exc or "timeout")
            payload = encode_error(env.id, ErrorCode.UNAVAILABLE, "temporarily unavailable", True)
        except Exception:
            log.exception("handler %s failed", env.type)
            payload = encode_error(env.id, ErrorCode.INTERNAL, "internal error", True)
        if payload is None:
            conn.session.complete(env, b"", time.monotonic())
        else:
            for _ in range(conn.session.complete(env, payload, time.monotonic())):
                conn.send(payload)
        for after in req.after_reply:
            after()

    # -- subscriptions -----------------------------------------------------------------
    async def _attach(
        self,
        conn: Connection,
        name: str,
        since: StreamPosition | None,
        *,
        replay_latest: bool = False,
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Subscribe ``conn`` to ``name`` (policy already checked).

        Live publications are buffered from the moment the node listens until the
        returned ``finish`` runs, which sends the missed ones and then the buffer:
        per channel and connection, no gap and no duplicate.
        """
        state = SubState(epoch="", seq=0, pending=[])
        old = conn.subs.get(name)
        if self.hub.subscribe(conn, name, state):
            try:
                await self.call(self.broker.subscribe(name))
            except BaseException:
                self.hub.unsubscribe(conn, name)
                raise
        try:
            chan = parse_channel(name)
            latest_wanted = chan.family in LATEST_VALUE
            res = await self.call(self.broker.history(name, since, 0))
            latest_pub: Publication | None = None
            if latest_wanted:
                top = await self.call(self.broker.history(name, None, 1))
                latest_pub = top.publications[-1] if top.publications else None
        except BaseException:
            if old is not None:
                self.hub.subscribe(conn, name, old)
            elif self.hub.unsubscribe(conn, name):
                with contextlib.suppress(BrokerUnavailable):
                    await self.call(self.broker.unsubscribe(name))
            raise
        missed: list[Publication] = []
        if since is not None and res.recovered:
            state.epoch, state.seq = since.epoch, since.seq
            missed = res.publications
        elif replay_latest and latest_pub is not None and latest_pub.epoch == res.position.epoch:
            # Subscribed by the server (a job started): the latest value follows at once.
            state.epoch, state.seq = latest_pub.epoch, latest_pub.seq - 1
            missed = [latest_pub]
        else:
            state.epoch, state.seq = res.position.epoch, res.position.seq
        entry: dict[str, Any] = {
            "channel": name,
            "epoch": res.position.epoch,
            "seq": res.position.seq,
            "recovered": since is not None and res.recovered,
            "missed": len(missed),
        }
        if latest_wanted:
            entry["latest"] = orjson.loads(latest_pub.payload) if latest_pub else None
        if old is None and not is_personal(name):
            self.spawn(self._presence_add(conn, name), name=f"presence-{conn.session_id}")

        def finish() -> None:
            for pub in missed:
                self.hub.deliver_to(conn, pub)
            self._drain_pending(conn, name, state)

        return entry, finish

    def _drain_pending(self, conn: Connection, name: str, state: SubState) -> None:
        pending, state.pending = state.pending or [], None
        for pub in pending:
            if pub.epoch == state.epoch and pub.seq <= state.seq:
                continue
            if pub.epoch != state.epoch or pub.seq != state.seq + 1:
                self._on_gap(conn, name)
                return
            self.hub.deliver_to(conn, pub)
        if state.overflow:
            state.overflow = False
            self._on_gap(conn, name)

    async def _presence_add(self, conn: Connection, name: str) -> None:
        # This runs as a task: an unsubscribe or a close processed before it (pipelined
        # frames) has already removed the entry, so adding it now would leave it forever.
        if conn.closed or name not in conn.subs:
            return
        info = PresenceInfo(conn.user_id, conn.claims.display_name, self.node_id)
        await self.call(self.broker.presence.add(name, conn.session_id, info))
        if conn.closed or name not in conn.subs:  # removed while the add was in flight
            await self._presence_remove(name, conn.session_id)

    async def _subscribe(self, req: Request) -> dict[str, Any]:
        items = req.data.get("channels")
        if not isinstance(items, list) or not items:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "'channels' must be a non-empty list")
        limit = self.settings.limits.channels_per_connection
        if len(items) > limit:
            raise RequestError(ErrorCode.TOO_LARGE, f"at most {limit} channels per request")
        conn = req.conn
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item in items:
            name = item.get("name") if isinstance(item, dict) else item
            try:
                since = _since(item.get("since"), str(name)) if isinstance(item, dict) else None
                chan = parse_channel(name)
                if chan.name not in conn.subs and len(conn.subs) >= limit:
                    raise RequestError(
                        ErrorCode.TOO_LARGE, f"at most {limit} channels per connection"
                    )
                await self.policy.check(conn.claims, chan)
                entry, finish = await self._attach(conn, chan.name, since)
            except RequestError as exc:
                errors.append({"channel": name, "code": exc.code.value, "message": exc.message})
                continue
            results.append(entry)
            req.after_reply.append(finish)
        return {"subscriptions": results, "errors": errors}

    async def _unsubscribe(self, req: Request) -> dict[str, Any]:
        items = req.data.get("channels")
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise RequestError(ErrorCode.INVALID_MESSAGE, "'channels' must be a list of names")
        removed = []
        for name in items:
            if name in req.conn.subs:
                removed.append(name)
                await self.unsubscribe(req.conn, name)
        return {"channels": removed}

    async def subscribe(self, conn: Connection, name: str) -> dict[str, Any]:
        """Subscribe a connection on the server's initiative (room join, job start).

        The client is told with a ``subscription.added`` direct message (its position, so
        it can recover the channel after a reconnect); a latest-value channel's newest
        publication follows it at once.
        """
        entry, finish = await self._attach(conn, name, None, replay_latest=True)
        conn.automatic.add(name)
        conn.send(encode_message("subscription.added", entry))
        finish()
        return entry

    async def unsubscribe(self, conn: Connection, name: str) -> None:
        if self.hub.unsubscribe(conn, name):
            with contextlib.suppress(BrokerUnavailable):
                await self.call(self.broker.unsubscribe(name))
        with contextlib.suppress(BrokerUnavailable):
            await self._presence_remove(name, conn.session_id)

    async def _presence_remove(self, name: str, session_id: str) -> None:
        # Personal channels keep no entries (their presence is the connection count).
        if not is_personal(name):
            await self.call(self.broker.presence.remove(name, session_id))

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """Who is on ``channel`` (cluster-wide): ``[{user_id, name, connections}]``.

        A personal channel's presence is its user's open connections (see
        :data:`~revenge_ws.core.channels.PERSONAL`); the name is the display name
        when the user has a connection on this node, else the user id.
        """
        if is_personal(channel):
            user_id = channel.partition(":")[2]
            count = await self.call(self.broker.presence.connection_count(user_id))
            if count <= 0:
                return []
            local = next(iter(self.hub.user_connections(user_id)), None)
            name = local.claims.display_name if local is not None else user_id
            return [{"user_id": user_id, "name": name, "connections": count}]
        members = await self.call(self.broker.presence.members(channel))
        users: dict[str, dict[str, Any]] = {}
        for info in members.values():
            u = users.setdefault(info.user_id, {"user_id": info.user_id, "name": info.name})
            u["connections"] = u.get("connections", 0) + 1
        return list(users.values())

    async def _refresh(self, req: Request) -> dict[str, Any]:
        token = req.data.get("token")
        if not isinstance(token, str):
            raise RequestError(ErrorCode.INVALID_MESSAGE, "'token' must be a string")
        try:
            claims = self.authenticate(token)
        except AuthError as exc:
            code = ErrorCode.TOKEN_EXPIRED if exc.expired else ErrorCode.UNAUTHORIZED
            raise RequestError(code, exc.message) from None
        if claims.sub != req.conn.claims.sub:
            raise RequestError(ErrorCode.FORBIDDEN, "the new token is for another user")
        req.conn.claims = claims
        req.conn.session.refresh(time.monotonic() + (claims.exp - time.time()))
        return {"expires_at": claims.expires_at_ms}

    # -- recovery ------------------------------------------------------------------------
    def _on_gap(self, conn: Connection, channel: str) -> None:
        key = f"{conn.session_id}\0{channel}"
        if key in self._recovering or conn.closed:
            return
        self._recovering.add(key)
        st = conn.subs.get(channel)
        if st is not None and st.pending is None:
            st.pending = []
        self.spawn(self._recover(conn, channel, key), name=f"recover-{channel}")

    async def _recover(self, conn: Connection, channel: str, key: str) -> None:
        try:
            st = conn.subs.get(channel)
            if st is None:
                return
            try:
                res = await self.call(
                    self.broker.history(channel, StreamPosition(st.epoch, st.seq), 0)
                )
            except BrokerUnavailable:
                # Try again when the broker is back (on_reconnect re-checks everyone).
                st.pending = None
                return
            if conn.subs.get(channel) is not st:
                return  # re-subscribed meanwhile: that subscription recovers itself
            self._recovering.discard(key)
            self._catch_up(conn, channel, st, res)
        finally:
            self._recovering.discard(key)

    def _catch_up(self, conn: Connection, channel: str, st: SubState, res: HistoryResult) -> None:
        """Send what ``res`` proves ``conn`` missed, or tell it the gap cannot be filled;
        then release the live publications buffered meanwhile."""
        if st.epoch == res.position.epoch and (res.recovered or st.seq == res.position.seq):
            for pub in res.publications:
                self.hub.deliver_to(conn, pub)  # skips what it already has
        else:
            st.epoch, st.seq = res.position.epoch, res.position.seq
            conn.send(
                encode_message(
                    "subscription.reset",
                    {
                        "channel": channel,
                        "epoch": st.epoch,
                        "seq": st.seq,
                        "reason": "history does not cover the gap; reload state",
                    },
                )
            )
        self._drain_pending(conn, channel, st)

    async def _recover_all(self) -> None:
        """After a broker outage: one history read per channel (not per connection),
        a bounded number at a time, each retried with backoff."""
        sem = asyncio.Semaphore(RECOVERY_CONCURRENCY)

        async def one(channel: str) -> None:
            async with sem:
                await self._recover_channel(channel)

        await asyncio.gather(*(one(ch) for ch in list(self.hub.channels)))

    async def _recover_channel(self, channel: str) -> None:
        subs = self.hub.channels.get(channel)
        if not subs:
            return
        targets: list[tuple[Connection, SubState, str]] = []
        for conn, st in list(subs.items()):
            key = f"{conn.session_id}\0{channel}"
            if key in self._recovering or st.pending is not None or conn.closed:
                continue  # already catching up on its own
            self._recovering.add(key)
            st.pending = []
            targets.append((conn, st, key))
        try:
            res: HistoryResult | None = None
            for attempt in range(RECOVERY_ATTEMPTS):
                try:
                    top = await self.call(self.broker.history(channel, None, 0))
                    lows = [st.seq for _, st, _ in targets if st.epoch == top.position.epoch]
                    res = top
                    if lows:
                        since = StreamPosition(top.position.epoch, min(lows))
                        res = await self.call(self.broker.history(channel, since, 0))
                    break
                except BrokerUnavailable:
                    await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
            for conn, st, key in targets:
                self._recovering.discard(key)
                if conn.subs.get(channel) is not st or conn.closed:
                    continue
                if res is None:
                    st.pending = None  # the broker stayed away; the next gap retries
                elif res.recovered or st.epoch != res.position.epoch:
                    self._catch_up(conn, channel, st, res)
                else:
                    # Too old for the oldest reader: each one checks its own position.
                    st.pending = None
                    self._on_gap(conn, channel)
        finally:
            for _, _, key in targets:
                self._recovering.discard(key)

    # -- broker callbacks ----------------------------------------------------------------
    def on_publication(self, pub: Publication) -> None:
        n = self.hub.deliver(pub)
        if n:
            self.observer.messages_out(pub.type, n)
            self.observer.publish_latency(max(0.0, now_ms() - pub.created_ms) / 1000.0)

    def on_control(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        user = message.get("user_id")
        if op in ("disconnect", "revoke") and isinstance(user, str):
            default = CloseCode.UNAUTHORIZED if op == "revoke" else CloseCode.DISCONNECTED
            code = message.get("code") or default
            reason = str(message.get("reason") or ("token revoked" if op == "revoke" else ""))
            for conn in list(self.hub.user_connections(user)):
                conn.close(int(code), reason[:120])
        elif op == "subscribe_user" and isinstance(user, str):
            channel = str(message.get("channel"))
            limit = self.settings.limits.channels_per_connection
            for conn in list(self.hub.user_connections(user)):
                if channel not in conn.subs and len(conn.subs) < limit and not conn.closed:
                    self.spawn(self.subscribe(conn, channel), name=f"subscribe-{channel}")
        elif op == "session" and isinstance(message.get("session_id"), str):
            target = self.hub.connections.get(message["session_id"])
            if target is not None:
                raw = message.get("payload")
                after = message.get("after_seq")
                self.spawn(
                    self._session_local(
                        target,
                        str(message.get("action")),
                        message.get("channel"),
                        raw.encode() if isinstance(raw, str) else None,
                        after if isinstance(after, int) else None,
                    ),
                    name="session-action",
                )
        elif op == "end_channel":
            channel = str(message.get("channel"))
            notice = encode_message("subscription.ended", {"channel": channel, "reason": "ended"})
            for conn in list(self.hub.channels.get(channel, ())):
                conn.send(notice)
                self.spawn(self.unsubscribe(conn, channel), name=f"end-{channel}")
        elif op == "broadcast" and isinstance(message.get("payload"), str):
            # Direct message to every local connection of a user (cluster-wide send).
            target = message.get("user_id")
            payload = message["payload"].encode()
            for conn in list(self.hub.user_connections(str(target))):
                conn.send(payload)

    def on_reconnect(self) -> None:
        self.spawn(self._recover_all(), name="recover-all")

    # -- server-initiated ----------------------------------------------------------------
    async def publish(
        self,
        channel: str,
        mtype: str,
        data: dict[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> Publication:
        """Publish on a channel (backend API, features). Raises ``BrokerUnavailable``."""
        chan = parse_channel(channel)
        family = self.settings.history_for(chan.family.value)
        pub: Publication = await self.call(
            self.broker.publish(channel, mtype, data, family, idempotency_key=idempotency_key)
        )
        return pub

    async def send_to_user(self, user_id: str, mtype: str, data: dict[str, Any]) -> None:
        """A direct message (no ``seq``) to every connection of a user, on every node."""
        payload = encode_message(mtype, data).decode()
        await self.call(
            self.broker.publish_control({"op": "broadcast", "user_id": user_id, "payload": payload})
        )

    async def session_action(
        self,
        session_id: str,
        action: str,
        *,
        channel: str | None = None,
        payload: bytes | None = None,
        after_seq: int | None = None,
    ) -> None:
        """Act on one connection wherever it is: here, or on another node via the broker.

        ``action`` is ``send`` (a direct message), ``subscribe`` or ``unsubscribe``; an
        unsubscribe waits (bounded) until the connection got ``after_seq`` on the channel.
        """
        conn = self.hub.connections.get(session_id)
        if conn is not None:
            await self._session_local(conn, action, channel, payload, after_seq)
            return
        await self.call(
            self.broker.publish_control(
                {
                    "op": "session",
                    "session_id": session_id,
                    "action": action,
                    "channel": channel,
                    "payload": payload.decode() if payload is not None else None,
                    "after_seq": after_seq,
                }
            )
        )

    async def _session_local(
        self,
        conn: Connection,
        action: str,
        channel: str | None,
        payload: bytes | None,
        after_seq: int | None = None,
    ) -> None:
        if action == "send" and payload is not None:
            conn.send(payload)
        elif action == "subscribe" and channel is not None and not conn.closed:
            await self.subscribe(conn, channel)
            if channel.startswith("playback:"):
                conn.room_id = channel.partition(":")[2]
        elif action == "unsubscribe" and channel is not None:
            if after_seq is not None:
                await self._delivered(conn, channel, after_seq)
            if channel not in conn.subs:
                return
            await self.unsubscribe(conn, channel)
            conn.send(encode_message("subscription.ended", {"channel": channel, "reason": "left"}))
            if channel.startswith("playback:") and conn.room_id == channel.partition(":")[2]:
                conn.room_id = None

    async def _delivered(
        self, conn: Connection, channel: str, seq: int, limit: float = 2.0
    ) -> None:
        """Wait until ``conn`` got publication ``seq`` of ``channel`` (or ``limit`` s)."""
        for _ in range(int(limit / 0.01)):
            st = conn.subs.get(channel)
            if st is None or conn.closed or (st.pending is None and st.seq >= seq):
                return
            await asyncio.sleep(0.01)

    async def disconnect_user(self, user_id: str, code: int, reason: str) -> None:
        await self.call(
            self.broker.publish_control(
                {"op": "disconnect", "user_id": user_id, "code": code, "reason": reason}
            )
        )

    async def revoke_user(self, user_id: str) -> float:
        """Refuse every token of ``user_id`` issued before now; close their connections."""
        at = now_ms()
        await self.call(self.broker.set_value(f"revoked:{user_id}", repr(at), REVOCATION_TTL))
        await self.call(
            self.broker.publish_control({"op": "revoke", "user_id": user_id, "code": 4501})
        )
        return at

    async def join_room_on_connect(
        self, conn: Connection, room_id: str, query: dict[str, str]
    ) -> None:
        """The playback endpoint joins its room right after the welcome."""
        if self.room_join is not None:
            await self.room_join(conn, room_id, query)

    def new_session_id(self) -> str:
        return uuid.uuid4().hex

    # -- housekeeping ----------------------------------------------------------------
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            # In a function of its own: a loop variable here would keep the last connection
            # it saw (and its socket) alive while the sweeper sleeps.
            self._sweep_once(time.monotonic())

    def _sweep_once(self, now: float) -> None:
        interval = self.settings.heartbeat.interval
        for conn in self.hub:
            if conn.closed:
                continue
            verdict = conn.session.check(now)
            if verdict is not None:
                self.close_connection(conn, verdict.code, verdict.reason)
            elif now - conn.session.last_seen >= interval and now - conn.last_ping >= interval:
                conn.last_ping = now
                conn.transport.ping()
