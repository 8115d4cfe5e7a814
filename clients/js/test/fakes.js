// Test doubles: a virtual clock and a tiny fake WebSocket server side.

/** Runs every pending microtask (and promise chains) before returning. */
export function flush() {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Virtual time: timers fire only inside advance(). `now()` is ms since the Unix epoch. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.seq = 0;
    /** @type {Map<number, {at: number, fn: () => void, seq: number}>} */
    this.timers = new Map();
    this.now = () => this.t;
    this.setTimeout = (fn, ms) => {
      const id = ++this.seq;
      this.timers.set(id, { at: this.t + Math.max(0, ms || 0), fn, seq: id });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  /** Move time forward by `ms`, firing due timers in order (flushing promises in between). */
  async advance(ms) {
    const end = this.t + ms;
    await flush();
    for (;;) {
      let next = null;
      for (const [id, tm] of this.timers) {
        if (tm.at <= end && (next === null || tm.at < next[1].at || (tm.at === next[1].at && tm.seq < next[1].seq))) {
          next = [id, tm];
        }
      }
      if (next === null) break;
      this.timers.delete(next[0]);
      this.t = Math.max(this.t, next[1].at);
      next[1].fn();
      await flush();
    }
    this.t = end;
    await flush();
  }

  /** The delay until the earliest pending timer (ms), or null. */
  nextIn() {
    let min = null;
    for (const tm of this.timers.values()) if (min === null || tm.at < min) min = tm.at;
    return min === null ? null : min - this.t;
  }
}

/**
 * A fake browser WebSocket. Every instance is recorded in `FakeWebSocket.sockets`; tests play
 * the server with `accept(welcome)`, `push(msg)`, `serverClose(code, reason)`, `fail()`.
 */
export class FakeWebSocket {
  static sockets = [];
  static reset() {
    FakeWebSocket.sockets = [];
  }
  static get last() {
    return FakeWebSocket.sockets[FakeWebSocket.sockets.length - 1];
  }

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.protocol = "";
    /** @type {any[]} */
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.sockets.push(this);
  }

  get token() {
    return new URL(this.url).searchParams.get("token");
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
    this.sent.push(JSON.parse(text));
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    this.closedWith = { code, reason };
  }

  // -- the server side

  /** Complete the handshake and send the welcome. */
  accept(welcome = {}) {
    this.readyState = 1;
    this.protocol = "revenge.v1";
    this.onopen?.({});
    this.push({ type: "welcome", data: makeWelcome(welcome) });
  }

  push(msg) {
    this.onmessage?.({ data: typeof msg === "string" ? msg : JSON.stringify(msg) });
  }

  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: true });
  }

  /** The network failed (or the handshake was refused: browsers cannot tell). */
  fail() {
    this.readyState = 3;
    this.onerror?.({});
    this.onclose?.({ code: 1006, reason: "", wasClean: false });
  }

  /** Sent requests of this type. */
  requests(type) {
    return this.sent.filter((m) => m.type === type);
  }

  lastRequest(type) {
    const all = this.requests(type);
    return all[all.length - 1];
  }

  reply(req, data = {}) {
    this.push({ type: "ack", id: req.id, data });
  }

  replyError(req, code, message = code, retryable = false) {
    this.push({ type: "error", id: req.id, data: { code, message, retryable } });
  }

  /** Answer every unanswered ping with a pong whose server clock is `offset` ms ahead. */
  pong(clock, offset = 0) {
    for (const req of this.requests("ping")) {
      if (req.answered) continue;
      req.answered = true;
      // Symmetric paths: the server stamped the ping half-way through the round trip.
      const t = (req.data.t0 + clock.now()) / 2 + offset;
      this.push({ type: "pong", id: req.id, data: { t0: req.data.t0, t1: t, t2: t } });
    }
  }

  /** Ack every unanswered subscribe: recovered when `since` matches history. */
  ackSubscribes(positions = {}, recovered = true) {
    for (const req of this.requests("subscribe")) {
      if (req.answered) continue;
      req.answered = true;
      const subscriptions = req.data.channels.map((item) => {
        const name = typeof item === "string" ? item : item.name;
        const pos = positions[name] ?? { epoch: "e1", seq: 0 };
        const since = typeof item === "string" ? null : item.since;
        const ok = since !== null && recovered && since.epoch === pos.epoch;
        return {
          channel: name,
          epoch: pos.epoch,
          seq: pos.seq,
          recovered: ok,
          missed: ok ? pos.seq - since.seq : 0,
        };
      });
      this.reply(req, { subscriptions, errors: [] });
    }
  }
}

export function makeWelcome(over = {}) {
  return {
    session_id: "s1",
    user_id: "alice",
    node_id: "n1",
    protocol: "revenge.v1",
    server_time: over.server_time ?? 1_700_000_000_000,
    expires_at: 1_700_003_600_000,
    heartbeat: { interval: 30, timeout: 90 },
    subscriptions: [
      { channel: "notifications:alice", epoch: "e1", seq: 0 },
      { channel: "user:alice", epoch: "e1", seq: 0 },
    ],
    ...over,
  };
}

/** A seeded random source (mulberry32) in [0, 1). */
export function seeded(seed = 42) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** An unsigned JWT-shaped token with these claims (the client only reads `exp`). */
export function fakeToken(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
}
