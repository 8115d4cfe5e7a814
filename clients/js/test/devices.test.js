// Devices, now playing and remote control (contract §13): device.hello after every
// (re)connect but not after device.ended, playback.update and its periodic repeat,
// remote.command answered with remote.result, sendCommand, listDevices and DeviceList.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  DeviceList,
  ErrorCode,
  RequestError,
  RevengeClient,
  deviceHello,
  nowPlayingPosition,
  playbackData,
} from "../revenge-ws.js";
import { FakeClock, FakeWebSocket, flush, seeded } from "./fakes.js";

const T0 = 1_700_000_000_000;
const DEVICE = {
  deviceId: "tv-1",
  name: "Living room TV",
  client: "revenge-tv",
  version: "2.1.0",
  commands: ["play", "pause", "seek"],
};

function setup(opts = {}) {
  FakeWebSocket.reset();
  const clock = new FakeClock(T0);
  const client = new RevengeClient("ws://hub.test/api/v1/ws", {
    token: "tok-1",
    WebSocket: FakeWebSocket,
    fetch: null,
    timers: clock,
    random: seeded(7),
    watchNetwork: false,
    logger: {},
    device: DEVICE,
    ...opts,
  });
  return { clock, client };
}

function deviceObject(hello, over = {}) {
  return {
    device_id: hello.device_id,
    user_id: "alice",
    name: hello.name,
    client: hello.client,
    version: hello.version,
    capabilities: hello.capabilities,
    connected_at: T0,
    updated_at: T0,
    now_playing: null,
    ...over,
  };
}

/** Accept the newest socket; answer its hello (when `hello`), subscribes and pings. */
async function accept(client, clock, { hello = true } = {}) {
  if (client.state === "idle") client.start();
  await flush();
  const ws = FakeWebSocket.last;
  ws.accept({ server_time: clock.now() });
  await flush();
  if (hello) {
    for (const req of ws.requests("device.hello")) if (!req.answered) {
      req.answered = true;
      ws.reply(req, { device: deviceObject(req.data) });
    }
  }
  ws.ackSubscribes();
  ws.pong(clock);
  await flush();
  return ws;
}

function collect(client, key) {
  const got = [];
  client.on(key, (m) => got.push(m));
  return got;
}

test("device.hello is the first request of every connection, and connected waits for it", async () => {
  const { clock, client } = setup();
  const events = collect(client, "client.device");
  client.start();
  await flush();
  const ws = FakeWebSocket.last;
  ws.accept({ server_time: clock.now() });
  await flush();
  assert.equal(ws.sent[0].type, "device.hello", "hello before the re-subscriptions");
  assert.deepEqual(ws.sent[0].data, {
    device_id: "tv-1",
    name: "Living room TV",
    client: "revenge-tv",
    version: "2.1.0",
    capabilities: { remote_control: true, commands: ["play", "pause", "seek"] },
  });
  ws.ackSubscribes();
  await flush();
  assert.equal(client.connected, false, "not connected before the hello is answered");
  ws.reply(ws.sent[0], { device: deviceObject(ws.sent[0].data) });
  await flush();
  assert.equal(client.connected, true);
  assert.equal(client.deviceActive, true);
  assert.equal(client.device.device_id, "tv-1");
  assert.deepEqual(events.map((e) => e.data.active), [true]);

  // After a reconnect: hello again, on the new connection.
  ws.fail();
  await clock.advance(30_000);
  const ws2 = await accept(client, clock);
  assert.notEqual(ws2, ws);
  assert.equal(ws2.requests("device.hello").length, 1);
  assert.equal(ws2.sent[0].type, "device.hello");
  assert.equal(client.deviceActive, true);
  await client.close();
});

