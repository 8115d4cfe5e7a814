"""The client-side SyncController against a simulated player on a fake clock."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revenge_ws.client.syncplay import Action, SyncConfig, SyncController, Timeline

from .players import SimPlayer

T0 = 1_700_000_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def play_cmd(position: float, when: float, seq: int = 1, rate: float = 1.0) -> dict[str, Any]:
    return {
        "room_id": "r",
        "command": "play",
        "position": position,
        "rate": rate,
        "when": when,
        "issued_by": "alice",
        "command_seq": seq,
    }


def run(
    ctl: SyncController, player: SimPlayer, clock: Clock, seconds: float, step_ms: float = 250.0
) -> list[float]:
    """Advance the clock, ticking the controller; returns the offset after every tick."""
    diffs = []
    assert ctl.timeline is not None
    for _ in range(int(seconds * 1000 / step_ms)):
        clock.now += step_ms
        player.advance(step_ms)
        ctl.tick()
        diffs.append(player.position() - ctl.timeline.at(clock.now))
    return diffs


def sign_flips(rates: list[float], base: float = 1.0) -> int:
    """How often the nudge went from one side of ``base`` to the other."""
    sides = [1 if r > base else -1 for r in rates if abs(r - base) > 1e-9]
    return sum(1 for a, b in itertools.pairwise(sides) if a != b)


def direct_flips(rates: list[float], base: float = 1.0) -> int:
    """Flips with no return to ``base`` in between (what hysteresis must forbid)."""
    flips, prev = 0, 0
    for r in rates:
        side = 0 if abs(r - base) < 1e-9 else (1 if r > base else -1)
        if side and prev and side != prev:
            flips += 1
        prev = side
    return flips


def started(
    start_error: float, drift: float = 0.0, snap: float = 0.0
) -> tuple[SyncController, SimPlayer, Clock]:
    """A room playing from 100 s; the player starts ``start_error`` off and already playing."""
    clock = Clock()
    player = SimPlayer(position=100.0 + start_error, drift=drift, seek_snap=snap)
    player.play()
    ctl = SyncController(player, clock)
    ctl.timeline = Timeline(100.0, T0, 1.0, True)
    ctl.command_seq = 1
    return ctl, player, clock


# --------------------------------------------------------------------------- commands


def test_play_waits_for_when_then_starts_on_time() -> None:
    clock = Clock()
    player = SimPlayer(position=37.0)
    ctl = SyncController(player, clock)
    actions = ctl.on_command(play_cmd(40.0, T0 + 500))
    assert actions == [Action("seek", 40.0)]
    assert not player.is_playing()
    clock.now += 250
    assert ctl.tick() == []
    clock.now += 250
    assert ctl.tick() == [Action("play")]
    diffs = run(ctl, player, clock, 10)
    assert max(abs(d) for d in diffs) < 1e-9
    assert player.rates == []


def test_pause_and_seek_commands() -> None:
    ctl, player, clock = started(0.0)
    clock.now += 5_000
    player.advance(5_000)
    pause = {
        "command": "pause",
        "position": 105.0,
        "rate": 1.0,
        "when": clock.now,
        "command_seq": 2,
    }
    assert ctl.on_command(pause) == [Action("pause")]
    pause2 = {**pause, "position": 110.0, "command_seq": 3}
    assert ctl.on_command(pause2) == [Action("seek", 110.0)]
    seek = {
        "command": "seek",
        "position": 200.0,
        "rate": 1.0,
        "when": clock.now + 500,
        "command_seq": 4,
    }
    assert ctl.on_command(seek) == [Action("seek", 200.0)]
    assert not player.is_playing()  # a seek keeps the paused state
    ctl.on_command(play_cmd(200.0, clock.now + 500, seq=5))
    seek_playing = {**seek, "position": 300.0, "when": clock.now + 1_000, "command_seq": 6}
    clock.now += 600
    ctl.tick()
    assert player.is_playing()
    actions = ctl.on_command(seek_playing)
    assert Action("pause") in actions
    assert Action("seek", 300.0) in actions
    clock.now += 400
    assert ctl.tick() == [Action("play")]


def test_rate_command_changes_the_base_rate() -> None:
    ctl, player, clock = started(0.0)
    cmd = {"command": "rate", "position": 100.0, "rate": 1.5, "when": clock.now, "command_seq": 2}
    assert ctl.on_command(cmd) == [Action("rate", 1.5)]
    diffs = run(ctl, player, clock, 20)
    assert abs(diffs[-1]) < 1e-6
    assert player.rate == 1.5


def test_old_and_duplicate_commands_are_ignored() -> None:
    ctl, _player, clock = started(0.0)
    ctl.command_seq = 5
    assert ctl.on_command(play_cmd(0.0, clock.now, seq=5)) == []
    assert ctl.on_command(play_cmd(0.0, clock.now, seq=3)) == []
    assert ctl.timeline == Timeline(100.0, T0, 1.0, True)


def test_state_adopted_on_join_unless_a_newer_command_is_known() -> None:
    clock = Clock()
    player = SimPlayer()
    ctl = SyncController(player, clock)
    clock.now += 10_000
    state = {"state": "playing", "position": 50.0, "rate": 1.0, "when": T0, "command_seq": 4}
    actions = ctl.on_state(state)
    assert actions == [Action("play"), Action("seek", 60.0)]
    assert ctl.command_seq == 4
    # The same or an older state does not rewind a newer command.
    ctl.on_command(
        {"command": "pause", "position": 61.0, "rate": 1.0, "when": clock.now, "command_seq": 5}
    )
    assert ctl.on_state(state) == []
    assert ctl.timeline is not None
    assert not ctl.timeline.playing
    # A state without `when` falls back to updated_at.
    fresh = SyncController(SimPlayer(), clock)
    fresh.on_state({"state": "paused", "position": 3.0, "updated_at": T0, "command_seq": 0})
    assert fresh.timeline == Timeline(3.0, T0, 1.0, False)


def test_sync_hint_resets_the_timeline() -> None:
    ctl, _player, clock = started(0.0)
    clock.now += 1_000
    hint = {
        "target_position": 150.0,
        "should_be_playing": True,
        "offset_seconds": -49,
        "at": clock.now,
    }
    assert ctl.on_sync(hint) == [Action("seek", 150.0)]
    assert SyncController(SimPlayer(), clock).on_sync({**hint, "should_be_playing": False}) == [
        Action("seek", 150.0)
    ]


def test_report_data() -> None:
    ctl, _, _ = started(0.25)
    assert ctl.report(42.0) == {
        "position": 100.25,
        "is_playing": True,
        "is_buffering": False,
        "rtt_ms": 42.0,
        "command_seq": 1,
    }
    bare = SyncController(SimPlayer(), Clock()).report(is_buffering=True)
    assert "command_seq" not in bare
    assert bare["is_buffering"] is True


def test_nothing_to_do_without_a_timeline() -> None:
    assert SyncController(SimPlayer(), Clock()).tick() == []


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="band"):
        SyncConfig(dead_band_s=0.01, release_band_s=0.02)
    with pytest.raises(ValueError, match="nudge"):
        SyncConfig(max_nudge=1.5)


# --------------------------------------------------------------------------- correction


def test_small_offsets_are_ignored() -> None:
    ctl, player, clock = started(0.05)
    run(ctl, player, clock, 30)
    assert player.rates == []
    assert player.seeks == []


@pytest.mark.parametrize("error", [-2.9, -1.0, -0.2, 0.07, 0.5, 2.0, 2.95])
def test_nudges_converge_without_seeking_or_oscillating(error: float) -> None:
    ctl, player, clock = started(error)
    diffs = run(ctl, player, clock, 120)
    assert abs(diffs[-1]) <= 0.02 + 1e-9
    assert player.seeks == []
    assert sign_flips(player.rates) == 0
    assert player.rate == 1.0
    assert all(abs(r - 1.0) <= 0.08 + 1e-9 for r in player.rates)
    # Monotone approach: the offset never grows while correcting.
    assert all(abs(b) <= abs(a) + 1e-9 for a, b in itertools.pairwise(diffs))


def test_large_offsets_seek_once() -> None:
    ctl, player, clock = started(-12.0)
    diffs = run(ctl, player, clock, 30)
    assert len(player.seeks) == 1
    assert abs(diffs[-1]) < 0.02
    assert ctl.seeks == 1


@pytest.mark.parametrize("drift", [0.005, -0.005, 0.02, -0.02])
def test_constant_drift_stays_bounded_without_flapping(drift: float) -> None:
    ctl, player, clock = started(0.0, drift=drift)
    diffs = run(ctl, player, clock, 600)
    assert max(abs(d) for d in diffs) <= 0.06 + abs(drift) * 0.25 + 1e-9  # band + one tick
    assert sign_flips(player.rates) == 0
    assert player.seeks == []


def test_drift_against_the_initial_error_flips_direction_once_at_most() -> None:
    ctl, player, clock = started(1.0, drift=-0.01)
    diffs = run(ctl, player, clock, 600)
    assert abs(diffs[-1]) <= 0.063
    assert sign_flips(player.rates) <= 1
    assert direct_flips(player.rates) == 0
    assert ctl.direction_changes <= 1


def test_sparse_ticks_do_not_oscillate() -> None:
    ctl, player, clock = started(0.9)
    diffs = run(ctl, player, clock, 120, step_ms=1_000)
    assert abs(diffs[-1]) <= 0.06
    assert direct_flips(player.rates) == 0
    assert sign_flips(player.rates) <= 1


def seek_times(ctl: SyncController, player: SimPlayer, clock: Clock, seconds: float) -> list[float]:
    times = []
    for _ in range(int(seconds * 4)):
        clock.now += 250
        player.advance(250)
        before = len(player.seeks)
        ctl.tick()
        if len(player.seeks) > before:
            times.append(clock.now)
    return times


def test_imprecise_seeks_back_off() -> None:
    # Every seek lands on a 30 s keyframe grid: seeking alone almost never reaches the target.
    ctl, player, clock = started(-20.0, snap=30.0)
    times = seek_times(ctl, player, clock, 300)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == sorted(gaps)  # each retry waits at least as long as the one before
    assert gaps[:4] == [2_000.0, 4_000.0, 8_000.0, 16_000.0]
    assert max(gaps) == 30_000.0  # then at most one seek every 30 s, never a loop
    assert len(times) <= 13


def test_nudging_finishes_what_an_imprecise_seek_started() -> None:
    ctl, player, clock = started(-20.0, snap=8.0)
    times = seek_times(ctl, player, clock, 120)
    assert 1 <= len(times) <= 4
    assert ctl.timeline is not None
    assert abs(player.position() - ctl.timeline.at(clock.now)) < 0.06


@settings(max_examples=60, deadline=None)
@given(
    error=st.floats(-2.95, 2.95),
    drift=st.sampled_from([0.0, 0.001, -0.001, 0.004, -0.004]),
    step_ms=st.sampled_from([100.0, 250.0, 500.0]),
    seed=st.integers(0, 1000),
)
def test_property_converges_and_never_oscillates(
    error: float, drift: float, step_ms: float, seed: int
) -> None:
    ctl, player, clock = started(error, drift=drift)
    rng = random.Random(seed)
    diffs = []
    assert ctl.timeline is not None
    for _ in range(int(180_000 / step_ms)):
        jitter = rng.uniform(0.8, 1.2) * step_ms  # ticks are never perfectly regular
        clock.now += jitter
        player.advance(jitter)
        ctl.tick()
        diffs.append(player.position() - ctl.timeline.at(clock.now))
    assert player.seeks == []
    assert direct_flips(player.rates) == 0
    assert sign_flips(player.rates) <= 1
    assert max(abs(d) for d in diffs[-100:]) <= 0.07


# --------------------------------------------------------------------------- with the server engine


def test_end_to_end_with_the_room_engine() -> None:
    """Three players follow the engine's commands through delays and stay together."""
    from revenge_ws.syncplay.machine import Actor, Publish, Settings, handle

    s = Settings(scrypt_n=16, scrypt_r=1)
    clock = Clock()
    users = ["alice", "bob", "carol"]
    room = handle(
        None,
        "syncplay.create",
        {"name": "n", "content": {"type": "movie", "id": "m"}, "public": True},
        Actor("alice", "Alice", "s-alice"),
        clock.now,
        settings=s,
    ).room
    assert room is not None
    players = {u: SimPlayer(drift=d) for u, d in zip(users, [0.0, 0.003, -0.002], strict=True)}
    ctls = {u: SyncController(players[u], clock) for u in users}
    delay = {"alice": 20.0, "bob": 150.0, "carol": 240.0}  # one-way, ms
    inbox: list[tuple[float, str, dict[str, Any]]] = []

    def send(uid: str, rtype: str, **data: Any) -> None:
        out = handle(
            room,
            rtype,
            {"room_id": room.room_id, **data},
            Actor(uid, uid, f"s-{uid}"),
            clock.now,
            settings=s,
        )
        for e in out.effects:
            if isinstance(e, Publish) and e.type == "syncplay.command":
                for u in users:
                    inbox.append((clock.now + delay[u], u, e.data))

    for u in users[1:]:
        send(u, "join", rtt_ms=2 * delay[u])
    for u in users:
        send(u, "ready", position=0.0)
    send("alice", "play")
    cmd = room.last_command
    assert cmd is not None
    assert cmd["when"] >= clock.now + 2 * 2 * delay["carol"]

    for step in range(2_400):  # 10 minutes at 250 ms
        clock.now += 250
        for p in players.values():
            p.advance(250)
        for item in [i for i in inbox if i[0] <= clock.now]:
            inbox.remove(item)
            ctls[item[1]].on_command(item[2])
        for c in ctls.values():
            c.tick()
        if step == 400:
            send("bob", "seek", position=1_000.0)
    positions = [p.position() for p in players.values()]
    assert max(positions) - min(positions) < 0.15
    assert abs(positions[0] - room.position_at(clock.now)) < 0.1
    assert all(direct_flips(p.rates) == 0 for p in players.values())
