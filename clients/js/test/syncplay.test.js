import { test } from "node:test";
import assert from "node:assert/strict";
import { MediaElementPlayer, SyncController, SyncPlay, Timeline } from "../revenge-ws.js";
import { FakeClock, flush, seeded } from "./fakes.js";

const T0 = 1_700_000_000_000;

/** A player whose position advances with its rate (times 1 + drift); seeks may snap to keyframes. */
class SimPlayer {
  constructor(position = 0, drift = 0, snap = 0) {
    this._position = position;
    this._playing = false;
    this._rate = 1;
    this.drift = drift;
    this.snap = snap;
    this.rates = [];
    this.seeks = [];
  }
  advance(ms) {
    if (this._playing) this._position += (ms / 1000) * this._rate * (1 + this.drift);
  }
  position() {
    return this._position;
  }
  isPlaying() {
    return this._playing;
  }
  get rate() {
    return this._rate;
  }
  setRate(r) {
    this._rate = r;
    this.rates.push(r);
  }
  seek(p) {
    if (this.snap) p -= p % this.snap;
    this._position = p;
    this.seeks.push(p);
  }
  play() {
    this._playing = true;
  }
  pause() {
    this._playing = false;
  }
}

const playCmd = (position, when, seq = 1, rate = 1) => ({
  room_id: "r",
  command: "play",
  position,
  rate,
  when,
  issued_by: "alice",
  command_seq: seq,
});

/** A controller on a playing timeline at 100 s, the player off by `error` seconds. */
function started(error, { drift = 0, snap = 0 } = {}) {
  const clock = { now: T0 };
  const player = new SimPlayer(100 + error, drift, snap);
  const ctl = new SyncController(player, () => clock.now);
  ctl.timeline = new Timeline(100, T0, 1, true);
  ctl.commandSeq = 1;
  player.play();
  return { ctl, player, clock };
}

function run(ctl, player, clock, seconds, stepMs = 250) {
  const diffs = [];
  for (let i = 0; i < (seconds * 1000) / stepMs; i++) {
    clock.now += stepMs;
    player.advance(stepMs);
    ctl.tick();
    diffs.push(player.position() - ctl.timeline.at(clock.now));
  }
  return diffs;
}

test("play waits for `when`, then starts on time", () => {
  const clock = { now: T0 };
  const player = new SimPlayer(37);
  const ctl = new SyncController(player, () => clock.now);
  const actions = ctl.onCommand(playCmd(10, T0 + 500));
  assert.deepEqual(actions, [{ kind: "seek", value: 10 }], "parked at the position, paused");
  assert.equal(player.isPlaying(), false);
  clock.now += 499;
  assert.deepEqual(ctl.tick(), []);
  clock.now += 1;
  assert.deepEqual(ctl.tick(), [{ kind: "play" }]);
  assert.equal(ctl.target(), 10);
});

test("pause and seek commands; stale ones are ignored", () => {
  const { ctl, player, clock } = started(0);
  clock.now += 5000;
  player.advance(5000);
  assert.deepEqual(ctl.onCommand({ command: "pause", position: 105, rate: 1, when: clock.now, command_seq: 2 }), [{ kind: "pause" }]);
  assert.deepEqual(ctl.onCommand({ command: "seek", position: 50, rate: 1, when: clock.now + 500, command_seq: 3 }), [{ kind: "seek", value: 50 }]);
  assert.equal(player.isPlaying(), false, "a seek keeps the play state");
  assert.deepEqual(ctl.onCommand({ command: "play", position: 0, rate: 1, when: clock.now, command_seq: 3 }), []);
  assert.deepEqual(ctl.onCommand({ command: "rate", position: 50, rate: 1.5, when: clock.now, command_seq: 4 }), [{ kind: "rate", value: 1.5 }]);
});

test("state is adopted on join unless a newer command is known", () => {
  const clock = { now: T0 };
  const player = new SimPlayer();
  const ctl = new SyncController(player, () => clock.now);
  ctl.onState({ state: "playing", position: 20, rate: 1, when: T0 - 2000, command_seq: 4 });
  assert.ok(Math.abs(player.position() - 22) < 1e-9);
  assert.equal(player.isPlaying(), true);
  ctl.onState({ state: "paused", position: 0, rate: 1, when: T0, command_seq: 3 });
  assert.equal(player.isPlaying(), true, "older state ignored");
});

