import { test } from "node:test";
import assert from "node:assert/strict";
import {
  ConnectionClosed,
  RequestError,
  RequestTimeout,
  RevengeClient,
  SubscribeError,
  SUBPROTOCOL,
} from "../revenge-ws.js";
import { FakeClock, FakeWebSocket, fakeToken, flush, seeded } from "./fakes.js";

const T0 = 1_700_000_000_000;

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
    ...opts,
  });
  return { clock, client };
}

/** Start (if needed), accept the newest socket, answer its resync and pings. */
async function accept(client, clock, welcome = {}, positions = {}) {
  if (client.state === "idle") client.start();
  await flush();
  const ws = FakeWebSocket.last;
  ws.accept({ server_time: clock.now(), ...welcome });
  await flush();
  ws.ackSubscribes(positions);
  ws.pong(clock);
  await flush();
  return ws;
}

function collect(client, key) {
  const got = [];
  client.on(key, (m) => got.push(m));
  return got;
}

test("connects with the subprotocol and the token, then is connected", async () => {
  const { clock, client } = setup();
  const events = collect(client, "client.connected");
  const ws = await accept(client, clock);
  assert.deepEqual(ws.protocols, [SUBPROTOCOL]);
  assert.equal(ws.token, "tok-1");
  assert.equal(client.state, "connected");
  assert.equal(client.connected, true);
  assert.equal(client.sessionId, "s1");
  assert.equal(events.length, 1);
  assert.deepEqual(client.channels.sort(), ["notifications:alice", "user:alice"]);
  await client.close();
  assert.equal(client.state, "closed");
  assert.equal(ws.closedWith.code, 1000);
});

test("request resolves with the ack data, rejects with .code on error and on timeout", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const ok = client.request("notification.list", { limit: 5 });
  await flush();
  const req = ws.lastRequest("notification.list");
  assert.deepEqual(req.data, { limit: 5 });
  assert.match(req.id, /^c\d+$/);
  ws.reply(req, { items: [], unread_count: 0 });
  assert.deepEqual(await ok, { items: [], unread_count: 0 });

  const bad = client.request("nope");
  await flush();
  ws.replyError(ws.lastRequest("nope"), "UNKNOWN_TYPE", "unknown type 'nope'");
  await assert.rejects(bad, (err) => err instanceof RequestError && err.code === "UNKNOWN_TYPE" && err.type === "nope");

  const slow = client.request("slow", {}, { timeout: 2 });
  const check = assert.rejects(slow, (err) => err instanceof RequestTimeout && err.code === "TIMEOUT");
  await clock.advance(2001);
  await check;
  // A late reply is ignored.
  ws.reply(ws.lastRequest("slow"), {});
  await client.close();
});

test("a request waits for the connection, within its timeout", async () => {
  const { clock, client } = setup();
  client.start();
  const early = client.request("notification.list", {}, { timeout: 3 });
  await flush();
  const ws = FakeWebSocket.last;
  ws.accept({ server_time: clock.now() });
  await flush();
  ws.reply(ws.lastRequest("notification.list"), { items: [1] });
  assert.deepEqual(await early, { items: [1] });
  await client.close();

  const second = setup();
  second.client.start();
  const never = second.client.request("x", {}, { timeout: 1 });
  const check = assert.rejects(never, (err) => err.code === "TIMEOUT");
  await second.clock.advance(1001);
  await check;
  await second.client.close();
});

test("a network loss rejects pending requests, then reconnects with jittered backoff", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const pending = client.request("notification.list");
  const check = assert.rejects(pending, (err) => err instanceof ConnectionClosed && err.code === null);
  const disc = collect(client, "client.disconnected");
  ws.fail();
  await check;
  assert.equal(client.state, "waiting");
  assert.equal(disc[0].data.code, null);
  const delay = disc[0].data.reconnect_in;
  assert.ok(delay >= 0.5 && delay <= 1, `first retry in ${delay}`);
  assert.equal(FakeWebSocket.sockets.length, 1);
  await clock.advance(delay * 1000 + 1);
  assert.equal(FakeWebSocket.sockets.length, 2);
  await accept(client, clock);
  assert.equal(client.state, "connected");
  assert.equal(client.stats.connects, 2);
  await client.close();
});

