// The client against a real hub. tests/test_js_client.py starts one and sets:
//   REVENGE_TEST_HUB (http://127.0.0.1:PORT), REVENGE_TEST_SECRET (HS256), REVENGE_TEST_API_KEY
// Without them (or without a global WebSocket: Node 20 needs --experimental-websocket)
// these tests skip.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { ConnectionClosed, DeviceList, RequestError, RevengeClient, SyncController } from "../revenge-ws.js";

const HUB = process.env.REVENGE_TEST_HUB;
const SECRET = process.env.REVENGE_TEST_SECRET;
const API_KEY = process.env.REVENGE_TEST_API_KEY;
const skip = !HUB || !SECRET || !API_KEY ? "no hub (run through tests/test_js_client.py)" : typeof WebSocket !== "function" ? "no global WebSocket" : false;

function token(sub, claims = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, iat: now, exp: now + 3600, role: "user", ...claims })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

async function backend(path, body) {
  const r = await fetch(`${HUB}${path}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const json = await r.json();
  assert.ok(r.ok, `${path}: ${r.status} ${JSON.stringify(json)}`);
  return json;
}

function client(sub, opts = {}) {
  return new RevengeClient(`${HUB.replace(/^http/, "ws")}/api/v1/ws`, {
    token: token(sub),
    backoffMin: 0.05,
    backoffMax: 0.2,
    restartWindow: 0.2,
    logger: {},
    ...opts,
  });
}

/** Resolves when `pred()` is true (polling), rejects after `ms`. */
async function until(pred, ms = 5000, what = "condition") {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

let n = 0;
const uid = (p) => `${p}${process.pid}x${++n}`;

test("connect, subscribe, receive in order across a server-side disconnect", { skip }, async () => {
  const user = uid("u");
  const c = client(user);
  const welcome = await c.connect(5);
  assert.equal(welcome.user_id, user);
  assert.equal(welcome.protocol, "revenge.v1");
  const got = [];
  const channel = `library:${uid("l")}`;
  const [entry] = await c.subscribe(channel, { handler: (m) => got.push(m.data.n) });
  assert.equal(entry.channel, channel);
  for (const i of [1, 2]) await backend("/api/v1/realtime/publish", { channel, type: "library.changed", data: { n: i } });
  await until(() => got.length === 2, 5000, "two publications");
  // Kicked as a slow consumer: reconnects, re-subscribes with since, misses nothing.
  await backend("/api/v1/realtime/disconnect", { user_id: user, code: 4002, reason: "test" });
  for (const i of [3, 4, 5]) await backend("/api/v1/realtime/publish", { channel, type: "library.changed", data: { n: i } });
  await until(() => got.length >= 5, 8000, "five publications");
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(got, [1, 2, 3, 4, 5]);
  assert.ok(c.stats.connects >= 2, "reconnected");
  assert.equal(c.lastClose.code, 4002);
  await c.close();
});

test("errors carry the contract's code; terminal codes end the client", { skip }, async () => {
  const user = uid("u");
  const c = client(user);
  await c.connect(5);
  await assert.rejects(c.request("no.such.type"), (e) => e instanceof RequestError && e.code === "UNKNOWN_TYPE");
  await assert.rejects(c.subscribe("server"), (e) => e.code === "FORBIDDEN");
  const sample = await c.ping();
  assert.ok(sample.delay >= 0 && sample.delay < 1000);
  assert.ok(Math.abs(c.clockOffset) < 100, `offset ${c.clockOffset} ms on one machine`);
  await backend("/api/v1/realtime/disconnect", { user_id: user, code: 4503, reason: "bye" });
  const err = await c.waitClosed();
  assert.ok(err instanceof ConnectionClosed);
  assert.equal(err.code, 4503);
  assert.equal(c.stats.attempts, 1);
});

test("a refused handshake is recognised (HTTP 401 probe) and not retried forever", { skip }, async () => {
  const c = new RevengeClient(`${HUB.replace(/^http/, "ws")}/api/v1/ws`, { token: "not-a-jwt", logger: {} });
  c.start();
  const err = await c.waitClosed();
  assert.equal(err.code, 4501);
  assert.match(err.reason, /401/);
});

test("notifications: redelivered after a reconnect until acked, shown once", { skip }, async () => {
  const user = uid("n");
  const c = client(user);
  const seen = [];
  c.on("notification", (m) => seen.push(m.data.id));
  await c.connect(5);
  const { ids } = await backend("/api/v1/realtime/notify", { user_id: user, notification_type: "t", title: "one" });
  await until(() => seen.length === 1, 5000, "the notification");
  c.dropConnection("test");
  await until(() => c.stats.connects >= 2, 5000, "the reconnect");
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(seen, ids, "the redelivery was de-duplicated");
  assert.ok(c.stats.duplicates >= 1);
  await c.ackNotifications(ids);
  const c2 = client(user);
  const again = [];
  c2.on("notification", (m) => again.push(m.data.id));
  await c2.connect(5);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(again, [], "acknowledged: not re-sent");
  await c.close();
  await c2.close();
});

test("transcode progress: the server subscribes the owner, the latest value follows", { skip }, async () => {
  const user = uid("t");
  const job = uid("job");
  const c = client(user);
  const got = [];
  c.on("transcode.progress", (m) => got.push(m.data.progress));
  const added = [];
  c.on("subscription.added", (m) => added.push(m.data.channel));
  await c.connect(5);
  await backend(`/api/v1/realtime/transcode/${job}`, { user_id: user, type: "transcode.progress", data: { progress: 10 } });
  await until(() => got.length === 1, 5000, "the first progress");
  await backend(`/api/v1/realtime/transcode/${job}`, { user_id: user, type: "transcode.progress", data: { progress: 55.5 } });
  await until(() => got.length === 2, 5000, "the second progress");
  assert.deepEqual(got, [10, 55.5]);
  assert.deepEqual(added, [`transcode:${job}`]);
  assert.ok(c.channels.includes(`transcode:${job}`));
  await c.close();
});

test("syncplay over the hub: create, join, a scheduled play reaches both players", { skip }, async () => {
  const a = client(uid("a"));
  const b = client(uid("b"));
  await Promise.all([a.connect(5), b.connect(5)]);
  let created;
  try {
    created = await a.request("syncplay.create", { name: "JS test", content: { type: "movie", id: "m1" }, public: true });
  } catch (err) {
    if (err.code === "UNKNOWN_TYPE") return; // SyncPlay not wired on this hub
    throw err;
  }
  const roomId = created.room.room_id;
  const joined = await b.request("syncplay.join", { room_id: roomId });
  assert.equal(joined.room.room_id, roomId);
  const commands = { a: [], b: [] };
  a.on("syncplay.command", (m) => commands.a.push(m.data));
  b.on("syncplay.command", (m) => commands.b.push(m.data));
  for (const c of [a, b]) await c.request("syncplay.ready", { room_id: roomId, position: 0 });
  const ack = await a.request("syncplay.play", { room_id: roomId });
  assert.equal(ack.state.state, "playing");
  await until(() => commands.a.length === 1 && commands.b.length === 1, 5000, "the play command");
  const cmd = commands.b[0];
  assert.equal(cmd.command, "play");
  assert.ok(cmd.when > b.serverTime() - 100, "scheduled in the future (lead)");
  // A player following the command starts at `when`.
  const player = { pos: 0, playing: false, rate: 1, position() { return this.pos; }, isPlaying() { return this.playing; }, setRate(r) { this.rate = r; }, seek(p) { this.pos = p; }, play() { this.playing = true; }, pause() { this.playing = false; } };
  const ctl = new SyncController(player, () => b.serverTime());
  ctl.onCommand(cmd);
  assert.equal(player.playing, false);
  await until(() => b.serverTime() >= cmd.when, 6000, "when");
  ctl.tick();
  assert.equal(player.playing, true);
  await a.close();
  await b.close();
});

test("devices: hello, playback.update, remote control between two connections, takeover", { skip }, async () => {
  const user = uid("d");
  const tv = client(user, { device: { deviceId: "tv", name: "TV", client: "js-test", version: "1", commands: ["pause", "seek"] } });
  const phone = client(user, { device: { deviceId: "phone", name: "Phone", client: "js-test", version: "1" } });
  await Promise.all([tv.connect(5), phone.connect(5)]);
  assert.equal(tv.deviceActive, true);
  assert.equal(tv.device.device_id, "tv");
  assert.equal(tv.device.user_id, user);
  const paused = [];
  tv.onCommand(({ command, args, from }) => {
    if (command === "seek" && args.position > 100) throw new Error("beyond the end");
    paused.push({ command, from });
    return { state: "paused", position: 42 };
  });
  assert.equal(await tv.reportPlayback({ itemId: "m1", title: "Arrival", state: "playing", position: 40, duration: 120 }), true);

  // The phone lists both devices and follows the tv's updates.
  const list = new DeviceList(phone);
  await list.start();
  assert.deepEqual(list.list().map((d) => d.device_id).sort(), ["phone", "tv"]);
  await until(() => list.get("tv")?.now_playing?.item_id === "m1", 5000, "the tv's now playing");

  const res = await phone.sendCommand("tv", "pause");
  assert.equal(res.ok, true);
  assert.deepEqual(res.state, { state: "paused", position: 42 });
  assert.equal(typeof res.command_id, "string");
  assert.deepEqual(paused, [{ command: "pause", from: { user_id: user, device_id: "phone" } }]);
  await assert.rejects(phone.sendCommand("tv", "seek", { position: 500 }), (e) => e.code === "REJECTED" && /beyond the end/.test(e.message));
  await assert.rejects(phone.sendCommand("tv", "mute"), (e) => e.code === "REJECTED"); // not in its commands
  await assert.rejects(phone.sendCommand("nope", "pause"), (e) => e.code === "NOT_FOUND");
  const other = client(uid("o"));
  await other.connect(5);
  await assert.rejects(other.sendCommand("tv", "pause", null, { userId: user }), (e) => e.code === "FORBIDDEN" || e.code === "NOT_FOUND");

  // Another connection takes the tv over: the first gets device.ended and does not say hello again.
  const ended = [];
  tv.on("client.device", (ev) => ended.push(ev.data));
  const tv2 = client(user, { device: tv.deviceConfig && { deviceId: "tv", name: "TV 2", client: "js-test", version: "1" } });
  await tv2.connect(5);
  await until(() => ended.some((e) => e.active === false), 5000, "device.ended");
  assert.equal(ended.find((e) => !e.active).reason, "replaced");
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(tv.deviceActive, false);
  assert.equal(tv2.deviceActive, true);
  await until(() => list.get("tv")?.name === "TV 2", 5000, "the takeover in the list");
  for (const c of [tv, tv2, phone, other]) await c.close();
  list.stop();
});