test("a sync hint resets the timeline", () => {
  const { ctl, player, clock } = started(0);
  ctl.onSync({ target_position: 200, should_be_playing: false, at: clock.now });
  assert.equal(player.isPlaying(), false);
  assert.equal(player.position(), 200);
});

test("report data", () => {
  const { ctl } = started(0.25);
  assert.deepEqual(ctl.report(42), { position: 100.25, is_playing: true, is_buffering: false, rtt_ms: 42, command_seq: 1 });
});

test("offsets under the dead band (60 ms) change nothing", () => {
  const { ctl, player, clock } = started(0.05);
  run(ctl, player, clock, 30);
  assert.deepEqual(player.rates, []);
  assert.deepEqual(player.seeks, []);
});

for (const error of [-2.5, -0.5, -0.07, 0.07, 0.5, 2.5]) {
  test(`an offset of ${error}s converges by nudging, without seeking or oscillating`, () => {
    const { ctl, player, clock } = started(error);
    const diffs = run(ctl, player, clock, 120);
    assert.ok(Math.abs(diffs[diffs.length - 1]) <= 0.02 + 1e-9);
    assert.deepEqual(player.seeks, []);
    assert.equal(ctl.directionChanges, 0);
    for (const r of player.rates) assert.ok(r >= 0.92 - 1e-9 && r <= 1.08 + 1e-9);
    assert.equal(player.rate, 1, "back to the base rate");
  });
}

test("large offsets seek once", () => {
  const { ctl, player, clock } = started(-12);
  const diffs = run(ctl, player, clock, 30);
  assert.equal(player.seeks.length, 1);
  assert.ok(Math.abs(diffs[diffs.length - 1]) <= 0.06);
});

for (const drift of [-0.02, -0.005, 0.005, 0.02]) {
  test(`a constant drift of ${drift} stays bounded without flapping`, () => {
    const { ctl, player, clock } = started(0, { drift });
    const diffs = run(ctl, player, clock, 600);
    assert.ok(Math.max(...diffs.map(Math.abs)) <= 0.06 + Math.abs(drift) * 0.25 + 1e-9);
    assert.deepEqual(player.seeks, []);
    assert.equal(ctl.directionChanges, 0);
  });
}

test("imprecise seeks back off (no seek loop)", () => {
  const { ctl, player, clock } = started(-20, { snap: 30 });
  const seeksAt = [];
  for (let i = 0; i < 1200; i++) {
    clock.now += 250;
    player.advance(250);
    const before = player.seeks.length;
    ctl.tick();
    if (player.seeks.length > before) seeksAt.push(clock.now);
  }
  // The same numbers as the Python controller: 2, 4, 8, 16 s, then at most one every 30 s.
  const gaps = seeksAt.slice(1).map((t, i) => t - seeksAt[i]);
  assert.deepEqual(gaps.slice(0, 4), [2000, 4000, 8000, 16000]);
  for (let i = 1; i < gaps.length; i++) assert.ok(gaps[i] >= gaps[i - 1], "cooldown doubles");
  assert.equal(Math.max(...gaps), 30000);
  assert.ok(seeksAt.length <= 13, `${seeksAt.length} seeks in 300 s`);
});

test("randomised: converges and never oscillates", () => {
  const rng = seeded(11);
  for (let n = 0; n < 60; n++) {
    const error = (rng() - 0.5) * 5.8;
    const drift = (rng() - 0.5) * 0.02;
    const step = [100, 250, 500][Math.floor(rng() * 3)];
    const { ctl, player, clock } = started(error, { drift });
    const diffs = run(ctl, player, clock, 180, step);
    const tail = diffs.slice(-20).map(Math.abs);
    assert.ok(Math.max(...tail) <= 0.06 + Math.abs(drift) * (step / 1000) + 0.01, `error ${error} drift ${drift} step ${step}: ${Math.max(...tail)}`);
    assert.ok(ctl.directionChanges <= 1, `direction changes ${ctl.directionChanges}`);
    assert.ok(player.seeks.length <= (Math.abs(error) >= 3 ? 1 : 0));
  }
});