test("after a reconnect: re-subscribe with since, deliver missed ones once and in order", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const got = [];
  const sub = client.subscribe("library:l1", { handler: (m) => got.push(m.seq) });
  await flush();
  ws.ackSubscribes({ "library:l1": { epoch: "L", seq: 0 } });
  const entries = await sub;
  assert.equal(entries[0].channel, "library:l1");
  const pub = (seq) => ({ type: "library.changed", channel: "library:l1", epoch: "L", seq, data: { n: seq } });
  ws.push(pub(1));
  ws.push(pub(2));
  ws.push(pub(2)); // duplicate
  ws.serverClose(4002, "slow consumer");
  await clock.advance(1001);
  const ws2 = FakeWebSocket.last;
  assert.notEqual(ws2, ws);
  ws2.accept({ server_time: clock.now() });
  await flush();
  const resub = ws2.lastRequest("subscribe");
  assert.deepEqual(resub.data.channels, [{ name: "library:l1", since: { epoch: "L", seq: 2 } }]);
  ws2.push(pub(5)); // live, before the ack: held (the server re-sends it after the ack)
  ws2.ackSubscribes({ "library:l1": { epoch: "L", seq: 5 } });
  for (const s of [3, 4, 5]) ws2.push(pub(s));
  ws2.push(pub(4));
  ws2.push(pub(6));
  await flush();
  assert.deepEqual(got, [1, 2, 3, 4, 5, 6]);
  assert.equal(client.stats.duplicates, 2);
  assert.equal(client.stats.held, 1);
  assert.equal(client.stats.recoveries, 1);
  assert.deepEqual(client.positions()["library:l1"], { epoch: "L", seq: 6 });
  await client.close();
});

test("a gap in a live channel re-subscribes it with since", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const got = [];
  client.on("user:alice", (m) => got.push(m.seq));
  const pub = (seq) => ({ type: "user.data_changed", channel: "user:alice", epoch: "e1", seq, data: {} });
  ws.push(pub(1));
  ws.push(pub(3));
  await flush();
  const req = ws.lastRequest("subscribe");
  assert.deepEqual(req.data.channels, [{ name: "user:alice", since: { epoch: "e1", seq: 1 } }]);
  ws.ackSubscribes({ "user:alice": { epoch: "e1", seq: 3 } });
  ws.push(pub(2));
  ws.push(pub(3));
  assert.deepEqual(got, [1, 2, 3]);
  await client.close();
});

test("recovered: false and subscription.reset tell the application to reload", async () => {
  const reloads = [];
  const { clock, client } = setup({ onRecoveryFailed: (ch) => reloads.push(ch) });
  const ws = await accept(client, clock);
  const failed = collect(client, "client.recovery_failed");
  ws.push({ type: "user.data_changed", channel: "user:alice", epoch: "e1", seq: 1, data: {} });
  ws.serverClose(1012, "restart");
  await clock.advance(5000);
  const ws2 = FakeWebSocket.last;
  ws2.accept({ server_time: clock.now(), subscriptions: [{ channel: "user:alice", epoch: "e9", seq: 0 }, { channel: "notifications:alice", epoch: "e1", seq: 0 }] });
  await flush();
  ws2.ackSubscribes({ "user:alice": { epoch: "e9", seq: 0 } });
  assert.deepEqual(reloads, ["user:alice"]);
  ws2.push({ type: "subscription.reset", data: { channel: "notifications:alice", epoch: "e1", seq: 7, reason: "gap" } });
  assert.deepEqual(reloads, ["user:alice", "notifications:alice"]);
  assert.equal(failed.length, 2);
  assert.equal(failed[1].data.channel, "notifications:alice");
  assert.deepEqual(client.positions()["notifications:alice"], { epoch: "e1", seq: 7 });
  await client.close();
});

test("terminal close codes never reconnect", async () => {
  for (const code of [1008, 1009, 4501, 4503, 4599]) {
    const { clock, client } = setup();
    const ws = await accept(client, clock);
    ws.serverClose(code, "bye");
    const err = await client.waitClosed();
    assert.ok(err instanceof ConnectionClosed);
    assert.equal(err.code, code);
    await clock.advance(120_000);
    assert.equal(FakeWebSocket.sockets.length, 1, `code ${code} must not reconnect`);
    assert.equal(client.state, "closed");
    await assert.rejects(client.request("x"), (e) => e instanceof ConnectionClosed && e.code === code);
  }
});

