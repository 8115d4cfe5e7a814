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
from typing import Any, Literal, TypeVar

from ..auth import Claims, TokenVerifier
from ..broker.base import Broker, Publication
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
    encode_ack,
    encode_error,
    encode_message,
    now_ms,
)
from . import control
from .admission import Admission
from .channels import (
    ChannelPolicy,
    automatic_channels,
    lingers,
    parse_channel,
)
from .connection import Connection, Flusher, Transport
from .connlog import ConnectionLog
from .hub import Hub
from .observer import NullObserver, Observer
from .outbox import Outbox
from .session import Close, Dispatch, Replay, Reply, Session, SessionLimits
from .subscriptions import Subscriptions

__all__ = ["Endpoint", "Handler", "Node", "Request"]

log = logging.getLogger("revenge_ws.node")

#: How often the sweeper checks heartbeats and token expiry (s).
SWEEP_INTERVAL = 1.0
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


@dataclass(slots=True)
class Request:
    """One dispatched client request, as a handler sees it."""

    node: Node
    conn: Connection
    envelope: Envelope
    t_recv_ms: float
    #: Run after the reply is queued (e.g. missed publications follow the subscribe ack).
    after_reply: list[Callable[[], None]] = field(default_factory=list)
    #: Set by :meth:`defer`: the future whose result is the reply.
    deferred: asyncio.Future[dict[str, Any]] | None = None

    def defer(self, result: asyncio.Future[dict[str, Any]]) -> None:
        """Reply with ``result`` (its value, or the error it holds) once it is done,
        without holding up the connection's next frames; whoever made it bounds the
        wait (a timer that settles it). Call it last: the handler's own return value
        is then ignored. No task waits: the reply is sent from the future's callback."""
        self.deferred = result

    @property
    def data(self) -> dict[str, Any]:
        return self.envelope.data

    @property
    def claims(self) -> Claims:
        return self.conn.claims