test("config is validated", () => {
  assert.throws(() => new SyncController(new SimPlayer(), () => 0, { deadBandS: 0.01, releaseBandS: 0.02 }), /releaseBandS/);
  assert.throws(() => new SyncController(new SimPlayer(), () => 0, { maxNudge: 1.5 }), /maxNudge/);
});

// ---------------------------------------------------------------- a SyncPlay session

/** A fake HTMLMediaElement: time advances with the clock while playing. */
class FakeMedia extends EventTarget {
  constructor(clock) {
    super();
    this.clock = clock;
    this._t = 0;
    this._at = clock.now();
    this.paused = true;
    this.playbackRate = 1;
    this.readyState = 4;
    this.seeking = false;
    this.muted = false;
    this.duration = 30;
    this.plays = [];
  }
  get currentTime() {
    if (!this.paused) return this._t + ((this.clock.now() - this._at) / 1000) * this.playbackRate;
    return this._t;
  }
  set currentTime(v) {
    this._t = v;
    this._at = this.clock.now();
  }
  play() {
    this._t = this.currentTime;
    this._at = this.clock.now();
    this.paused = false;
    this.plays.push(this.clock.now());
    return Promise.resolve();
  }
  pause() {
    this._t = this.currentTime;
    this.paused = true;
  }
}

/** Just enough of a RevengeClient: records requests, answers them from `answers`. */
class FakeClient {
  constructor(clock) {
    this.clock = clock;
    this.sent = [];
    this.handlers = new Map();
    this.connected = true;
    this.userId = "alice";
    this.rtt = 12.34; // the min-delay estimate: what join and reports send
    this.rttLatest = 97.5; // a queued ping: never sent as rtt_ms
    this.logger = {};
    this.answers = {};
  }
  serverTime() {
    return this.clock.now();
  }
  async request(type, data) {
    this.sent.push({ type, data });
    const a = this.answers[type];
    if (a instanceof Error) throw a;
    return typeof a === "function" ? a(data) : (a ?? {});
  }
  on(key, fn) {
    if (!this.handlers.has(key)) this.handlers.set(key, new Set());
    this.handlers.get(key).add(fn);
    return () => this.handlers.get(key).delete(fn);
  }
  emit(key, msg) {
    for (const fn of this.handlers.get(key) ?? []) fn(msg);
  }
  pub(type, data) {
    this.emit(type, { type, channel: "playback:r1", data });
  }
  types() {
    return this.sent.map((s) => s.type);
  }
}

const ROOM = { room_id: "r1", name: "Movie night", content: { type: "movie", id: "m1" }, leader_id: "alice" };

test("a session: ready when loaded, scheduled start at `when`, reports, members, end", async () => {
  const clock = new FakeClock(T0);
  const client = new FakeClient(clock);
  const media = new FakeMedia(clock);
  client.answers["syncplay.create"] = {
    room: ROOM,
    members: [{ user_id: "alice", is_leader: true }],
    state: { room_id: "r1", state: "idle", position: 0, rate: 1, when: T0, command_seq: 0 },
  };
  const sp = new SyncPlay(client, media, { timers: clock });
  const events = [];
  sp.on("members", (m) => events.push(m.length));
  const room = await sp.create({ name: "Movie night", content: { type: "movie", id: "m1" } });
  assert.equal(room.room_id, "r1");
  assert.equal(sp.isLeader, true);
  await flush();
  assert.deepEqual(client.types(), ["syncplay.create", "syncplay.ready"]);

  client.pub("syncplay.member_joined", { user_id: "bob", is_leader: false });
  assert.deepEqual(events, [1, 2]);

  // A play scheduled 500 ms ahead: paused until then, playing from exactly then.
  client.pub("syncplay.command", { room_id: "r1", command: "play", position: 3, rate: 1, when: T0 + 500, command_seq: 1 });
  assert.equal(media.paused, true);
  assert.equal(media.currentTime, 3);
  await clock.advance(499);
  assert.equal(media.paused, true);
  await clock.advance(1);
  assert.equal(media.paused, false);
  assert.deepEqual(media.plays, [T0 + 500]);
  await clock.advance(2000);
  assert.ok(Math.abs(media.currentTime - 5) < 1e-9);

  // Control requests carry the last known command_seq.
  await sp.pause();
  assert.deepEqual(client.sent.at(-1), { type: "syncplay.pause", data: { room_id: "r1", command_seq: 1 } });

  // Reports every 5 s.
  await clock.advance(5000);
  const report = client.sent.find((s) => s.type === "syncplay.report");
  assert.equal(report.data.room_id, "r1");
  assert.equal(report.data.is_playing, true);
  assert.equal(report.data.rtt_ms, 12.3, "client.rtt (the min-delay estimate), not rttLatest");
  assert.equal(report.data.command_seq, 1);

  // A drifting element is nudged, not seeked.
  media.currentTime = media.currentTime + 0.3;
  await clock.advance(250);
  assert.ok(media.playbackRate < 1);

  const ended = [];
  sp.on("ended", (d) => ended.push(d.reason));
  client.pub("syncplay.ended", { room_id: "r1", reason: "ended_by_leader" });
  assert.deepEqual(ended, ["ended_by_leader"]);
  assert.equal(sp.roomId, null);
  const n = client.sent.length;
  await clock.advance(10_000);
  assert.equal(client.sent.length, n, "no more reports after the end");
});