test("reconnect-class codes: 4004 waits at least 5 s, 1012 is spread over the window", async () => {
  {
    const { clock, client } = setup();
    const ws = await accept(client, clock);
    ws.serverClose(4004, "rate limited");
    await clock.advance(4999);
    assert.equal(FakeWebSocket.sockets.length, 1);
    await clock.advance(1100);
    assert.equal(FakeWebSocket.sockets.length, 2);
    await client.close();
  }
  const delays = [];
  for (let seed = 0; seed < 40; seed++) {
    const { clock, client } = setup({ random: seeded(seed) });
    const ws = await accept(client, clock);
    const disc = collect(client, "client.disconnected");
    ws.serverClose(1012, "service restart");
    await flush();
    delays.push(disc[0].data.reconnect_in);
    await clock.advance(5000);
    assert.equal(FakeWebSocket.sockets.length, 2);
    await client.close();
  }
  assert.ok(delays.every((d) => d >= 0 && d < 5));
  assert.ok(Math.min(...delays) < 1 && Math.max(...delays) > 4, "spread over 5 s");
  {
    const { clock, client } = setup();
    const ws = await accept(client, clock);
    const disc = collect(client, "client.disconnected");
    ws.serverClose(1001, "going away; window=1");
    await flush();
    assert.ok(disc[0].data.reconnect_in < 1);
    await client.close();
  }
});

test("backoff grows while attempts fail and resets after a stable connection", async () => {
  const { clock, client } = setup({ random: () => 0.999 });
  const ws = await accept(client, clock);
  const disc = collect(client, "client.disconnected");
  await clock.advance(6000); // stable
  ws.fail();
  await flush();
  for (let i = 0; i < 6; i++) {
    await clock.advance(disc[disc.length - 1].data.reconnect_in * 1000 + 1);
    FakeWebSocket.last.fail();
    await flush();
  }
  const seen = disc.map((d) => Math.round(d.data.reconnect_in * 100) / 100);
  assert.deepEqual(seen, [1, 1.5, 2.5, 4.5, 8.49, 16.48, 20]);
  await clock.advance(20_001);
  await accept(client, clock);
  await clock.advance(6000);
  FakeWebSocket.last.fail();
  await flush();
  assert.equal(Math.round(disc[disc.length - 1].data.reconnect_in * 100) / 100, 1, "reset");
  await client.close();
});

test("pings measure the clock: min-delay offset, serverTime()", async () => {
  const { clock, client } = setup();
  client.start();
  await flush();
  const ws = FakeWebSocket.last;
  ws.accept({ server_time: clock.now() + 900 });
  await flush();
  assert.equal(client.clockOffset, 900, "the welcome gives a first estimate");
  assert.equal(ws.requests("ping").length, 1, "first ping at once");
  await clock.advance(40);
  ws.pong(clock, 1020); // 40 ms round trip
  await clock.advance(999);
  assert.equal(ws.requests("ping").length, 1, "the next one a second after the pong");
  await clock.advance(2);
  assert.equal(ws.requests("ping").length, 2);
  await clock.advance(4);
  ws.pong(clock, 1002); // 5 ms round trip: the best
  await clock.advance(1001);
  assert.equal(ws.requests("ping").length, 3);
  await clock.advance(100);
  ws.pong(clock, 1050);
  assert.equal(client.clockOffset, 1002);
  assert.equal(client.serverTime(), clock.now() + 1002);
  assert.equal(client.rtt, 5, "rtt is the min-delay sample's, the one the offset comes from");
  assert.equal(client.rttLatest, 101, "rttLatest is the latest exchange's");
  // Then every heartbeat.interval.
  await clock.advance(29_000);
  assert.equal(ws.requests("ping").length, 3);
  await clock.advance(2000);
  assert.equal(ws.requests("ping").length, 4);
  await client.close();
});