test("device.ended: no hello again on that connection, but after the next reconnect", async () => {
  const { clock, client } = setup();
  const events = collect(client, "client.device");
  const ws = await accept(client, clock);
  const first = client.reportPlayback({ itemId: "m1", state: "playing", position: 10 });
  await flush();
  ws.reply(ws.lastRequest("playback.update"), {});
  assert.equal(await first, true);
  ws.push({ type: "device.ended", data: { device_id: "tv-1", reason: "replaced" } });
  await flush();
  assert.equal(client.deviceActive, false);
  assert.deepEqual(events.at(-1).data, { active: false, device: client.device, reason: "replaced" });
  await clock.advance(60_000);
  ws.pong(clock);
  await flush();
  assert.equal(ws.requests("device.hello").length, 1, "never says hello again on device.ended");
  const before = ws.requests("playback.update").length;
  assert.equal(await client.reportPlayback({ item_id: "m1", state: "paused", position: 70 }), false);
  assert.equal(ws.requests("playback.update").length, before, "a device taken over reports nothing");

  ws.serverClose(1012, "restart");
  await clock.advance(10_000);
  const ws2 = await accept(client, clock);
  assert.equal(ws2.requests("device.hello").length, 1);
  assert.equal(client.deviceActive, true);
  // What it plays now is reported again on the new connection, right after the hello.
  await flush();
  const upd = ws2.lastRequest("playback.update");
  assert.deepEqual(upd.data, { item_id: "m1", state: "paused", position: 70 });
  await client.close();
});

test("a refused hello is reported and the connection stays", async () => {
  const { clock, client } = setup();
  const events = collect(client, "client.device");
  client.start();
  await flush();
  const ws = FakeWebSocket.last;
  ws.accept({ server_time: clock.now() });
  await flush();
  ws.replyError(ws.lastRequest("device.hello"), "INVALID_MESSAGE", "name too long");
  ws.ackSubscribes();
  await flush();
  assert.equal(client.connected, true);
  assert.equal(client.deviceActive, false);
  assert.deepEqual(events[0].data.error, { code: "INVALID_MESSAGE", message: "name too long" });
  assert.equal(await client.reportPlayback({ item_id: "m1", state: "playing", position: 0 }), false);
  await client.close();
});

test("reportPlayback sends playback.update and repeats it every 10 s while playing", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const sent = client.reportPlayback({
    itemId: "m42",
    title: "Arrival",
    state: "playing",
    position: 12.3456,
    duration: 6960,
    playMethod: "transcode",
    transcodeJobId: "j9",
    volume: undefined,
  });
  await flush();
  const first = ws.lastRequest("playback.update");
  assert.deepEqual(first.data, {
    item_id: "m42",
    title: "Arrival",
    state: "playing",
    position: 12.346,
    duration: 6960,
    play_method: "transcode",
    transcode_job_id: "j9",
  });
  ws.reply(first, {});
  assert.equal(await sent, true);

  const answer = () => {
    for (const r of ws.requests("playback.update")) if (!r.answered) (r.answered = true), ws.reply(r, {});
    ws.pong(clock);
  };
  await clock.advance(9_999);
  answer();
  assert.equal(ws.requests("playback.update").length, 1);
  await clock.advance(1);
  answer();
  assert.equal(ws.requests("playback.update").length, 2);
  assert.equal(ws.lastRequest("playback.update").data.position, 22.346, "extrapolated by 10 s");
  await clock.advance(10_000);
  answer();
  assert.equal(ws.requests("playback.update").length, 3);
  assert.equal(ws.lastRequest("playback.update").data.position, 32.346);

  // A state change resets the period; rate counts.
  await clock.advance(4_000);
  client.reportPlayback({ itemId: "m42", state: "playing", position: 100, rate: 2 });
  await flush();
  answer();
  await clock.advance(10_000);
  answer();
  assert.equal(ws.requests("playback.update").length, 5);
  assert.equal(ws.lastRequest("playback.update").data.position, 120);
  assert.deepEqual(client.currentPlayback(), { item_id: "m42", state: "playing", position: 120, rate: 2 });

  // Paused: nothing periodic; stopped clears it.
  client.reportPlayback({ itemId: "m42", state: "paused", position: 121 });
  await flush();
  answer();
  await clock.advance(60_000);
  answer();
  assert.equal(ws.requests("playback.update").length, 6);
  client.reportPlayback({ itemId: "m42", state: "stopped", position: 121 });
  await flush();
  answer();
  assert.equal(client.currentPlayback(), null);
  assert.equal(ws.requests("playback.update").length, 7);
  await client.close();
});