test("a session re-joins after a reconnect and waits for media before ready", async () => {
  const clock = new FakeClock(T0);
  const client = new FakeClient(clock);
  const media = new FakeMedia(clock);
  media.readyState = 1;
  const state = { room_id: "r1", state: "playing", position: 10, rate: 1, when: T0 - 1000, command_seq: 3 };
  client.answers["syncplay.join"] = { room: ROOM, members: [], state };
  const sp = new SyncPlay(client, media, { timers: clock });
  await sp.join("r1", { password: "pw" });
  assert.deepEqual(client.sent[0], { type: "syncplay.join", data: { room_id: "r1", password: "pw", rtt_ms: 12.3 } }, "client.rtt, not rttLatest");
  assert.ok(!client.types().includes("syncplay.ready"), "not ready before the media can play");
  media.readyState = 4;
  media.dispatchEvent(new Event("canplay"));
  await flush();
  assert.equal(client.types().filter((t) => t === "syncplay.ready").length, 1);
  assert.ok(Math.abs(media.currentTime - 11) < 0.3);
  client.emit("client.connected", { type: "client.connected", data: {} });
  await flush();
  const rejoin = client.sent.filter((s) => s.type === "syncplay.join");
  assert.equal(rejoin.length, 2);
  assert.deepEqual(rejoin[1].data, { room_id: "r1", password: "pw" });

  // Buffering: a long stall is reported, a short one is not.
  media.readyState = 2;
  media.dispatchEvent(new Event("waiting"));
  await clock.advance(300);
  media.readyState = 4;
  media.dispatchEvent(new Event("playing"));
  await clock.advance(1000);
  assert.ok(!client.types().includes("syncplay.buffering"));
  media.readyState = 2;
  media.dispatchEvent(new Event("waiting"));
  await clock.advance(1000);
  assert.ok(client.types().includes("syncplay.buffering"));
  media.readyState = 4;
  media.dispatchEvent(new Event("playing"));
  await flush();
  assert.equal(client.types().at(-1), "syncplay.ready");
  await sp.leave();
  assert.equal(client.types().at(-1), "syncplay.leave");
});

test("autoplay refused: the element is muted and played again", async () => {
  const calls = [];
  const el = {
    muted: false,
    paused: true,
    currentTime: 0,
    playbackRate: 1,
    play() {
      calls.push(this.muted);
      if (!this.muted) return Promise.reject(Object.assign(new Error("no"), { name: "NotAllowedError" }));
      this.paused = false;
      return Promise.resolve();
    },
    pause() {},
  };
  const blocked = [];
  const p = new MediaElementPlayer(el, { onAutoplayBlocked: (m) => blocked.push(m) });
  p.play();
  await flush();
  assert.equal(el.muted, true);
  assert.deepEqual(blocked, [true]);
  p.play();
  await flush();
  assert.deepEqual(calls, [false, true]);
  assert.equal(p.isPlaying(), true);
});