test("rtt is the min-delay of the last clockSamples pings; rttLatest the latest", async () => {
  const { clock, client } = setup();
  client.start();
  await flush();
  const ws = FakeWebSocket.last;
  ws.accept({ server_time: clock.now(), heartbeat: { interval: 1, timeout: 90 } });
  await flush();
  assert.equal(client.rtt, null, "nothing before the first pong");
  assert.equal(client.rttLatest, null);
  assert.equal(client.options.clockSamples, 8);
  // Round trips 20, 20, 300 (one queued ping), then 30 × 7: the spike never moves rtt.
  const delays = [20, 20, 300, 30, 30, 30, 30, 30, 30, 30];
  const seen = [];
  for (const [i, d] of delays.entries()) {
    assert.equal(ws.requests("ping").length, i + 1);
    await clock.advance(d);
    ws.pong(clock, 0);
    seen.push([client.rtt, client.rttLatest]);
    await clock.advance(1000); // the next ping, a heartbeat.interval after the pong
  }
  assert.deepEqual(seen.slice(0, 4), [[20, 20], [20, 20], [20, 300], [20, 30]]);
  // The 20 ms samples roll out after 8 more: then rtt follows the path's new RTT.
  assert.deepEqual(seen[8], [20, 30], "the second 20 ms sample is still among the last 8");
  assert.deepEqual(seen[9], [30, 30], "both 20 ms samples rolled out");
  assert.equal(client.clock.samples.length, 8);
  await client.close();
});

test("the watchdog reconnects when nothing arrives for heartbeat.timeout", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock, { heartbeat: { interval: 10, timeout: 30 } });
  await clock.advance(29_000);
  assert.equal(client.state, "connected");
  await clock.advance(1_100);
  assert.equal(client.stats.watchdogFired, 1);
  assert.notEqual(ws.closedWith, null);
  assert.equal(client.state, "waiting");
  await client.close();
});

test("the token is refreshed before it expires", async () => {
  let n = 0;
  const provider = async () => `tok-${++n}`;
  const { clock, client } = setup({ token: null, tokenProvider: provider });
  client.start();
  await flush();
  const ws = FakeWebSocket.last;
  assert.equal(ws.token, "tok-1");
  ws.accept({ server_time: clock.now(), expires_at: clock.now() + 120_000 });
  ws.pong(clock);
  await flush();
  await clock.advance(59_000);
  assert.equal(ws.requests("auth.refresh").length, 0);
  await clock.advance(1_100);
  const req = ws.lastRequest("auth.refresh");
  assert.deepEqual(req.data, { token: "tok-2" });
  ws.reply(req, { expires_at: clock.now() + 3_600_000 });
  await flush();
  assert.equal(client.token, "tok-2");
  assert.equal(client.stats.tokenRefreshes, 1);
  await client.close();
});

test("4001 asks the provider for a fresh token before reconnecting", async () => {
  let n = 0;
  const { clock, client } = setup({ token: null, tokenProvider: async () => `tok-${++n}` });
  const ws = await accept(client, clock);
  assert.equal(ws.token, "tok-1");
  ws.serverClose(4001, "token expired");
  await clock.advance(1001);
  assert.equal(FakeWebSocket.last.token, "tok-2");
  await client.close();
});

test("a locally expired token is replaced before connecting", async () => {
  const expired = fakeToken({ sub: "alice", exp: Math.floor(T0 / 1000) - 10 });
  const { client } = setup({ token: expired, tokenProvider: async () => "fresh" });
  client.start();
  await flush();
  assert.equal(FakeWebSocket.last.token, "fresh");
  await client.close();
});

test("a refused handshake is probed over HTTP: 401 refreshes the token, then gives up", async () => {
  const statuses = [];
  const fetch = async (url) => {
    statuses.push(url);
    return { status: 401, headers: new Map(), json: async () => ({ error: { code: "UNAUTHORIZED", message: "expired" } }) };
  };
  let n = 0;
  const { clock, client } = setup({ fetch, tokenProvider: async () => `tok-${++n}`, token: "old" });
  client.start();
  await flush();
  FakeWebSocket.last.fail();
  await flush();
  assert.match(statuses[0], /^http:\/\/hub\.test\/api\/v1\/ws\?token=old$/);
  await clock.advance(1001);
  assert.equal(FakeWebSocket.last.token, "tok-1");
  FakeWebSocket.last.fail();
  await flush();
  await clock.advance(2001);
  FakeWebSocket.last.fail();
  const err = await client.waitClosed();
  assert.equal(err.code, 4501);
  assert.match(err.reason, /HTTP 401/);
});