T = TypeVar("T")
Handler = Callable[[Request], Awaitable[dict[str, Any]]]
Hook = Callable[[Connection], Awaitable[None]]
#: A server-initiated subscription of a connection began (True) or ended (False).
SubscriptionHook = Callable[[Connection, str, bool], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A WebSocket endpoint with a path key (``/api/v1/ws/playback/{room_id}``), served by
    a feature: ``admit`` checks the handshake before the upgrade (raises
    :class:`~revenge_ws.exceptions.RequestError`), ``opened`` acts once the connection is
    open and its ``welcome`` queued. Both get the key and the query parameters."""

    admit: Callable[[Claims, str, dict[str, str]], Awaitable[None]]
    opened: Callable[[Connection, str, dict[str, str]], Awaitable[None]]


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
        self.subscriptions = Subscriptions(self)
        self.hub = Hub(on_gap=self.subscriptions.on_gap)
        self.policy = ChannelPolicy()
        self.handlers: dict[str, Handler] = {}
        self.on_connect: list[Hook] = []
        self.on_disconnect: list[Hook] = []
        #: Keyed endpoints by name (``playback``), registered by features.
        self.endpoints: dict[str, Endpoint] = {}
        #: Told when a connection is subscribed or unsubscribed on the server's initiative
        #: by a session action (a SyncPlay room joined or left).
        self.on_server_subscription: list[SubscriptionHook] = []
        #: Features' handlers of the control messages the node itself does not act on.
        self.control_hooks: list[Callable[[control.ControlMessage], None]] = []
        self.clock: Callable[[], float] = time.monotonic
        self.closing = False
        #: The spread window the closing node advised to its clients (s).
        self.stop_window = 0.0
        self.started_at = time.time()
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
        self.admission = Admission(self)
        self.conn_log = ConnectionLog(self.admission.storm.storming)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._flusher: Flusher | None = None
        self.register("subscribe", self.subscriptions.handle_subscribe)
        self.register("unsubscribe", self.subscriptions.handle_unsubscribe)
        self.register("auth.refresh", self._refresh)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        await self.broker.start(self)
        self._sweeper = asyncio.create_task(self._sweep(), name="revenge-sweeper")
        if self.settings.server.max_loop_lag > 0:
            self.spawn(self.admission.watch_lag(), name="loop-lag")

    async def stop(self, code: int = CloseCode.SERVICE_RESTART, reason: str | None = None) -> None:
        """Refuse new connections, run the stop hooks (flush batches, tell admins), then
        close every open connection with ``code``. Idempotent.

        The reason advises clients to spread their reconnects over
        :meth:`spread_window` seconds (``"restart; window=10"``), so a restart does not
        turn into a reconnect storm.
        """
        window = self.admission.spread_window()
        self.stop_window = window
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
        self.conn_log.close()
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

    def close_connection(
        self, conn: Connection, code: int, reason: str, window: float | None = None
    ) -> None:
        """Close ``conn``; a close that asks the client to come back advises the spread
        window in its reason."""
        if code in COME_BACK:
            w = self.admission.spread_window() if window is None else window
            reason = f"{reason}; window={w:g}"
        conn.close(code, reason)

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
        mono = time.monotonic()
        session = Session(
            session_id,
            claims.sub,
            mono + (claims.exp - time.time()),
            self._limits,
            mono,
        )
        if self._flusher is None:
            self._flusher = Flusher(
                asyncio.get_running_loop(), linger=self.settings.server.storm_linger
            )
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
                entry, finish = await self.subscriptions.attach(conn, name, None)
            except (TimeoutError, BrokerUnavailable):
                log.warning("broker unavailable: %s not subscribed for %s", name, session_id)
                continue
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
        self.conn_log.connected(claims.sub, session_id)
        if self.admission.opened(session_id):
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
            except (BrokerUnavailable, StoreUnavailable, TimeoutError) as exc:
                # Unavailable or too slow (a store queue in a storm): the client is served
                # anyway, and gets its re-sends at its next connection. No traceback.
                log.warning("%s hook for %s: %s", what, conn.session_id, _reason(exc))
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
        self.conn_log.disconnected(conn.user_id, conn.session_id, conn.close_code, duration)
        if self.closing:
            # The node stops: the broker forgets all of its entries in one pipelined pass
            # when it closes (a Redis broker's presence.forget_all), not in ~6 round trips
            # per connection (10,000 connections took 6 s, while their clients found no
            # node to come back to); and a restart reports nobody offline.
            await self._disconnect_hooks(conn)
            return
        # The user's slot first: a client that closes one connection to open another
        # must find it free as soon as the socket is gone from this node.
        remaining = await self.admission.release(conn.claims, conn.session_id)
        await self._disconnect_hooks(conn)
        with contextlib.suppress(BrokerUnavailable):
            for ch in emptied:
                await self.call(self.broker.unsubscribe(ch))
            for ch in channels:
                await self.subscriptions.presence_remove(ch, conn.session_id)
        if remaining == 0:
            await self._run_hooks(list(self.on_user_offline), conn, "offline")

    async def _disconnect_hooks(self, conn: Connection) -> None:
        setup = self._connecting.pop(conn.session_id, None)
        if setup is not None and not setup.done():
            # Disconnect hooks must follow the connect hooks, never race them.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(setup), HOOK_WAIT)
        await self._run_hooks(list(self.on_disconnect), conn, "disconnect")

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

        async def run() -> dict[str, Any]:
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {env.type!r}")
            async with asyncio.timeout(self.settings.broker.timeout * 2):
                return await handler(req)

        payload, failed = await self._outcome(env, run())
        deferred = req.deferred
        if deferred is not None:
            if failed:
                deferred.cancel()  # the handler failed after deferring: its reply stands
            else:
                # The reply comes later (a remote command waits for a device): the
                # connection goes on reading meanwhile; its slot stays in flight.
                deferred.add_done_callback(
                    lambda f: self._complete(conn, req, self._settled(env, f))
                )
                return
        self._complete(conn, req, payload)

    async def _outcome(
        self, env: Envelope, work: Coroutine[Any, Any, dict[str, Any]]
    ) -> tuple[bytes | None, bool]:
        """The reply to ``env`` once ``work`` is done (an ack, or the error it raised;
        None: no reply, the request had no id), and whether it failed."""
        try:
            result = await work
        except Exception as exc:
            return self._error(env, exc), True
        return (encode_ack(env.id, result) if env.id is not None else None), False

    def _settled(self, env: Envelope, fut: asyncio.Future[dict[str, Any]]) -> bytes | None:
        """The reply to a deferred request whose future is done."""
        if fut.cancelled():
            return self._error(env, TimeoutError())
        exc = fut.exception()
        if exc is not None:
            return self._error(env, exc)
        return encode_ack(env.id, fut.result()) if env.id is not None else None

    def _error(self, env: Envelope, exc: BaseException) -> bytes:
        if isinstance(exc, ProtocolError):
            return encode_error(env.id, exc.code, exc.message, exc.retryable)
        if isinstance(exc, BrokerUnavailable | StoreUnavailable | TimeoutError):
            log.warning("%s failed: %s", env.type, _reason(exc))
            return encode_error(env.id, ErrorCode.UNAVAILABLE, "temporarily unavailable", True)
        log.error("handler %s failed", env.type, exc_info=exc)
        return encode_error(env.id, ErrorCode.INTERNAL, "internal error", True)

    def _complete(self, conn: Connection, req: Request, payload: bytes | None) -> None:
        env = req.envelope
        if payload is None:
            conn.session.complete(env, b"", time.monotonic())
        else:
            for _ in range(conn.session.complete(env, payload, time.monotonic())):
                conn.send(payload)
        for after in req.after_reply:
            after()

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

    # -- broker callbacks ----------------------------------------------------------------
    def on_publication(self, pub: Publication) -> None:
        lazy = lingers(pub.channel) and self.admission.storm.storming(time.monotonic())
        n = self.hub.deliver(pub, lazy)
        if n:
            self.observer.messages_out(pub.type, n)
            self.observer.publish_latency(max(0.0, now_ms() - pub.created_ms) / 1000.0)

    def on_control(self, message: dict[str, Any]) -> None:
        msg = control.decode(message)
        if msg is None:
            log.warning("ignored a control message this node does not understand")
            return
        match msg:
            case control.Disconnect() | control.Revoke():
                for conn in list(self.hub.user_connections(msg.user_id)):
                    conn.close(msg.code, msg.reason)
            case control.SubscribeUser(user_id=user, channel=channel):
                limit = self.settings.limits.channels_per_connection
                for conn in list(self.hub.user_connections(user)):
                    if channel not in conn.subs and len(conn.subs) < limit and not conn.closed:
                        self.spawn(
                            self.subscriptions.subscribe(conn, channel), name="subscribe-user"
                        )
            case control.SessionAction(session_id=sid):
                target = self.hub.connections.get(sid)
                if target is not None:
                    self.spawn(self._session_local(target, msg), name="session-action")
            case control.EndChannel(channel=channel):
                notice = encode_message(
                    "subscription.ended", {"channel": channel, "reason": "ended"}
                )
                for conn in list(self.hub.channels.get(channel, ())):
                    conn.send(notice)
                    self.spawn(self.subscriptions.unsubscribe(conn, channel), name="end-channel")
            case control.Broadcast(user_id=user, payload=payload):
                # A direct message to every local connection of a user (cluster-wide send).
                frame = payload.encode()
                for conn in list(self.hub.user_connections(user)):
                    conn.send(frame)
            case _:
                # A feature's own message (devices: takeovers, remote commands).
                for hook in self.control_hooks:
                    hook(msg)

    def on_reconnect(self) -> None:
        self.spawn(self.subscriptions.recover_all(), name="recover-all")

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

    async def send_control(self, msg: control.ControlMessage) -> None:
        """Send a control message to every node, this one included."""
        await self.call(self.broker.publish_control(control.encode(msg)))

    async def send_to_user(self, user_id: str, mtype: str, data: dict[str, Any]) -> None:
        """A direct message (no ``seq``) to every connection of a user, on every node."""
        await self.send_control(control.Broadcast(user_id, encode_message(mtype, data).decode()))

    async def session_action(
        self,
        session_id: str,
        action: Literal["send", "subscribe", "unsubscribe"],
        *,
        channel: str | None = None,
        payload: bytes | None = None,
        after_seq: int | None = None,
    ) -> None:
        """Act on one connection wherever it is: here, or on another node via the broker.

        ``action`` is ``send`` (a direct message), ``subscribe`` or ``unsubscribe``; an
        unsubscribe waits (bounded) until the connection got ``after_seq`` on the channel.
        """
        msg = control.SessionAction(
            session_id,
            action,
            channel,
            payload.decode() if payload is not None else None,
            after_seq,
        )
        conn = self.hub.connections.get(session_id)
        if conn is not None:
            await self._session_local(conn, msg)
        else:
            await self.send_control(msg)

    async def _session_local(self, conn: Connection, msg: control.SessionAction) -> None:
        channel = msg.channel
        if msg.action == "send" and msg.payload is not None:
            conn.send(msg.payload.encode())
        elif msg.action == "subscribe" and channel is not None and not conn.closed:
            await self.subscriptions.subscribe(conn, channel)
            for hook in self.on_server_subscription:
                hook(conn, channel, True)
        elif msg.action == "unsubscribe" and channel is not None:
            if msg.after_seq is not None:
                await self._delivered(conn, channel, msg.after_seq)
            if channel not in conn.subs:
                return
            await self.subscriptions.unsubscribe(conn, channel)
            conn.send(encode_message("subscription.ended", {"channel": channel, "reason": "left"}))
            for hook in self.on_server_subscription:
                hook(conn, channel, False)

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
        await self.send_control(control.Disconnect(user_id, code, reason))

    async def revoke_user(self, user_id: str) -> float:
        """Refuse every token of ``user_id`` issued before now; close their connections."""
        at = now_ms()
        await self.call(self.broker.set_value(f"revoked:{user_id}", repr(at), REVOCATION_TTL))
        await self.send_control(control.Revoke(user_id))
        return at

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


def _reason(exc: BaseException) -> str:
    """A log line's reason: the message, or the kind of failure when it has none
    (``TimeoutError()`` prints as nothing)."""
    return str(exc) or ("timeout" if isinstance(exc, TimeoutError) else type(exc).__name__)
