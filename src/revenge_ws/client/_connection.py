"""The client's connection loop: connect, welcome, re-subscribe, read, ping, refresh
the token, and reconnect after whatever ended the connection.

:class:`ConnectionLoop` holds every piece of a client's state and the request/reply
machinery on the socket; :class:`~revenge_ws.client.Client` adds the application API
on top. It stays one module of ~800 lines because it is one concern, a state machine
over one socket: every method here reads or writes the same generation counter, pending
requests, tracker and events, and splitting it would only scatter that state.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import orjson

from ..codes import CloseCode, ErrorCode, should_reconnect
from ..exceptions import ClientError, ConnectionClosed, RequestError, RequestTimeout
from ..protocol import SUBPROTOCOL, now_ms
from ._backoff import (
    ReconnectPolicy,
    advised_window,
    reconnect_delay,
)
from ._clock import ClockSample, ClockSync
from ._tracker import Tracker, Verdict
from ._types import (
    MAX_UNAUTHORIZED,
    MIN_REFRESH_GAP,
    REPLY_TYPES,
    SUBSCRIBE_CHUNK,
    ClientConfig,
    ClientStats,
    DeviceInfo,
    DeviceState,
    Disconnect,
    Handler,
    Message,
    Pending,
    RecoveryCallback,
    TokenProvider,
)
from ._wire import decode, header_seconds, is_int, is_num, welcome_window

log = logging.getLogger("revenge_ws.client")


class ConnectionLoop:
    """The state and the connection loop of a :class:`~revenge_ws.client.Client`."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        on_recovery_failed: RecoveryCallback | None = None,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        token_in_query: bool = False,
        headers: Mapping[str, str] | None = None,
        origin: str | None = None,
        queue_size: int = 100,
        request_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        backoff_min: float = 0.5,
        backoff_max: float = 20.0,
        restart_window: float = 5.0,
        rate_limit_wait: float = 5.0,
        stable_after: float = 5.0,
        refresh_margin: float | None = 60.0,
        initial_pings: int = 3,
        initial_ping_interval: float = 1.0,
        ping_interval: float | None = None,
        watchdog_timeout: float | None = None,
        clock_samples: int = 8,
        reconnect: bool = True,
        notification_ids: int = 10_000,
        max_msg_size: int = 4 * 1024 * 1024,
        device: DeviceInfo | None = None,
        playback_interval: float = 10.0,
        command_timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.config = ClientConfig(
            token_in_query=token_in_query,
            headers=dict(headers) if headers else None,
            origin=origin,
            queue_size=max(0, queue_size),
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
            policy=ReconnectPolicy(
                backoff_min=backoff_min,
                backoff_max=backoff_max,
                restart_window=restart_window,
                rate_limit_wait=rate_limit_wait,
            ),
            stable_after=stable_after,
            refresh_margin=refresh_margin,
            initial_pings=max(0, initial_pings),
            initial_ping_interval=initial_ping_interval,
            ping_interval=ping_interval,
            watchdog_timeout=watchdog_timeout,
            clock_samples=clock_samples,
            reconnect=reconnect,
            notification_ids=notification_ids,
            max_msg_size=max_msg_size,
            playback_interval=playback_interval,
            command_timeout=command_timeout,
        )
        self._token = token
        self._provider = token_provider
        self._need_token = token is None and token_provider is not None
        self._on_recovery_failed = on_recovery_failed
        self._rng = rng or random.Random()
        self._local_ms: Callable[[], float] = now_ms if clock is None else clock
        self._session = session
        self._own_session = session is None
        self.stats = ClientStats()
        self.clock = ClockSync(clock_samples)
        #: The last ``welcome`` data (None before the first connection).
        self.welcome: dict[str, Any] | None = None
        #: The close code and reason that ended the last connection.
        self.last_close: tuple[int | None, str] | None = None
        self._tracker = Tracker(notification_ids)
        self._handlers: dict[str, list[Handler]] = {}
        self._queue: deque[Message] = deque()
        self._queue_event = asyncio.Event()
        self._iterated = False
        self._pending: dict[str, Pending] = {}
        self._ids = itertools.count(1)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._gen = 0
        self._connected = asyncio.Event()
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False
        self._error: ConnectionClosed | None = None
        self._main: asyncio.Task[None] | None = None
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._bg: set[asyncio.Future[Any]] = set()
        self._coarse_offset: float | None = None
        self._expires_at: float | None = None
        self._ping_interval = 30.0
        self._watchdog = 90.0
        self._welcome_window: float | None = None
        self._abort_reason: str | None = None
        self._unauthorized = 0
        self._state = "idle"
        self._dev = DeviceState(device)

    @property
    def clock_offset(self) -> float | None:
        """Server clock minus local clock (ms): the min-delay of the last 8 ping samples,
        or the welcome's rough estimate before the first pong."""
        offset = self.clock.offset
        return self._coarse_offset if offset is None else offset

    @property
    def rtt(self) -> float | None:
        """Round-trip time (ms, server processing excluded) of the min-delay sample of the
        last ``clock_samples`` pings: the one :attr:`clock_offset` comes from. Queueing
        only ever adds delay, so this is the path's own RTT without one-off spikes; what
        SyncPlay's lead (2 x the worst member's RTT) should be built on."""
        return self.clock.delay

    @property
    def rtt_latest(self) -> float | None:
        """Round-trip time of the latest ping (ms), jitter included."""
        latest = self.clock.latest
        return None if latest is None else latest.delay

    def local_time(self) -> float:
        """The local clock (ms since the Unix epoch): the ``clock`` given, or the system's."""
        return self._local_ms()

    def server_time(self) -> float:
        """The server's clock now (ms since the Unix epoch), as estimated."""
        return self._local_ms() + (self.clock_offset or 0.0)

    # -- internals: requests -------------------------------------------------------
    async def _ready(self, deadline: float | None, exc_type: type[Exception]) -> None:
        if self._main is None:
            raise ClientError("the client is not started (use 'async with Client(...)')")
        loop = asyncio.get_running_loop()
        while not self._connected.is_set():
            if self._done.is_set():
                err = self._error
                if err is not None:
                    raise ConnectionClosed(err.code, err.reason)
                raise ConnectionClosed(CloseCode.NORMAL, "client closed")
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise exc_type("not connected in time")
            waiters = [
                asyncio.ensure_future(self._connected.wait()),
                asyncio.ensure_future(self._done.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)

    async def _call(
        self,
        mtype: str,
        data: dict[str, Any],
        timeout: float,
        on_reply: Callable[[Message, float], None] | None = None,
    ) -> Message:
        """Send one request with an id on the current connection; returns the reply
        envelope (``ack`` or ``pong``). ``on_reply`` runs on the reader, before any later
        frame is handled."""
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionClosed(None, "not connected")
        mid = f"c{next(self._ids)}"
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[mid] = Pending(fut, on_reply)
        try:
            try:
                await ws.send_str(orjson.dumps({"type": mtype, "id": mid, "data": data}).decode())
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                raise ConnectionClosed(None, f"send failed: {exc}") from None
            try:
                async with asyncio.timeout(timeout):
                    reply = await fut
            except TimeoutError:
                raise RequestTimeout(f"no reply to {mtype!r} within {timeout:g}s") from None
        finally:
            self._pending.pop(mid, None)
        if reply.get("type") == "error":
            err = reply.get("data") or {}
            try:
                code = ErrorCode(str(err.get("code")))
            except ValueError:
                code = ErrorCode.INTERNAL
            raise RequestError(
                code,
                str(err.get("message") or code.value),
                retryable=bool(err.get("retryable", False)),
                request_id=mid,
            )
        return reply

    async def _ping(self, timeout: float) -> ClockSample | None:
        result: list[ClockSample | None] = [None]
        t0 = self._local_ms()

        def on_pong(msg: Message, t3: float) -> None:
            data = msg.get("data") or {}
            t1, t2 = data.get("t1"), data.get("t2")
            if msg.get("type") == "pong" and is_num(t1) and is_num(t2):
                result[0] = self.clock.add(t0, float(t1), float(t2), t3)

        self.stats.pings += 1
        await self._call("ping", {"t0": t0}, timeout, on_reply=on_pong)
        return result[0]

    def _subscribe_reply(self, names: list[str], gen: int) -> Callable[[Message, float], None]:
        """The ack of a ``subscribe`` is applied on the reader, before the missed
        publications that follow it."""

        def apply(msg: Message, _t3: float) -> None:
            if msg.get("type") != "ack":
                self._tracker.cancel(names)
                return
            data = msg.get("data") or {}
            for entry in data.get("subscriptions") or []:
                if not isinstance(entry, dict):
                    continue
                name = entry.get("channel")
                st = self._tracker.channels.get(name) if isinstance(name, str) else None
                recovering = st is not None and st.sent_since is not None
                ok = self._tracker.apply_entry(entry, gen)
                if recovering:
                    self.stats.recoveries += 1
                if not ok and isinstance(name, str):
                    self._recovery_failed(
                        name,
                        entry.get("epoch"),
                        entry.get("seq"),
                        "history does not cover the gap (recovered: false)",
                        entry.get("latest"),
                    )
            for e in data.get("errors") or []:
                if not isinstance(e, dict) or not isinstance(e.get("channel"), str):
                    continue
                name = e["channel"]
                st = self._tracker.channels.get(name)
                self._tracker.forget(name)
                if st is not None and st.generation >= 0:
                    log.warning("re-subscribing %s was refused: %s", name, e.get("code"))
                self._emit("client.subscription_error", dict(e))

        return apply

    # -- hooks (the device layer, ``_device.py``, fills them in) ---------------------
    async def _before_resubscribe(self, gen: int) -> bool:
        """Requests of a new connection before its re-subscription; False: the
        connection was given up (the reconnect follows)."""
        return True

    def _on_direct(self, msg: Message) -> bool:
        """A direct message (no channel) on the reader; True: consumed, not delivered."""
        return False

    # -- internals: the connection loop --------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                self._state = "connecting"
                self.stats.attempts += 1
                disc = await self._connect_once()
                if self._closing:
                    break
                if disc.opened:
                    self.stats.disconnects += 1
                    self.last_close = (disc.code, disc.reason)
                terminal = self._terminal(disc)
                if terminal is not None or not self.config.reconnect:
                    self._error = terminal or ConnectionClosed(disc.code, disc.reason)
                    log.warning("not reconnecting: %s", self._error)
                    self._emit("client.disconnected", self._disc_event(disc, None))
                    break
                if disc.stable:
                    attempt = 0
                if disc.code == CloseCode.TOKEN_EXPIRED and self._provider is not None:
                    self._need_token = True
                delay = reconnect_delay(
                    self.config.policy,
                    attempt,
                    self._rng,
                    code=disc.code,
                    http_status=disc.http_status,
                    retry_after=disc.retry_after,
                    window=disc.window,
                )
                attempt += 1
                if disc.opened:
                    level = logging.INFO
                elif attempt in (1, 5) or attempt % 20 == 0:
                    level = logging.WARNING  # a wrong URL or a long outage shows in the log
                else:
                    level = logging.DEBUG
                log.log(
                    level, "disconnected (%s %s); retry in %.2fs", disc.code, disc.reason, delay
                )
                self._emit("client.disconnected", self._disc_event(disc, delay))
                self._state = "waiting"
                self._wake.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the wait ends (close() would hang).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("client loop failed")
            self._error = ConnectionClosed(None, "client loop failed")
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._done.is_set():
            return
        self._state = "closed"
        self._connected.clear()
        self._done.set()
        self._queue_event.set()
        err = self._error
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.set_exception(
                    ConnectionClosed(err.code, err.reason)
                    if err
                    else ConnectionClosed(CloseCode.NORMAL, "client closed")
                )
        self._pending.clear()
        self._emit(
            "client.closed",
            {"code": err.code if err else None, "reason": err.reason if err else "closed"},
        )

    @staticmethod
    def _disc_event(disc: Disconnect, delay: float | None) -> dict[str, Any]:
        return {
            "code": disc.code,
            "reason": disc.reason,
            "http_status": disc.http_status,
            "reconnect_in": delay,
            "opened": disc.opened,
        }

    def _terminal(self, disc: Disconnect) -> ConnectionClosed | None:
        """None when the client should reconnect after ``disc``."""
        status = disc.http_status
        if status is not None:
            if status == 401:
                self._unauthorized += 1
                if self._provider is not None and self._unauthorized < MAX_UNAUTHORIZED:
                    self._need_token = True
                    return None
                return ConnectionClosed(CloseCode.UNAUTHORIZED, disc.reason)
            if 400 <= status < 500 and status not in (408, 429):
                return ConnectionClosed(CloseCode.POLICY, disc.reason)
            return None
        if disc.code is not None and not should_reconnect(disc.code):
            return ConnectionClosed(disc.code, disc.reason)
        return None

    async def _token_now(self) -> str | None:
        if self._provider is not None and (self._need_token or self._token is None):
            token = await self._provider()
            self._token = token
            self._need_token = False
        return self._token

    def _connect_target(self, token: str | None) -> tuple[str, dict[str, str]]:
        headers = dict(self.config.headers or {})
        url = self.url
        if token:
            if self.config.token_in_query:
                parts = urlsplit(url)
                query = [(k, v) for k, v in parse_qsl(parts.query) if k != "token"]
                query.append(("token", token))
                url = urlunsplit(parts._replace(query=urlencode(query)))
            else:
                headers["Authorization"] = f"Bearer {token}"
        return url, headers

    async def _connect_once(self) -> Disconnect:
        assert self._session is not None
        cfg = self.config
        try:
            token = await self._token_now()
        except Exception as exc:
            log.warning("token provider failed: %s", type(exc).__name__)
            return Disconnect(reason=f"token provider failed: {type(exc).__name__}")
        url, headers = self._connect_target(token)
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                ws = await self._session.ws_connect(
                    url,
                    protocols=(SUBPROTOCOL,),
                    headers=headers,
                    origin=cfg.origin,
                    autoping=True,
                    heartbeat=None,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=cfg.close_timeout),
                    max_msg_size=cfg.max_msg_size,
                )
                first = await ws.receive()
        except aiohttp.WSServerHandshakeError as exc:
            if ws is not None:
                await self._close_ws(ws)
            return Disconnect(
                reason=f"handshake refused: HTTP {exc.status} {exc.message}",
                http_status=exc.status,
                retry_after=header_seconds(exc.headers, "Retry-After"),
                window=header_seconds(exc.headers, "Reconnect-Window"),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if ws is not None:
                await self._close_ws(ws)
            return Disconnect(reason=f"connect failed: {type(exc).__name__}: {exc}")
        except BaseException:
            if ws is not None:
                await self._close_ws(ws)
            raise
        t3 = self._local_ms()
        if self._closing:
            await self._close_ws(ws)
            return Disconnect(reason="client closed")
        if first.type is aiohttp.WSMsgType.CLOSE:
            await self._close_ws(ws)
            return self._closed_by_server(int(first.data), str(first.extra or ""))
        welcome = decode(first.data) if first.type is aiohttp.WSMsgType.TEXT else None
        if welcome is None or welcome.get("type") != "welcome":
            await self._close_ws(ws, CloseCode.POLICY, b"expected welcome")
            return Disconnect(reason="the first frame was not a welcome")
        if ws.protocol != SUBPROTOCOL:
            log.warning("the server did not select %s (got %r)", SUBPROTOCOL, ws.protocol)
        self._unauthorized = 0
        loop = asyncio.get_running_loop()
        opened = loop.time()
        try:
            disc = await self._serve(ws, welcome.get("data") or {}, t3)
        finally:
            await self._close_ws(ws)
        disc.opened = True
        disc.stable = loop.time() - opened >= cfg.stable_after
        return disc

    def _closed_by_server(self, code: int, reason: str) -> Disconnect:
        window = advised_window(reason, self.config.policy.max_window)
        if window is None and code in (CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART):
            window = self._welcome_window
        return Disconnect(code=code, reason=reason, window=window)

    async def _serve(
        self, ws: aiohttp.ClientWebSocketResponse, welcome: dict[str, Any], t3: float
    ) -> Disconnect:
        self._gen += 1
        gen = self._gen
        self._ws = ws
        self._abort_reason = None
        items = self._on_welcome(welcome, t3, gen)
        self._state = "connected"
        for coro, name in (
            (self._resync(items, gen), "resync"),
            (self._pinger(), "pinger"),
            (self._refresher(), "refresher"),
        ):
            task = asyncio.create_task(coro, name=f"revenge-client-{name}")
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)
        disc = Disconnect(code=None, reason="")
        try:
            disc = await self._read(ws)
        finally:
            self._ws = None
            self._connected.clear()
            tasks = list(self._conn_tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for p in list(self._pending.values()):
                if not p.future.done():
                    p.future.set_exception(ConnectionClosed(disc.code, disc.reason))
            self._pending.clear()
        return disc

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> Disconnect:
        """The reader: every frame of one connection, in order, until it ends."""
        while True:
            try:
                msg = await ws.receive(timeout=self._watchdog)
            except TimeoutError:
                self.stats.watchdog_fired += 1
                log.warning("nothing received for %.1fs: reconnecting", self._watchdog)
                return Disconnect(reason=f"watchdog: nothing received for {self._watchdog:g}s")
            kind = msg.type
            if kind is aiohttp.WSMsgType.TEXT:
                self._on_frame(msg.data, self._local_ms())
            elif kind is aiohttp.WSMsgType.CLOSE:
                return self._closed_by_server(int(msg.data), str(msg.extra or ""))
            elif kind in (
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                reason = self._abort_reason or (
                    f"connection lost: {msg.data}" if msg.data else "connection lost"
                )
                code = ws.close_code
                if code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE or self._abort_reason:
                    code = None
                return Disconnect(code=code, reason=reason)
            # BINARY frames are not part of the contract: ignored.

    def _on_welcome(self, data: dict[str, Any], t3: float, gen: int) -> list[str | dict[str, Any]]:
        previous = self.welcome
        self.welcome = data
        if previous is not None and previous.get("node_id") != data.get("node_id"):
            self.clock.reset()  # another machine, maybe another clock
        server_time = data.get("server_time")
        self._coarse_offset = float(server_time) - t3 if is_num(server_time) else None
        hb = data.get("heartbeat")
        hb = hb if isinstance(hb, dict) else {}
        interval, timeout = hb.get("interval"), hb.get("timeout")
        self._ping_interval = self.config.ping_interval or (
            float(interval) if is_num(interval) and interval > 0 else 30.0
        )
        self._watchdog = self.config.watchdog_timeout or (
            float(timeout) if is_num(timeout) and timeout > 0 else 90.0
        )
        expires = data.get("expires_at")
        self._expires_at = float(expires) if is_num(expires) else None
        self._welcome_window = welcome_window(data, self.config.policy.max_window)
        subs = data.get("subscriptions")
        entries = [e for e in subs if isinstance(e, dict)] if isinstance(subs, list) else []
        log.info("connected: session %s on node %s", data.get("session_id"), data.get("node_id"))
        return self._tracker.on_welcome(entries, gen)

    async def _resync(self, items: list[str | dict[str, Any]], gen: int) -> None:
        """Say hello as the device (if one is set), re-subscribe what the connection does
        not have yet, then report connected."""
        try:
            if not await self._before_resubscribe(gen):
                return
            for i in range(0, len(items), SUBSCRIBE_CHUNK):
                chunk = items[i : i + SUBSCRIBE_CHUNK]
                names = [x if isinstance(x, str) else str(x["name"]) for x in chunk]
                try:
                    await self._call(
                        "subscribe",
                        {"channels": chunk},
                        self.config.request_timeout,
                        on_reply=self._subscribe_reply(names, gen),
                    )
                except (RequestError, RequestTimeout) as exc:
                    self._tracker.cancel(names)
                    await self._abort(f"re-subscribing failed: {exc}")
                    return
        except ConnectionClosed:
            return
        self._connected.set()
        self.stats.connects += 1
        self._emit("client.connected", dict(self.welcome or {}))

    async def _recover(self, names: list[str], gen: int) -> None:
        """Re-subscribe channels that showed a gap, with ``since`` = their position."""
        items = self._tracker.items_for(names)
        try:
            await self._call(
                "subscribe",
                {"channels": items},
                self.config.request_timeout,
                on_reply=self._subscribe_reply(names, gen),
            )
        except RequestError as exc:
            log.warning("recovering %s failed: %s", names, exc)
        except RequestTimeout:
            self._tracker.cancel(names)
            await self._abort("recovery request timed out")
        except ConnectionClosed:
            pass

    async def _abort(self, reason: str) -> None:
        ws = self._ws
        self._abort_reason = reason
        if ws is not None and not ws.closed:
            log.warning("closing the connection: %s", reason)
            await self._close_ws(ws, CloseCode.NORMAL, reason.encode()[:120])

    async def _pinger(self) -> None:
        n = 0
        while True:
            if n > 0:
                quick = n < self.config.initial_pings
                wait = (
                    min(self.config.initial_ping_interval, self._ping_interval)
                    if quick
                    else self._ping_interval
                )
                await asyncio.sleep(wait)
            n += 1
            try:
                await self._ping(min(self.config.request_timeout, self._watchdog))
            except (RequestTimeout, RequestError) as exc:
                log.debug("ping failed: %s", exc)
            except ConnectionClosed:
                return

    async def _refresher(self) -> None:
        """Refresh the token before it expires (needs a provider)."""
        margin = self.config.refresh_margin
        if self._provider is None or margin is None:
            return
        while True:
            expires = self._expires_at
            if expires is None:
                return
            remaining = (expires - self.server_time()) / 1000.0
            if remaining <= 0:
                return  # too late: the server closes with 4001 and we reconnect
            await asyncio.sleep(max(remaining - min(margin, remaining / 2.0), 0.0))
            try:
                token = await self._provider()
                data = (
                    await self._call("auth.refresh", {"token": token}, self.config.request_timeout)
                ).get("data") or {}
            except ConnectionClosed:
                return
            except Exception as exc:
                log.warning("token refresh failed: %s", type(exc).__name__)
                await asyncio.sleep(max(MIN_REFRESH_GAP, min(30.0, remaining / 4.0)))
                continue
            self._token = token
            self.stats.token_refreshes += 1
            new = data.get("expires_at")
            if is_num(new):
                self._expires_at = float(new)
            await asyncio.sleep(MIN_REFRESH_GAP)

    async def _close_ws(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        code: int = CloseCode.NORMAL,
        message: bytes = b"",
    ) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=code, message=message), self.config.close_timeout)

    # -- internals: incoming ---------------------------------------------------------
    def _on_frame(self, raw: str, t3: float) -> None:
        msg = decode(raw)
        if msg is None:
            self.stats.invalid_frames += 1
            log.warning("ignored a frame that is not a JSON object")
            return
        mtype = msg.get("type")
        mid = msg.get("id")
        if mid is not None and mtype in REPLY_TYPES:
            pending = self._pending.pop(str(mid), None)
            if pending is None:
                log.debug("late or unknown reply %s", mid)
                return
            if pending.on_reply is not None:
                try:
                    pending.on_reply(msg, t3)
                except Exception:
                    log.exception("applying the reply to %s failed", mid)
            if not pending.future.done():
                pending.future.set_result(msg)
            return
        if not isinstance(mtype, str):
            self.stats.invalid_frames += 1
            return
        if "channel" not in msg and self._on_direct(msg):
            return
        if mtype == "subscription.reset":
            self._on_reset(msg)
            return
        if mtype == "welcome":
            return
        channel, epoch, seq = msg.get("channel"), msg.get("epoch"), msg.get("seq")
        if mtype == "notification":
            verdict = self._tracker.on_notification(msg)
        elif isinstance(channel, str) and isinstance(epoch, str) and is_int(seq):
            verdict = self._tracker.on_publication(channel, epoch, seq)
        else:
            verdict = Verdict.DELIVER
        if verdict is Verdict.DELIVER:
            self._deliver(msg)
        elif verdict is Verdict.DUPLICATE:
            self.stats.duplicates += 1
        elif verdict is Verdict.HELD:
            self.stats.held += 1
        elif verdict in (Verdict.GAP, Verdict.DELIVER_AND_RECOVER):
            if verdict is Verdict.DELIVER_AND_RECOVER:
                self._deliver(msg)
            else:
                self.stats.gaps += 1
            if isinstance(channel, str):
                log.info("gap on %s at seq %s: recovering", channel, seq)
                self._spawn_conn(self._recover([channel], self._gen))

    def _on_reset(self, msg: Message) -> None:
        data = msg.get("data") or {}
        channel, epoch, seq = data.get("channel"), data.get("epoch"), data.get("seq")
        if not isinstance(channel, str) or not isinstance(epoch, str) or not is_int(seq):
            return
        self._tracker.on_reset(channel, epoch, seq)
        self._recovery_failed(channel, epoch, seq, str(data.get("reason") or "reset"), None)

    def _recovery_failed(
        self, channel: str, epoch: Any, seq: Any, reason: str, latest: Any
    ) -> None:
        self.stats.recovery_failures += 1
        log.info("recovery failed on %s: %s", channel, reason)
        cb = self._on_recovery_failed
        if cb is not None:
            self._invoke(cb, channel)
        event: dict[str, Any] = {"channel": channel, "epoch": epoch, "seq": seq, "reason": reason}
        if latest is not None:
            event["latest"] = latest
        self._emit("client.recovery_failed", event)

    def _deliver(self, msg: Message) -> None:
        self.stats.delivered += 1
        handlers = self._handlers
        if handlers:
            for key in (msg.get("type"), msg.get("channel"), "*"):
                if isinstance(key, str):
                    for handler in tuple(handlers.get(key, ())):
                        self._invoke(handler, msg)
        size = self.config.queue_size
        if size <= 0:
            return
        queue = self._queue
        if len(queue) >= size:
            queue.popleft()
            self.stats.dropped += 1
            if self._iterated and self.stats.dropped % 1000 == 1:
                log.warning(
                    "messages() is not keeping up: dropped %d oldest message(s)",
                    self.stats.dropped,
                )
        queue.append(msg)
        self._queue_event.set()

    def _emit(self, mtype: str, data: dict[str, Any]) -> None:
        handlers = self._handlers.get(mtype)
        if handlers:
            event = {"type": mtype, "data": data}
            for handler in tuple(handlers):
                self._invoke(handler, event)

    def _invoke(self, fn: Callable[[Any], Awaitable[None] | None], arg: Any) -> None:
        try:
            result = fn(arg)
        except Exception:
            log.exception("handler %r failed", fn)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._bg.add(task)
            task.add_done_callback(self._bg_done)

    def _bg_done(self, task: asyncio.Future[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("async handler failed", exc_info=task.exception())

    def _spawn_conn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)
