"""Client side of SyncPlay: keep a local player on the room's timeline (contract §8).

The server publishes ``syncplay.command`` ``{command, position, rate, when, command_seq}``
meaning "at server time ``when`` be at ``position`` in that play state, then advance at
``rate``", and sends ``syncplay.sync`` hints when a report was off. :class:`SyncController`
turns those into calls on a :class:`Player`. It is pure logic: it reads the estimated server
clock from the ``server_time`` callable (or an explicit ``now``) and acts only when
:meth:`SyncController.tick` (or one of the ``on_*`` methods) is called; call ``tick`` a few
times a second. :class:`SyncPlayDriver` is its I/O side over a
:class:`~revenge_ws.client.Client`: it feeds the controller the room's messages, ticks it,
starts playback exactly at a command's ``when``, and sends ``syncplay.report`` every 5 s
(the room's presence heartbeat and drift check: a member that sends none is marked away
after 30 s and removed after 120 s, even with its connection open).

Correction policy (with hysteresis, so the player never oscillates):

- off by less than ``dead_band_s`` (60 ms): nothing;
- off by more: nudge the rate toward the timeline, proportionally
  (``base * (1 ± min(max_nudge, |diff| / nudge_horizon_s))``), and keep nudging until within
  ``release_band_s`` (20 ms) or until the difference changes sign, then return to the base rate.
  A new nudge starts only beyond ``dead_band_s`` again, so rate changes never flip direction
  inside one correction;
- off by ``seek_threshold_s`` (3 s) or more: seek. Seeks are spaced by a cooldown that doubles
  while a player keeps missing (keyframe snapping), so an imprecise player cannot seek-loop.

Only the standard library and the contract's shared modules are used here (the
:class:`~revenge_ws.client.Client` is only named in type hints).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..codes import ErrorCode
from ..exceptions import ConnectionClosed, RequestError, RequestTimeout

if TYPE_CHECKING:
    from . import Client

__all__ = ["Action", "Player", "SyncConfig", "SyncController", "SyncPlayDriver", "Timeline"]

log = logging.getLogger("revenge_ws.client.syncplay")


class Player(Protocol):
    """The local media player, as the controller sees it (positions in seconds)."""

    def position(self) -> float: ...

    def is_playing(self) -> bool: ...

    @property
    def rate(self) -> float: ...

    def set_rate(self, rate: float) -> None: ...

    def seek(self, position: float) -> None: ...

    def play(self) -> None: ...

    def pause(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Action:
    """One call the controller made on the player (for logs and tests)."""

    kind: Literal["play", "pause", "seek", "rate"]
    value: float | None = None


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Correction tuning. Defaults follow the field's experience (see the module docstring)."""

    dead_band_s: float = 0.06
    release_band_s: float = 0.02
    seek_threshold_s: float = 3.0
    max_nudge: float = 0.08
    nudge_horizon_s: float = 2.0
    rate_step: float = 0.01
    paused_tolerance_s: float = 0.1
    seek_settle_ms: float = 500.0
    seek_cooldown_ms: float = 2_000.0
    seek_cooldown_max_ms: float = 30_000.0

    def __post_init__(self) -> None:
        if not 0 <= self.release_band_s < self.dead_band_s < self.seek_threshold_s:
            raise ValueError("need 0 <= release_band_s < dead_band_s < seek_threshold_s")
        if not 0 < self.max_nudge < 1 or self.nudge_horizon_s <= 0:
            raise ValueError("need 0 < max_nudge < 1 and nudge_horizon_s > 0")


@dataclass(frozen=True, slots=True)
class Timeline:
    """Where the room is: at server time ``when`` at ``position``; advancing at ``rate``
    afterwards when ``playing`` (and standing at ``position`` before ``when``)."""

    position: float
    when: float
    rate: float
    playing: bool

    def at(self, now_ms: float) -> float:
        if not self.playing or now_ms <= self.when:
            return self.position
        return self.position + (now_ms - self.when) / 1000.0 * self.rate

    def running(self, now_ms: float) -> bool:
        return self.playing and now_ms >= self.when