test("reportPlayback: a refusal rejects with its code; bad reports reject at once", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const p = client.reportPlayback({ item_id: "m1", state: "playing", position: 1, volume: 300 });
  await flush();
  ws.replyError(ws.lastRequest("playback.update"), "INVALID_MESSAGE", "volume must be 0-100");
  await assert.rejects(p, (err) => err instanceof RequestError && err.code === "INVALID_MESSAGE");
  await assert.rejects(client.reportPlayback({ state: "playing", position: 1 }), RangeError);
  await assert.rejects(client.reportPlayback({ item_id: "m1", state: "running", position: 1 }), RangeError);
  await assert.rejects(client.reportPlayback({ item_id: "m1", state: "paused", position: -1 }), RangeError);
  await client.close();
});

test("while disconnected the report is kept and sent after the hello", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  ws.fail();
  await flush();
  assert.equal(await client.reportPlayback({ itemId: "ep7", state: "playing", position: 50 }), false);
  await clock.advance(3_000);
  const ws2 = await accept(client, clock);
  const types = ws2.sent.map((m) => m.type);
  assert.ok(types.indexOf("device.hello") < types.indexOf("playback.update"), types.join());
  const upd = ws2.lastRequest("playback.update");
  assert.equal(upd.data.item_id, "ep7");
  assert.ok(upd.data.position >= 53 && upd.data.position < 54, String(upd.data.position));
  await client.close();
});

test("onCommand: the handler's state, its error, async handlers, no handler", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const seen = [];
  ws.push({ type: "remote.command", data: { command_id: "k0", command: "pause", args: {}, from: { user_id: "alice", device_id: null } } });
  await flush();
  assert.deepEqual(ws.lastRequest("remote.result").data, { command_id: "k0", ok: false, error: "this device takes no remote commands" });

  const off = client.onCommand(async (cmd) => {
    seen.push(cmd);
    if (cmd.command === "seek") {
      await new Promise((r) => setTimeout(r, 5));
      if (cmd.args.position > 100) throw new Error("beyond the end");
      return { state: "paused", position: cmd.args.position };
    }
    if (cmd.command === "pause") return { state: "paused", position: 7 };
    return undefined;
  });
  ws.push({ type: "remote.command", data: { command_id: "k1", command: "pause", args: {}, from: { user_id: "alice", device_id: "phone" } } });
  await flush();
  const r1 = ws.lastRequest("remote.result");
  assert.match(r1.id, /^c\d+$/, "sent as a request (with an id)");
  assert.deepEqual(r1.data, { command_id: "k1", ok: true, state: { state: "paused", position: 7 } });
  ws.reply(r1, {});
  assert.deepEqual(seen[0].from, { user_id: "alice", device_id: "phone" });
  assert.equal(seen[0].commandId, "k1");

  ws.push({ type: "remote.command", data: { command_id: "k2", command: "seek", args: { position: 500 }, from: null } });
  await new Promise((r) => setTimeout(r, 20));
  await flush();
  assert.deepEqual(ws.lastRequest("remote.result").data, { command_id: "k2", ok: false, error: "beyond the end" });

  ws.push({ type: "remote.command", data: { command_id: "k3", command: "seek", args: { position: 30 }, from: null } });
  await new Promise((r) => setTimeout(r, 20));
  await flush();
  assert.deepEqual(ws.lastRequest("remote.result").data, { command_id: "k3", ok: true, state: { state: "paused", position: 30 } });

  ws.push({ type: "remote.command", data: { command_id: "k4", command: "play", args: {}, from: null } });
  await flush();
  assert.deepEqual(ws.lastRequest("remote.result").data, { command_id: "k4", ok: true });
  // A late result answered NOT_FOUND is dropped quietly.
  ws.replyError(ws.lastRequest("remote.result"), "NOT_FOUND", "unknown command");
  await flush();

  // The message still reaches `on("remote.command")` listeners.
  const raw = collect(client, "remote.command");
  off();
  ws.push({ type: "remote.command", data: { command_id: "k5", command: "play", args: {}, from: null } });
  await flush();
  assert.equal(raw.length, 1);
  assert.equal(ws.lastRequest("remote.result").data.ok, false);
  assert.equal(seen.length, 4);
  await client.close();
});

