"""The client's application API: lifecycle, state, handlers, messages, requests, and
devices (hello, now playing, remote control)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from ..codes import CloseCode
from ..exceptions import ClientError, ConnectionClosed, RequestTimeout
from ..protocol import StreamPosition
from ._clock import ClockSample
from ._device import DeviceLoop
from ._types import (
    COMMAND_TIMEOUT_MS,
    PLAYBACK_STATES,
    CommandHandler,
    DeviceInfo,
    Handler,
    Message,
    Playback,
    SubscribeError,
)


class _Messages:
    """The iterator of :meth:`Client.messages` (ends when the client is closed)."""

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        self._client = client

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> Message:
        c = self._client
        c._iterated = True
        while True:
            if c._queue:
                return c._queue.popleft()
            if c._done.is_set():
                err = c._error
                if err is not None:
                    raise ConnectionClosed(err.code, err.reason)
                raise StopAsyncIteration
            if c._main is None:
                raise ClientError("the client is not started (use 'async with Client(...)')")
            c._queue_event.clear()
            await c._queue_event.wait()


class Client(DeviceLoop):
    """A self-healing connection to the hub. Use it as an async context manager.

    ``token`` is sent as ``Authorization: Bearer`` (or ``?token=`` with
    ``token_in_query=True``). ``token_provider`` is an async callable returning a fresh
    token: it is called when there is no token, before the token expires (then
    ``auth.refresh`` is sent), after a close with 4001 and after a handshake refused
    with 401. ``on_recovery_failed(channel)`` is called when a channel's history could
    not be recovered (reload that state). ``rng`` makes the reconnect timing
    reproducible. ``clock`` returns the local time in ms since the Unix epoch (default: the
    system clock); every local timestamp the client takes — ping ``t0``/``t3``, hence
    :attr:`clock_offset`, :attr:`rtt` and :meth:`server_time` — comes from it, so tests
    and simulations can give each client a clock of its own. (:attr:`clock` is the
    :class:`ClockSync` estimator it feeds.) ``device`` makes the client a device
    (:class:`DeviceInfo`, see :meth:`set_device`). The other keyword options are the
    fields of :class:`ClientConfig`.
    """

    # -- lifecycle -----------------------------------------------------------------
    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start connecting in the background (``async with`` does this)."""
        if self._main is not None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout)
            )
        self._main = asyncio.create_task(self._run(), name="revenge-client")

    async def close(self) -> None:
        """Close the connection and stop reconnecting. Idempotent."""
        self._closing = True
        self._wake.set()
        ws = self._ws
        if ws is not None and not ws.closed:
            await self._close_ws(ws, CloseCode.NORMAL, b"client closed")
        main = self._main
        if main is not None and not main.done():
            try:
                await asyncio.wait_for(asyncio.shield(main), self.config.close_timeout + 1.0)
            except TimeoutError:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await main
            except asyncio.CancelledError:
                main.cancel()
                raise
        current = asyncio.current_task()
        others = [t for t in self._bg if t is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        self._finish()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_connected(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until connected and re-subscribed; returns the welcome data.

        Raises :class:`ConnectionClosed` when the client ended (terminal close code or
        :meth:`close`) and ``TimeoutError`` after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        await self._ready(deadline, TimeoutError)
        assert self.welcome is not None
        return self.welcome

    async def wait_closed(self, timeout: float | None = None) -> ConnectionClosed | None:
        """Wait until the client ended; returns the terminal error (None after
        :meth:`close`). Raises ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._done.wait()
        return self._error

    # -- state ---------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``idle``, ``connecting``, ``connected``, ``waiting`` (to reconnect) or ``closed``."""
        return self._state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def error(self) -> ConnectionClosed | None:
        """The terminal close, once the client gave up (never set by :meth:`close`)."""
        return self._error

    @property
    def session_id(self) -> str | None:
        return None if self.welcome is None else self.welcome.get("session_id")

    def positions(self) -> dict[str, StreamPosition]:
        """Each channel's last delivered position (persist it to resume with
        ``subscribe(..., since=...)`` in another process)."""
        return self._tracker.positions()

    @property
    def channels(self) -> list[str]:
        """Channels followed (subscribed or automatic)."""
        return [n for n, st in self._tracker.channels.items() if not st.dropped]

    # -- application API -----------------------------------------------------------
    def on(self, key: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(message)`` for messages whose ``type`` or ``channel`` is
        ``key`` (``"*"``: every server message). Client events are types too:
        ``client.connected``, ``client.disconnected``, ``client.recovery_failed``,
        ``client.subscription_error``, ``client.closed``.

        Handlers run in arrival order on the reader; a coroutine handler is started
        as a task (so it may call :meth:`request`). Returns a function that removes it.
        """
        self._handlers.setdefault(key, []).append(handler)

        def remove() -> None:
            handlers = self._handlers.get(key)
            if handlers is not None and handler in handlers:
                handlers.remove(handler)

        return remove

    def messages(self) -> _Messages:
        """Iterate over server messages (publications, notifications, direct messages)
        as decoded dicts; replies to requests are not included.

        The buffer holds ``queue_size`` (100) messages; when it is full the OLDEST is
        dropped and ``stats.dropped`` counts it (a warning is logged): a reader that
        does not keep up loses the oldest, never blocks the connection. The iterator
        ends after :meth:`close` and raises :class:`ConnectionClosed` after a terminal
        close. Several iterators share one buffer.
        """
        return _Messages(self)

    async def request(
        self, mtype: str, data: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a request and return its ``ack`` data.

        Waits for the connection within ``timeout`` (default ``request_timeout``).
        Raises :class:`RequestError` (``.code`` is the :class:`ErrorCode`) on an ``error``
        reply, :class:`RequestTimeout` without a reply in time, and
        :class:`ConnectionClosed` when the connection ends first (the request may or
        may not have been acted on).
        """
        timeout = self.config.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._ready(deadline, RequestTimeout)
        reply = await self._call(mtype, dict(data or {}), max(0.0, deadline - loop.time()))
        result: dict[str, Any] = reply.get("data") or {}
        return result

    async def subscribe(
        self,
        *channels: str,
        handler: Handler | None = None,
        since: Mapping[str, StreamPosition] | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Subscribe channels; returns their ack entries (``channel``, ``epoch``, ``seq``,
        ``recovered``, ``missed``, and ``latest`` for ``transcode:*``).

        They stay subscribed across reconnects. ``handler`` is registered with
        :meth:`on` for each channel. ``since`` maps a channel to a position to resume
        from (e.g. saved from :meth:`positions`). Raises :class:`SubscribeError` when
        some channel was refused (the others stay subscribed).
        """
        if not channels:
            raise ValueError("subscribe needs at least one channel")
        for name in channels:
            self._tracker.want(name, since.get(name) if since else None)
            if handler is not None:
                self.on(name, handler)
        timeout = self.config.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        errors: dict[str, dict[str, Any]] = {}
        while True:
            await self._ready(deadline, RequestTimeout)
            gen = self._gen
            todo = [n for n in channels if not self._tracker.acked_in(n, gen)]
            if not todo:
                break
            try:
                reply = await self._call(
                    "subscribe",
                    {"channels": self._tracker.items_for(todo)},
                    max(0.0, deadline - loop.time()),
                    on_reply=self._subscribe_reply(todo, gen),
                )
            except RequestTimeout:
                self._tracker.cancel(todo)
                raise
            except ConnectionClosed:
                if self._error is not None or self._closing:
                    raise
                continue  # reconnecting: the re-subscription covers these channels
            for e in (reply.get("data") or {}).get("errors") or []:
                if isinstance(e, dict) and e.get("channel") in channels:
                    errors[str(e["channel"])] = e
            break
        entries = []
        for name in channels:
            st = self._tracker.channels.get(name)
            if name not in errors and st is not None and st.entry is not None:
                entries.append(dict(st.entry))
        if errors:
            raise SubscribeError(list(errors.values()), entries)
        return entries

    async def unsubscribe(self, *channels: str, timeout: float | None = None) -> None:
        """Stop following channels (also on later reconnects)."""
        for name in channels:
            self._tracker.drop(name)
        try:
            if self._connected.is_set():
                await self._call(
                    "unsubscribe",
                    {"channels": list(channels)},
                    self.config.request_timeout if timeout is None else timeout,
                )
        finally:
            for name in channels:
                st = self._tracker.channels.get(name)
                if st is not None and st.dropped:
                    self._tracker.forget(name)

    async def ack_notifications(self, *ids: str) -> dict[str, Any]:
        """``notification.ack``: the hub stops re-sending these notifications."""
        return await self.request("notification.ack", {"ids": list(ids)})

    async def ping(self, timeout: float | None = None) -> ClockSample | None:
        """One ``ping``/``pong`` exchange; returns the clock sample it produced."""
        timeout = self.config.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._ready(deadline, RequestTimeout)
        return await self._ping(max(0.0, deadline - loop.time()))

    # -- devices (contract §13) ----------------------------------------------------
    @property
    def device(self) -> DeviceInfo | None:
        """The device this client is (``device.hello`` on every connection), or None."""
        return self._dev.info

    @property
    def device_active(self) -> bool:
        """The hub accepted the device on the current connection and no other connection
        took it over since (``device.ended``)."""
        return self._dev.gen >= 0 and self._dev.gen == self._gen and self._ws is not None

    async def set_device(
        self, device: DeviceInfo, timeout: float | None = None
    ) -> dict[str, Any] | None:
        """Be ``device`` from now on: ``device.hello`` now when connected (returns the
        hub's device object) and after every reconnect (None: not connected, it is said
        with the next connection).

        The client never says hello again by itself on the same connection: when another
        connection takes the device over, the hub sends ``device.ended`` (delivered to
        handlers and :meth:`messages`) and :attr:`device_active` turns False until the
        next reconnect. Calling ``set_device`` then takes it back (a user's choice, e.g.
        "play here"). Another ``device_id`` forgets the reported playback. Raises
        :class:`RequestError` when the hub refuses the hello.
        """
        if not isinstance(device, DeviceInfo):
            raise TypeError("set_device needs a DeviceInfo")
        previous = self._dev.info
        self._dev.info = device
        if previous is None or previous.device_id != device.device_id:
            self._dev.playback = None
        ws = self._ws
        if self._main is None or ws is None or ws.closed:
            return None
        try:
            return await self._hello(
                device, self._gen, self.config.request_timeout if timeout is None else timeout
            )
        except ConnectionClosed:
            if self._error is not None or self._closing:
                raise
            return None  # reconnecting: the new connection says hello

    async def report_playback(
        self,
        item_id: str,
        state: str,
        position: float,
        *,
        duration: float | None = None,
        rate: float = 1.0,
        item_type: str | None = None,
        title: str | None = None,
        volume: int | None = None,
        muted: bool | None = None,
        play_method: str | None = None,
        transcode_job_id: str | None = None,
        room_id: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Report what the device plays (``playback.update``): ``state`` is ``playing``,
        ``paused``, ``buffering`` or ``stopped``; ``position`` and ``duration`` in seconds.

        Call it on every change (play, pause, seek, another item, stop). While ``playing``
        the client sends the update again every ``playback_interval`` (10 s) with the
        position moved on by the time elapsed times ``rate``, until the next report; after
        a reconnect it sends the current state again right after the hello. Returns True
        when the hub acked it now, False when the device is not live on a connection (not
        connected, hello refused, or taken over): the state is kept and sent with the next
        hello. Raises :class:`RequestError` when the hub refuses the update (e.g.
        ``INVALID_MESSAGE``) and :class:`RequestTimeout` without a reply in time.
        """
        if self._dev.info is None:
            raise ClientError("report_playback needs a device: Client(device=...) or set_device()")
        if state not in PLAYBACK_STATES:
            raise ValueError(f"state must be one of {sorted(PLAYBACK_STATES)}, not {state!r}")
        if position < 0 or rate <= 0:
            raise ValueError("position must be >= 0 and rate > 0")
        fields: dict[str, Any] = {"item_id": item_id, "state": state, "rate": rate}
        for key, value in (
            ("duration", duration),
            ("item_type", item_type),
            ("title", title),
            ("volume", volume),
            ("muted", muted),
            ("play_method", play_method),
            ("transcode_job_id", transcode_job_id),
            ("room_id", room_id),
        ):
            if value is not None:
                fields[key] = value
        self._dev.playback = Playback(fields, float(position), self._local_ms())
        return await self._send_playback(
            self.config.request_timeout if timeout is None else timeout
        )

    def on_command(self, handler: CommandHandler | None) -> Callable[[], None]:
        """Answer ``remote.command`` with ``handler(command, args, sender)`` (``sender``:
        ``{"user_id", "device_id"}`` of the caller); it may be a coroutine function.

        Its return value, when a mapping, becomes the result's ``state``; an exception
        answers ``ok: false`` with ``str(exc)`` as the error, and so does a handler still
        running after ``command_timeout`` (60 s). Without a handler every command is
        answered ``ok: false``, ``"no handler"``. One handler at a time (a new one replaces
        the previous); returns a function that removes it. A sync handler runs on the event
        loop: keep it short. List the commands in :attr:`DeviceInfo.commands` too, or the
        hub refuses them (``REJECTED``) without asking the device.
        """
        self._dev.handler = handler

        def remove() -> None:
            if self._dev.handler is handler:
                self._dev.handler = None

        return remove

    async def send_command(
        self,
        device_id: str,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
        timeout_ms: int | None = None,
    ) -> dict[str, Any]:
        """Send a remote command to a device (``remote.command``); returns the device's
        result ``{"ok": True, "state"?: {...}}``.

        ``user_id`` names another user's device (admins only); ``timeout_ms`` is how long
        the hub waits for the device (10,000 by default, at most 60,000). Raises
        :class:`RequestError` whose ``.code`` says why: ``REJECTED`` (the device said no,
        ``.message`` is its error, or it does not list the command), ``TIMEOUT`` (no result
        in time), ``NOT_FOUND`` (no such device online), ``FORBIDDEN``, ``UNAVAILABLE`` (the
        device went away before answering), ``RATE_LIMITED`` (10 commands in flight to it),
        ``INVALID_MESSAGE`` (bad args). The local wait is bounded by ``timeout_ms`` plus
        ``request_timeout``: without a reply by then, :class:`RequestTimeout`.
        """
        data: dict[str, Any] = {"device_id": device_id, "command": command}
        if args is not None:
            data["args"] = dict(args)
        if user_id is not None:
            data["user_id"] = user_id
        if timeout_ms is not None:
            data["timeout_ms"] = timeout_ms
        wait = (COMMAND_TIMEOUT_MS if timeout_ms is None else timeout_ms) / 1000.0
        ack = await self.request("remote.command", data, timeout=wait + self.config.request_timeout)
        result = ack.get("result")
        return dict(result) if isinstance(result, dict) else {"ok": True}

    async def list_devices(
        self, user_id: str | None = None, all: bool = False, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """``devices.list``: the caller's devices (with their ``now_playing``); an admin
        may name a ``user_id`` or ask for ``all`` users' devices (others get
        ``FORBIDDEN``)."""
        data: dict[str, Any] = {}
        if user_id is not None:
            data["user_id"] = user_id
        if all:
            data["all"] = True
        ack = await self.request("devices.list", data, timeout=timeout)
        devices = ack.get("devices")
        return [d for d in devices if isinstance(d, dict)] if isinstance(devices, list) else []