class SyncController:
    """Drive a :class:`Player` from ``syncplay.command``/``state``/``sync`` messages.

    Guarantees: commands older than the last one applied (by ``command_seq``) are ignored;
    differences under ``dead_band_s`` never change the rate; differences under
    ``seek_threshold_s`` never seek while playing; the nudge direction can only change after
    the rate went back to the base rate. Counters ``seeks``, ``rate_changes`` and
    ``direction_changes`` are kept for diagnostics.
    """

    def __init__(
        self,
        player: Player,
        server_time: Callable[[], float],
        config: SyncConfig | None = None,
    ) -> None:
        self.player = player
        self.server_time = server_time
        self.config = config or SyncConfig()
        self.timeline: Timeline | None = None
        self.command_seq = -1
        self.seeks = 0
        self.rate_changes = 0
        self.direction_changes = 0
        self._nudge = 0  # -1 slowing down, +1 speeding up, 0 at the base rate
        self._last_nudge = 0
        self._last_seek_at: float | None = None
        self._seek_streak = 0
        self._obey = False  # the next seek answers the server, not our own correction

    # -- inputs

    def on_command(self, cmd: Mapping[str, Any], now: float | None = None) -> list[Action]:
        """Apply a ``syncplay.command`` payload; returns the actions taken right away."""
        seq = cmd.get("command_seq")
        if isinstance(seq, int):
            if seq <= self.command_seq:
                return []
            self.command_seq = seq
        kind = cmd["command"]
        if kind == "play":
            playing = True
        elif kind == "pause":
            playing = False
        else:  # seek and rate keep the play state
            playing = self.timeline.playing if self.timeline is not None else False
        self.timeline = Timeline(
            float(cmd["position"]), float(cmd["when"]), float(cmd["rate"]), playing
        )
        self._obey = True
        return self.tick(now)

    def on_state(self, state: Mapping[str, Any], now: float | None = None) -> list[Action]:
        """Adopt a ``syncplay.state`` payload (join ack, reconnect) unless a newer command is
        already known."""
        seq = state.get("command_seq")
        if isinstance(seq, int):
            if self.timeline is not None and seq <= self.command_seq:
                return self.tick(now)
            self.command_seq = max(self.command_seq, seq)
        when = state.get("when", state.get("updated_at", 0.0))
        self.timeline = Timeline(
            float(state["position"]),
            float(when),
            float(state.get("rate", 1.0)),
            state["state"] == "playing",
        )
        self._obey = True
        return self.tick(now)

    def on_sync(self, hint: Mapping[str, Any], now: float | None = None) -> list[Action]:
        """Adopt a ``syncplay.sync`` hint: the server's view of where we should be at ``at``."""
        rate = self.timeline.rate if self.timeline is not None else 1.0
        self.timeline = Timeline(
            float(hint["target_position"]),
            float(hint["at"]),
            rate,
            bool(hint["should_be_playing"]),
        )
        return self.tick(now)

    def report(self, rtt_ms: float | None = None, *, is_buffering: bool = False) -> dict[str, Any]:
        """The data of a ``syncplay.report`` (send it every 5 s)."""
        data: dict[str, Any] = {
            "position": round(max(0.0, self.player.position()), 3),
            "is_playing": self.player.is_playing(),
            "is_buffering": is_buffering,
            "rtt_ms": rtt_ms,
        }
        if self.command_seq >= 0:
            data["command_seq"] = self.command_seq
        return data

    # -- the control loop

    def tick(self, now: float | None = None) -> list[Action]:
        """Compare the player with the timeline at ``now`` (server ms) and correct it."""
        t = self.server_time() if now is None else now
        tl = self.timeline
        if tl is None:
            return []
        actions: list[Action] = []
        try:
            self._correct(tl, t, actions)
        finally:
            self._obey = False
        return actions

    def _correct(self, tl: Timeline, t: float, actions: list[Action]) -> None:
        target = tl.at(t)
        diff = self.player.position() - target  # > 0: ahead of the room
        cfg = self.config
        if not tl.running(t):
            if self.player.is_playing():
                self.player.pause()
                actions.append(Action("pause"))
            self._release(tl.rate, actions)
            if abs(diff) > cfg.paused_tolerance_s:
                self._seek(target, t, actions)
            else:
                self._seek_streak = 0
            return

        if not self.player.is_playing():
            self.player.play()
            actions.append(Action("play"))
        settling = self._last_seek_at is not None and t - self._last_seek_at < cfg.seek_settle_ms
        if settling and not self._obey:
            return  # the player may still report the position it seeked from
        if abs(diff) >= cfg.seek_threshold_s:
            if self._seek(target, t, actions):
                self._release(tl.rate, actions)
                return
        else:
            self._seek_streak = 0
        self._steer(diff, tl.rate, actions)

    # -- internals

    def _seek(self, target: float, t: float, actions: list[Action]) -> bool:
        cfg = self.config
        if self._obey:
            self._seek_streak = 0
        elif self._last_seek_at is not None:
            cooldown = min(cfg.seek_cooldown_max_ms, cfg.seek_cooldown_ms * 2**self._seek_streak)
            if t - self._last_seek_at < cooldown:
                return False
            self._seek_streak += 1
        self.player.seek(target)
        self._last_seek_at = t
        self.seeks += 1
        actions.append(Action("seek", target))
        return True

    def _steer(self, diff: float, base: float, actions: list[Action]) -> None:
        cfg = self.config
        want = -1 if diff > 0 else 1
        if self._nudge == 0:
            if abs(diff) <= cfg.dead_band_s:
                self._set_rate(base, actions)
                return
            self._nudge = want
            if self._last_nudge and want != self._last_nudge:
                self.direction_changes += 1
            self._last_nudge = want
        elif abs(diff) <= cfg.release_band_s or want != self._nudge:
            self._release(base, actions)
            return
        size = min(cfg.max_nudge, abs(diff) / cfg.nudge_horizon_s)
        rate = base * (1.0 + self._nudge * size)
        if abs(rate - self.player.rate) >= cfg.rate_step * base:
            self._set_rate(rate, actions)

    def _release(self, base: float, actions: list[Action]) -> None:
        self._nudge = 0
        self._set_rate(base, actions)

    def _set_rate(self, rate: float, actions: list[Action]) -> None:
        if abs(self.player.rate - rate) < 1e-9:
            return
        self.player.set_rate(rate)
        self.rate_changes += 1
        actions.append(Action("rate", rate))


