"""Client side of SyncPlay: keep a local player on the room's timeline (contract §8).

The server publishes ``syncplay.command`` ``{command, position, rate, when, command_seq}``
meaning "at server time ``when`` be at ``position`` in that play state, then advance at
``rate``", and sends ``syncplay.sync`` hints when a report was off. :class:`SyncController`
turns those into calls on a :class:`Player`. It is pure logic: it reads the estimated server
clock from the ``server_time`` callable (or an explicit ``now``) and acts only when
:meth:`SyncController.tick` (or one of the ``on_*`` methods) is called; call ``tick`` a few
times a second.

Correction policy (with hysteresis, so the player never oscillates):

- off by less than ``dead_band_s`` (60 ms): nothing;
- off by more: nudge the rate toward the timeline, proportionally
  (``base * (1 ± min(max_nudge, |diff| / nudge_horizon_s))``), and keep nudging until within
  ``release_band_s`` (20 ms) or until the difference changes sign, then return to the base rate.
  A new nudge starts only beyond ``dead_band_s`` again, so rate changes never flip direction
  inside one correction;
- off by ``seek_threshold_s`` (3 s) or more: seek. Seeks are spaced by a cooldown that doubles
  while a player keeps missing (keyframe snapping), so an imprecise player cannot seek-loop.

Only the standard library and the contract's shared modules are used here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = ["Action", "Player", "SyncConfig", "SyncController", "Timeline"]


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