test("a probe that finds 403 is terminal; 503 with Retry-After waits", async () => {
  {
    const fetch = async () => ({ status: 403, headers: new Map(), json: async () => ({}) });
    const { client } = setup({ fetch });
    client.start();
    await flush();
    FakeWebSocket.last.fail();
    const err = await client.waitClosed();
    assert.equal(err.code, 1008);
  }
  {
    const fetch = async () => ({ status: 503, headers: new Map([["Retry-After", "7"]]), json: async () => ({}) });
    const { clock, client } = setup({ fetch });
    const disc = collect(client, "client.disconnected");
    client.start();
    await flush();
    FakeWebSocket.last.fail();
    await flush();
    await flush();
    assert.ok(disc[0].data.reconnect_in >= 7);
    assert.equal(disc[0].data.http_status, 503);
    await clock.advance(6900);
    assert.equal(FakeWebSocket.sockets.length, 1);
    await client.close();
  }
});

test("a 503 probe reads Reconnect-Window, or the body's window when the headers are hidden", async () => {
  const cases = [
    [new Map([["Retry-After", "2"], ["Reconnect-Window", "30"]]), {}],
    // A cross-origin page may not read the headers: the body carries both numbers.
    [new Map(), { error: { code: "UNAVAILABLE", message: "busy", retry_after: 2, window: 30 } }],
  ];
  for (const [headers, body] of cases) {
    const delays = [];
    for (let seed = 0; seed < 40; seed++) {
      const fetch = async () => ({ status: 503, headers, json: async () => body });
      const { client } = setup({ fetch, random: seeded(seed) });
      const disc = collect(client, "client.disconnected");
      client.start();
      await flush();
      FakeWebSocket.last.fail();
      await flush();
      await flush();
      assert.equal(disc[0].data.http_status, 503);
      delays.push(disc[0].data.reconnect_in);
      await client.close();
    }
    assert.ok(delays.every((d) => d >= 2 && d <= 32), JSON.stringify(delays));
    assert.ok(Math.max(...delays) > 20, "spread over the advised 30 s, not the 5 s default");
  }
});

test("4002 and 4003 closes that advise a window spread the first attempt over it", async () => {
  for (const [code, reason] of [
    [4002, "slow consumer; window=30"],
    [4003, "heartbeat timeout; window=30"],
  ]) {
    const delays = [];
    for (let seed = 0; seed < 40; seed++) {
      const { clock, client } = setup({ random: seeded(seed) });
      const ws = await accept(client, clock);
      const disc = collect(client, "client.disconnected");
      ws.serverClose(code, reason);
      await flush();
      delays.push(disc[0].data.reconnect_in);
      await client.close();
    }
    assert.ok(delays.every((d) => d >= 0 && d < 30));
    assert.ok(Math.min(...delays) < 0.5 && Math.max(...delays) > 20, `${code}: ${delays}`);
  }
});

test("notifications are de-duplicated by id across redeliveries", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const got = [];
  client.on("notification", (m) => got.push(m.data.id));
  const pub = (id, seq) => ({ type: "notification", channel: "notifications:alice", epoch: "e1", seq, data: { id, title: id } });
  ws.push(pub("n1", 1));
  ws.fail();
  await clock.advance(1001);
  const ws2 = FakeWebSocket.last;
  ws2.accept({ server_time: clock.now() });
  // After a reconnect the hub redelivers every unacked notification directly...
  ws2.push({ type: "notification", channel: "notifications:alice", data: { id: "n1" } });
  ws2.push({ type: "notification", channel: "notifications:alice", data: { id: "n2" } });
  await flush();
  // ...and the recovery replays the publications missed meanwhile.
  ws2.ackSubscribes({ "notifications:alice": { epoch: "e1", seq: 2 } });
  ws2.push(pub("n2", 2));
  await flush();
  assert.deepEqual(got, ["n1", "n2"]);
  const ack = client.ackNotifications(["n1", "n2"]);
  await flush();
  assert.deepEqual(ws2.lastRequest("notification.ack").data, { ids: ["n1", "n2"] });
  ws2.reply(ws2.lastRequest("notification.ack"), { ids: ["n1", "n2"] });
  await ack;
  await client.close();
});