test("a command whose connection died is not answered on the next one", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  let release;
  client.onCommand(() => new Promise((r) => (release = r)));
  ws.push({ type: "remote.command", data: { command_id: "k1", command: "pause", args: {}, from: null } });
  await flush();
  ws.fail();
  await clock.advance(3_000);
  const ws2 = await accept(client, clock);
  release({ state: "paused" });
  await flush();
  assert.equal(ws.requests("remote.result").length, 0);
  assert.equal(ws2.requests("remote.result").length, 0);
  await client.close();
});

test("sendCommand resolves with the result, rejects with REJECTED / TIMEOUT codes", async () => {
  const { clock, client } = setup({ device: null });
  const ws = await accept(client, clock);
  assert.equal(ws.requests("device.hello").length, 0, "not a device: no hello");
  const ok = client.sendCommand("tv-1", "seek", { position: 30 });
  await flush();
  const req = ws.lastRequest("remote.command");
  assert.deepEqual(req.data, { device_id: "tv-1", command: "seek", args: { position: 30 } });
  // The hub waits up to timeout_ms (10 s) for the device: the client waits longer.
  await clock.advance(9_000);
  ws.pong(clock);
  ws.reply(req, { command_id: "k1", result: { ok: true, state: { position: 30 } } });
  assert.deepEqual(await ok, { ok: true, state: { position: 30 }, command_id: "k1" });

  const rejected = client.sendCommand("tv-1", "pause", null, { userId: "bob", timeoutMs: 2000 });
  await flush();
  const req2 = ws.lastRequest("remote.command");
  assert.deepEqual(req2.data, { device_id: "tv-1", command: "pause", user_id: "bob", timeout_ms: 2000 });
  ws.replyError(req2, "REJECTED", "nothing is playing");
  await assert.rejects(rejected, (err) => err instanceof RequestError && err.code === ErrorCode.REJECTED && err.message === "nothing is playing");

  const late = client.sendCommand("tv-1", "pause");
  await flush();
  ws.replyError(ws.lastRequest("remote.command"), "TIMEOUT", "the device did not answer", true);
  await assert.rejects(late, (err) => err.code === "TIMEOUT" && err.retryable === true);
  await client.close();
});

test("listDevices and setDevice", async () => {
  const { clock, client } = setup({ device: null });
  const ws = await accept(client, clock);
  const mine = client.listDevices();
  await flush();
  assert.deepEqual(ws.lastRequest("devices.list").data, {});
  ws.reply(ws.lastRequest("devices.list"), { devices: [{ device_id: "a" }] });
  assert.deepEqual(await mine, [{ device_id: "a" }]);
  const all = client.listDevices({ all: true });
  await flush();
  assert.deepEqual(ws.lastRequest("devices.list").data, { all: true });
  ws.replyError(ws.lastRequest("devices.list"), "FORBIDDEN", "admins only");
  await assert.rejects(all, (err) => err.code === "FORBIDDEN");

  // Becoming a device while connected: hello now.
  const set = client.setDevice({ deviceId: "tab-1", name: "Firefox" });
  await flush();
  const hello = ws.lastRequest("device.hello");
  assert.deepEqual(hello.data.capabilities, { remote_control: false, commands: [] });
  ws.reply(hello, { device: deviceObject(hello.data) });
  assert.equal((await set).device_id, "tab-1");
  assert.equal(client.deviceActive, true);
  assert.equal(client.deviceConfig.name, "Firefox");
  await client.close();
});

test("deviceHello, playbackData and nowPlayingPosition", () => {
  const h = deviceHello({ name: "Kitchen" });
  assert.ok(h.device_id.length >= 8);
  assert.equal(h.client, "revenge-ws.js");
  assert.equal(h.capabilities.remote_control, false);
  assert.equal(deviceHello({ deviceId: "x", commands: ["pause"], remoteControl: false }).capabilities.remote_control, false);
  assert.throws(() => deviceHello({ deviceId: "" }), RangeError);
  assert.throws(() => deviceHello({ deviceId: "x".repeat(129) }), RangeError);
  assert.throws(() => deviceHello({ deviceId: "x", name: "" }), RangeError);
  assert.deepEqual(playbackData({ itemId: "i", state: "buffering", position: 0, muted: false, roomId: "r1" }), {
    item_id: "i",
    state: "buffering",
    position: 0,
    muted: false,
    room_id: "r1",
  });
  const np = { item_id: "i", state: "playing", position: 10, rate: 1.5, duration: 20, updated_at: T0 };
  assert.equal(nowPlayingPosition(np, T0 + 2000), 13);
  assert.equal(nowPlayingPosition(np, T0 + 60_000), 20, "capped at the duration");
  assert.equal(nowPlayingPosition({ ...np, state: "paused" }, T0 + 2000), 10);
  assert.equal(nowPlayingPosition(null, T0), 0);
});