#: ``on_event(type, data)``: every ``syncplay.*`` message of the driven room, after the
#: driver applied it (for the UI: members, chat, room changes, the end).
EventCallback = Callable[[str, dict[str, Any]], None]

#: A ``when`` further away than this (ms) is left to the periodic tick.
_MAX_WHEN_AHEAD_MS = 60_000.0


class SyncPlayDriver:
    """Keep a :class:`Player` in a SyncPlay room over a :class:`~revenge_ws.client.Client`.

    ::

        async with Client(url, token=token) as client:
            driver = SyncPlayDriver(client, player)
            await driver.join(room_id)
            await driver.ready()           # when the player can play the content
            ...
            await driver.leave()           # or: await driver.stop() (stays a member)

    After :meth:`create`, :meth:`join` or :meth:`follow` it:

    - applies ``syncplay.command``, ``syncplay.state`` and ``syncplay.sync`` of the room to
      its :class:`SyncController` (``self.controller``), ticks it every ``tick_interval``
      seconds, and ticks it exactly when a scheduled ``when`` arrives (sleep until
      ``spin_ms`` before, then yield to the event loop until the estimated server clock
      reaches it), so members start together rather than up to a tick apart;
    - sends ``syncplay.report`` every ``report_interval`` seconds (5) with the player's
      position and the client's RTT (:attr:`Client.rtt`, min-delay). Reports are the
      member's presence heartbeat and what the hub's drift check judges: without them the
      member is marked away after 30 s and removed after 120 s, and no ``syncplay.sync``
      hint ever comes;
    - after the client reconnects, joins again with the new connection (a report from a
      new connection is refused until it does);
    - stops by itself when the room ends or refuses it for good (``NOT_FOUND``,
      ``FORBIDDEN``): :attr:`ended` holds the reason.

    Every request it sends is bounded by ``request_timeout`` (the client's default when
    None); :meth:`stop` cancels its tasks and waits for them at most ``stop_timeout``.
    It never sends ``syncplay.ready``/``buffering`` by itself: only the application knows
    when its player can play (:meth:`ready`, :meth:`buffering`).
    """

    def __init__(
        self,
        client: Client,
        player: Player,
        *,
        config: SyncConfig | None = None,
        tick_interval: float = 0.25,
        report_interval: float = 5.0,
        request_timeout: float | None = None,
        spin_ms: float = 2.0,
        stop_timeout: float = 2.0,
        on_event: EventCallback | None = None,
    ) -> None:
        if tick_interval <= 0 or report_interval <= 0:
            raise ValueError("tick_interval and report_interval must be > 0")
        self.client = client
        self.player = player
        self.controller = SyncController(player, client.server_time, config)
        self.tick_interval = tick_interval
        self.report_interval = report_interval
        self.request_timeout = request_timeout
        self.spin_ms = spin_ms
        self.stop_timeout = stop_timeout
        self.on_event = on_event
        #: The room object of the last ack or ``syncplay.room_updated`` (None: not in one).
        self.room: dict[str, Any] | None = None
        #: The last ``syncplay.state`` payload.
        self.state: dict[str, Any] | None = None
        #: Members by user id, as announced.
        self.members: dict[str, dict[str, Any]] = {}
        self.is_buffering = False
        #: Why the driver stopped by itself (``syncplay.ended`` reason, ``not_found``,
        #: ``forbidden``); None while it runs or after :meth:`stop`.
        self.ended: str | None = None
        #: The ack data of the last report (``in_sync``, ``offset_seconds``).
        self.last_report: dict[str, Any] | None = None
        self.reports_sent = 0
        self.report_errors = 0
        self._password: str | None = None
        self._offs: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._when_task: asyncio.Task[None] | None = None
        self._rejoining = False
        self._ended_event = asyncio.Event()

    # -- room membership

    @property
    def room_id(self) -> str | None:
        rid = None if self.room is None else self.room.get("room_id")
        return rid if isinstance(rid, str) else None

    async def create(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``syncplay.create``; the creator is in the room and driven. Returns the ack data."""
        ack = await self.client.request("syncplay.create", dict(data), self.request_timeout)
        self._password = None
        self.follow(ack)
        return ack

    async def join(
        self,
        room_id: str | None = None,
        *,
        password: str | None = None,
        invite_code: str | None = None,
    ) -> dict[str, Any]:
        """``syncplay.join`` by id (with ``password``) or invitation code, with the RTT."""
        data: dict[str, Any] = {}
        if room_id is not None:
            data["room_id"] = room_id
        if password is not None:
            data["password"] = password
        if invite_code is not None:
            data["invite_code"] = invite_code
        rtt = self.client.rtt
        if rtt is not None:
            data["rtt_ms"] = round(rtt, 1)
        ack = await self.client.request("syncplay.join", data, self.request_timeout)
        self._password = password
        self.follow(ack)
        return ack

    def follow(self, ack: Mapping[str, Any]) -> None:
        """Drive the room of a create/join ack obtained otherwise (e.g. the direct
        ``syncplay.joined`` of the playback endpoint)."""
        room = ack.get("room")
        if isinstance(room, Mapping):
            self.room = dict(room)
        if self.room_id is None:
            raise ValueError("the ack names no room")
        members = ack.get("members")
        if isinstance(members, list):
            self.members = {
                str(m["user_id"]): dict(m)
                for m in members
                if isinstance(m, Mapping) and "user_id" in m
            }
        self.ended = None
        self._ended_event.clear()
        if not self._offs:
            self._attach()
        state = ack.get("state")
        if isinstance(state, Mapping):
            self._on_state(state)

    async def leave(self) -> None:
        """Leave the room (``syncplay.leave``) and stop driving the player."""
        rid = self.room_id
        await self.stop()
        if rid is not None:
            with contextlib.suppress(ConnectionClosed):
                await self.client.request("syncplay.leave", {"room_id": rid}, self.request_timeout)

    async def stop(self) -> None:
        """Stop driving the player (the hub still counts the member until it leaves or
        times out). Idempotent."""
        self._halt(None)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.stop_timeout)

    async def wait_ended(self, timeout: float | None = None) -> str | None:
        """Wait until the driver stopped by itself; returns :attr:`ended`.
        ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._ended_event.wait()
        return self.ended

    async def __aenter__(self) -> SyncPlayDriver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests on behalf of the member

    async def ready(self, position: float | None = None) -> dict[str, Any]:
        """``syncplay.ready``: the player can play (after loading, seeking, rebuffering)."""
        self.is_buffering = False
        return await self._room_request("syncplay.ready", self._position(position))

    async def buffering(self, position: float | None = None) -> dict[str, Any]:
        """``syncplay.buffering``: the player stalled (while playing: the room waits)."""
        self.is_buffering = True
        return await self._room_request("syncplay.buffering", self._position(position))

    async def play(self) -> dict[str, Any]:
        return await self._control("syncplay.play", {})

    async def pause(self, position: float | None = None) -> dict[str, Any]:
        extra = {} if position is None else {"position": round(position, 3)}
        return await self._control("syncplay.pause", extra)

    async def seek(self, position: float) -> dict[str, Any]:
        return await self._control("syncplay.seek", {"position": round(max(0.0, position), 3)})

    async def report(self) -> dict[str, Any] | None:
        """Send one ``syncplay.report`` now; returns its ack data, or None when it could
        not be sent or was refused (counted in ``report_errors``)."""
        rid = self.room_id
        if rid is None or not self.client.connected:
            return None
        rtt = self.client.rtt
        data = self.controller.report(
            None if rtt is None else round(rtt, 1), is_buffering=self.is_buffering
        )
        data["room_id"] = rid
        try:
            reply = await self.client.request("syncplay.report", data, self.request_timeout)
        except RequestError as exc:
            self.report_errors += 1
            if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.FORBIDDEN) and self.room_id == rid:
                self._halt(exc.code.value.lower())
            else:
                log.debug("syncplay.report refused: %s", exc)
            return None
        except (RequestTimeout, ConnectionClosed) as exc:
            self.report_errors += 1
            log.debug("syncplay.report not sent: %s", exc)
            return None
        self.reports_sent += 1
        self.last_report = reply
        return reply

    # -- internals

    def _position(self, position: float | None) -> dict[str, Any]:
        pos = self.player.position() if position is None else position
        return {"position": round(max(0.0, pos), 3)}

    async def _room_request(self, mtype: str, data: dict[str, Any]) -> dict[str, Any]:
        rid = self.room_id
        if rid is None:
            raise RequestError(ErrorCode.NOT_FOUND, "not in a room")
        return await self.client.request(mtype, {"room_id": rid, **data}, self.request_timeout)

    async def _control(self, mtype: str, data: dict[str, Any]) -> dict[str, Any]:
        if self.controller.command_seq >= 0:
            data["command_seq"] = self.controller.command_seq
        return await self._room_request(mtype, data)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"syncplay-driver-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _attach(self) -> None:
        on = self.client.on
        for mtype in (
            "syncplay.command",
            "syncplay.state",
            "syncplay.sync",
            "syncplay.member_joined",
            "syncplay.member_updated",
            "syncplay.member_left",
            "syncplay.room_updated",
            "syncplay.wait_timeout",
            "syncplay.chat",
            "syncplay.ended",
        ):
            self._offs.append(on(mtype, self._on_message))
        self._offs.append(on("client.connected", self._on_connected))
        self._spawn(self._ticker(), "tick")
        self._spawn(self._reporter(), "report")

    def _halt(self, reason: str | None) -> None:
        """Stop at once (callable from a message handler); :meth:`stop` awaits the tasks."""
        for off in self._offs:
            off()
        self._offs.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._when_task = None
        self.room = None
        self.state = None
        self.members = {}
        self.is_buffering = False
        if reason is not None:
            self.ended = reason
            self._ended_event.set()

    def _mine(self, msg: Mapping[str, Any]) -> bool:
        rid = self.room_id
        if rid is None:
            return False
        data = msg.get("data")
        return msg.get("channel") == f"playback:{rid}" or (
            isinstance(data, Mapping) and data.get("room_id") == rid
        )

    def _on_message(self, msg: dict[str, Any]) -> None:
        if not self._mine(msg):
            return
        mtype = str(msg.get("type"))
        data = msg.get("data")
        data = data if isinstance(data, dict) else {}
        if mtype == "syncplay.command":
            self.controller.on_command(data)
            self._schedule_when(data.get("when"))
        elif mtype == "syncplay.state":
            self._on_state(data)
        elif mtype == "syncplay.sync":
            self.controller.on_sync(data)
        elif mtype in ("syncplay.member_joined", "syncplay.member_updated"):
            uid = data.get("user_id")
            if isinstance(uid, str):
                self.members[uid] = {**self.members.get(uid, {}), **data}
        elif mtype == "syncplay.member_left":
            self.members.pop(str(data.get("user_id")), None)
        elif mtype == "syncplay.room_updated":
            room = data.get("room")
            if isinstance(room, Mapping) and self.room is not None:
                self.room.update(room)
        if self.on_event is not None:
            try:
                self.on_event(mtype, data)
            except Exception:
                log.exception("on_event failed")
        if mtype == "syncplay.ended":
            self._halt(str(data.get("reason") or "ended"))

    def _on_state(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)
        self.controller.on_state(state)
        self._schedule_when(state.get("when") if state.get("state") == "playing" else None)

    def _schedule_when(self, when: object) -> None:
        if not isinstance(when, int | float) or isinstance(when, bool):
            return
        ahead = float(when) - self.client.server_time()
        if ahead <= 0 or ahead > _MAX_WHEN_AHEAD_MS:
            return
        if self._when_task is not None:
            self._when_task.cancel()
        self._when_task = self._spawn(self._at_when(float(when)), "when")

    async def _at_when(self, when: float) -> None:
        """Tick when the estimated server clock reaches ``when``: an asyncio sleep wakes
        up to a few ms late, so sleep until ``spin_ms`` before, then yield until it."""
        server_time = self.client.server_time
        remaining = when - server_time()
        if remaining > self.spin_ms:
            await asyncio.sleep((remaining - self.spin_ms) / 1000.0)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (self.spin_ms + 50.0) / 1000.0
        # Polling the clock is the point: no event fires when a clock reaches a value.
        while server_time() < when and loop.time() < give_up:  # noqa: ASYNC110
            await asyncio.sleep(0)
        self._tick()

    def _tick(self) -> None:
        try:
            self.controller.tick()
        except Exception:
            log.exception("the player failed")

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            self._tick()

    async def _reporter(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval)
            await self.report()

    async def _on_connected(self, _event: dict[str, Any]) -> None:
        """A new connection: take the member's seat back with it, adopt the state."""
        rid = self.room_id
        if rid is None or self._rejoining:
            return
        self._rejoining = True
        try:
            data: dict[str, Any] = {"room_id": rid}
            if self._password is not None:
                data["password"] = self._password
            rtt = self.client.rtt
            if rtt is not None:
                data["rtt_ms"] = round(rtt, 1)
            ack = await self.client.request("syncplay.join", data, self.request_timeout)
        except RequestError as exc:
            if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.FORBIDDEN) and self.room_id == rid:
                self._halt(exc.code.value.lower())
            else:
                log.warning("rejoining %s failed: %s", rid, exc)
            return
        except (RequestTimeout, ConnectionClosed) as exc:
            log.warning("rejoining %s failed: %s", rid, exc)
            return
        finally:
            self._rejoining = False
        if self.room_id == rid:
            self.follow(ack)