test("subscription.added records the position; the latest value follows; ended forgets", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const got = [];
  client.on("*", (m) => got.push(`${m.type}:${m.seq ?? ""}`));
  ws.push({ type: "subscription.added", data: { channel: "transcode:j1", epoch: "T", seq: 4, recovered: false, missed: 1 } });
  ws.push({ type: "transcode.progress", channel: "transcode:j1", epoch: "T", seq: 4, data: { percent: 10 } });
  ws.push({ type: "transcode.progress", channel: "transcode:j1", epoch: "T", seq: 6, data: { percent: 30 } });
  assert.deepEqual(got, ["subscription.added:", "transcode.progress:4", "transcode.progress:6"]);
  assert.ok(client.channels.includes("transcode:j1"));
  ws.push({ type: "subscription.ended", data: { channel: "transcode:j1", reason: "ended" } });
  assert.ok(!client.channels.includes("transcode:j1"));
  ws.fail();
  await clock.advance(1001);
  const ws2 = FakeWebSocket.last;
  ws2.accept({ server_time: clock.now() });
  await flush();
  assert.equal(ws2.requests("subscribe").length, 0, "an ended channel is not re-subscribed");
  await client.close();
});

test("subscribe: refused channels reject with SubscribeError, the others stay", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  const p = client.subscribe(["activity", "server"]);
  await flush();
  const req = ws.lastRequest("subscribe");
  ws.reply(req, {
    subscriptions: [{ channel: "activity", epoch: "A", seq: 0, recovered: false, missed: 0 }],
    errors: [{ channel: "server", code: "FORBIDDEN", message: "admins only" }],
  });
  await assert.rejects(p, (err) => err instanceof SubscribeError && err.code === "FORBIDDEN" && err.subscriptions.length === 1);
  assert.ok(client.channels.includes("activity"));
  assert.ok(!client.channels.includes("server"));
  const un = client.unsubscribe("activity");
  await flush();
  ws.reply(ws.lastRequest("unsubscribe"), { channels: ["activity"] });
  await un;
  assert.ok(!client.channels.includes("activity"));
  await client.close();
});

test("close() while waiting to reconnect stops at once", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  ws.fail();
  await flush();
  assert.equal(client.state, "waiting");
  await client.close();
  assert.equal(client.state, "closed");
  await clock.advance(60_000);
  assert.equal(FakeWebSocket.sockets.length, 1);
  assert.equal(await client.waitClosed(), null);
});

test("dropConnection() behaves like a network loss", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  client.dropConnection("test");
  await flush();
  assert.equal(client.state, "waiting");
  assert.equal(ws.closedWith.code, 1000);
  await clock.advance(1001);
  assert.equal(FakeWebSocket.sockets.length, 2);
  await client.close();
});

test("frames that are not JSON objects are counted and ignored", async () => {
  const { clock, client } = setup();
  const ws = await accept(client, clock);
  ws.push("not json");
  ws.push("[1,2]");
  ws.push({ no: "type" });
  assert.equal(client.stats.invalidFrames, 3);
  assert.equal(client.state, "connected");
  await client.close();
});

test("a first frame other than welcome fails the attempt", async () => {
  const { clock, client } = setup();
  client.start();
  await flush();
  const ws = FakeWebSocket.last;
  ws.readyState = 1;
  ws.push({ type: "ack" });
  await flush();
  assert.equal(client.state, "waiting");
  await clock.advance(1001);
  assert.equal(FakeWebSocket.sockets.length, 2);
  await client.close();
});

test("relative URLs resolve against the page", async () => {
  globalThis.location = { href: "https://media.example/demo" };
  try {
    const { client } = setup({});
    const c2 = new RevengeClient("/api/v1/ws", { WebSocket: FakeWebSocket, token: "t", watchNetwork: false, fetch: null, timers: new FakeClock() });
    c2.start();
    await flush();
    assert.equal(FakeWebSocket.last.url, "wss://media.example/api/v1/ws?token=t");
    await c2.close();
    await client.close();
  } finally {
    delete globalThis.location;
  }
});