function dev(id, over = {}) {
  return {
    device_id: id,
    user_id: "alice",
    name: id.toUpperCase(),
    client: "c",
    version: "1",
    capabilities: { remote_control: true, commands: ["pause"] },
    connected_at: T0,
    updated_at: T0,
    now_playing: null,
    ...over,
  };
}

test("DeviceList follows the user's devices: list, device.updated, device.removed, reconnect", async () => {
  const { clock, client } = setup({ device: null });
  const ws = await accept(client, clock);
  const list = new DeviceList(client);
  const changes = [];
  list.on("change", (l) => changes.push(l.map((d) => d.device_id)));
  const started = list.start();
  await flush();
  // An update that arrives while the list loads, newer than the list's copy, wins.
  ws.push({ type: "device.updated", channel: "user:alice", epoch: "e1", seq: 1, data: { device: dev("b", { updated_at: T0 + 50, name: "B2" }) } });
  ws.push({ type: "device.removed", channel: "user:alice", epoch: "e1", seq: 2, data: { device_id: "c" } });
  ws.reply(ws.lastRequest("devices.list"), { devices: [dev("a"), dev("b"), dev("c")] });
  await started;
  assert.deepEqual(list.list().map((d) => d.device_id), ["a", "b"]);
  assert.equal(list.get("b").name, "B2");
  ws.push({ type: "device.updated", channel: "user:alice", epoch: "e1", seq: 3, data: { device: dev("d", { updated_at: T0 + 90 }) } });
  ws.push({ type: "device.updated", channel: "user:alice", epoch: "e1", seq: 4, data: { device: dev("d", { updated_at: T0 + 10, name: "stale" }) } });
  ws.push({ type: "device.removed", channel: "user:alice", epoch: "e1", seq: 5, data: { device_id: "a" } });
  await flush();
  assert.deepEqual(list.list().map((d) => d.device_id), ["b", "d"]);
  assert.equal(list.get("d").name, "D");
  // After a reconnect the list is loaded again.
  ws.fail();
  await clock.advance(3_000);
  const ws2 = await accept(client, clock, { hello: false });
  ws2.reply(ws2.lastRequest("devices.list"), { devices: [dev("e")] });
  await flush();
  assert.deepEqual(list.list().map((d) => d.device_id), ["e"]);
  assert.deepEqual(changes.at(-1), ["e"]);
  list.stop();
  await client.close();
});

test("DeviceList({all: true}) subscribes sessions and applies sessions.updated", async () => {
  const { clock, client } = setup({ device: null });
  const ws = await accept(client, clock);
  const list = new DeviceList(client, { all: true });
  const started = list.start();
  await flush();
  ws.ackSubscribes({ sessions: { epoch: "s1", seq: 0 } });
  await flush();
  assert.deepEqual(ws.lastRequest("devices.list").data, { all: true });
  ws.reply(ws.lastRequest("devices.list"), { devices: [dev("a"), dev("x", { user_id: "bob" })] });
  await started;
  assert.equal(list.size, 2);
  ws.push({
    type: "sessions.updated",
    channel: "sessions",
    epoch: "s1",
    seq: 1,
    data: { devices: [dev("y", { user_id: "carol", updated_at: T0 + 5 })], removed: [{ user_id: "bob", device_id: "x" }] },
  });
  await flush();
  assert.deepEqual(list.list().map((d) => `${d.user_id}/${d.device_id}`), ["alice/a", "carol/y"]);
  list.stop();
  await client.close();
});
