// @ts-check
/**
 * The JavaScript client of the revenge.v1 hub (browsers and Node 20+), without dependencies.
 *
 *     import { RevengeClient } from "/client/revenge-ws.js";
 *     const client = new RevengeClient("/api/v1/ws", { token });
 *     client.on("notification", (msg) => console.log(msg.data.title));
 *     await client.subscribe("activity");
 *
 * It behaves like the Python client (revenge_ws.client), with the same numbers:
 *
 * - reconnects after a network loss and after reconnect-class close codes with full-jitter
 *   exponential backoff (0.5 s -> 20 s); after 1001/1012, and after any close whose reason
 *   advises a window (4002, 4003: "slow consumer; window=5"), the first attempt is spread
 *   over that window (5 s by default for 1001/1012); 4004 and 429 wait 5 s (or a longer
 *   Retry-After) plus a uniform spread over the advised window, else 5 s; a 503 waits
 *   Retry-After plus a spread over Reconnect-Window; terminal codes (1008, 1009, 4501,
 *   4503, 4500-4999) never reconnect;
 * - re-subscribes every channel with `since` after a reconnect and drops duplicates by
 *   (channel, seq), notifications by `data.id`; `recovered: false` and `subscription.reset`
 *   emit `client.recovery_failed` (reload that state over REST);
 * - pings (three quick pings at connect, then every heartbeat.interval), estimates the server
 *   clock NTP-style (min-delay sample of the last 8) and reconnects when nothing arrives for
 *   heartbeat.timeout (watchdog);
 * - refreshes the token with `auth.refresh` before it expires when given a token provider.
 *
 * Presence: `OnlineUsers` keeps who is online from `activity.presence` messages.
 *
 * Devices (§13): with the option `device` (or `setDevice()`) the client says `device.hello`
 * after every (re)connect; `reportPlayback()` sends `playback.update` (repeated while
 * playing), `onCommand()` answers `remote.command`, `sendCommand()` controls another device,
 * `listDevices()` and `DeviceList` list them.
 *
 * SyncPlay: `SyncController` (pure drift-correction logic, mirrors revenge_ws.client.syncplay)
 * and `SyncPlay` (a room session driving an HTMLMediaElement).
 *
 * Canonical copy: clients/js/revenge-ws.js. The hub serves an identical copy from
 * src/revenge_ws/static/revenge-ws.js at /client/revenge-ws.js (`npm run sync` copies it; a
 * test checks that both are identical).
 */

export const VERSION = "0.1.0";
export const SUBPROTOCOL = "revenge.v1";

/** WebSocket close codes of the contract (§4). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  TOKEN_EXPIRED: 4001,
  SLOW_CONSUMER: 4002,
  HEARTBEAT_TIMEOUT: 4003,
  RATE_LIMITED: 4004,
  UNAUTHORIZED: 4501,
  DISCONNECTED: 4503,
});

/**
 * `code` of an `error` reply (§2). `TIMEOUT` is also the client's own (no reply in time);
 * `REJECTED` and `TIMEOUT` answer a `remote.command` the device refused or did not answer (§13).
 */
export const ErrorCode = Object.freeze({
  INVALID_JSON: "INVALID_JSON",
  INVALID_MESSAGE: "INVALID_MESSAGE",
  UNKNOWN_TYPE: "UNKNOWN_TYPE",
  UNAUTHORIZED: "UNAUTHORIZED",
  FORBIDDEN: "FORBIDDEN",
  NOT_FOUND: "NOT_FOUND",
  CONFLICT: "CONFLICT",
  RATE_LIMITED: "RATE_LIMITED",
  TOO_LARGE: "TOO_LARGE",
  TOKEN_EXPIRED: "TOKEN_EXPIRED",
  UNAVAILABLE: "UNAVAILABLE",
  INTERNAL: "INTERNAL",
  TIMEOUT: "TIMEOUT",
  REJECTED: "REJECTED",
});

const RECONNECT_CODES = new Set([1001, 1006, 1011, 1012, 1013, 1014]);
const TERMINAL_CODES = new Set([1000, 1002, 1003, 1007, 1008, 1009, 1010]);

/**
 * Whether a client should reconnect after this close code (contract §4): 1001/1012 and
 * 4000-4499 reconnect; 1008, 1009 and 4500-4999 do not; no code (network loss) reconnects.
 * @param {number | null | undefined} code
 */
export function shouldReconnect(code) {
  if (code == null || RECONNECT_CODES.has(code)) return true;
  if (TERMINAL_CODES.has(code)) return false;
  if (code >= 4000 && code <= 4499) return true;
  if (code >= 4500 && code <= 4999) return false;
  return code < 4000;
}

// ------------------------------------------------------------------------------ errors

/** Base class: every error of this module has a `code`. */
export class RevengeError extends Error {
  /** @param {string} message @param {string | number | null} code */
  constructor(message, code) {
    super(message);
    this.name = new.target.name;
    /** @type {any} */
    this.code = code;
  }
}

/** The server answered a request with an `error`: `code` is one of {@link ErrorCode}. */
export class RequestError extends RevengeError {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{retryable?: boolean, requestId?: string | null, type?: string | null}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message, code);
    this.retryable = Boolean(extra.retryable);
    this.requestId = extra.requestId ?? null;
    this.type = extra.type ?? null;
  }
}

/** Some channels of a `subscribe` were refused; the others stay subscribed. */
export class SubscribeError extends RequestError {
  /** @param {any[]} errors @param {any[]} subscriptions */
  constructor(errors, subscriptions) {
    const names = errors.map((e) => `${e.channel} (${e.code})`).join(", ");
    super(String(errors[0]?.code ?? "INTERNAL"), `subscription refused: ${names}`);
    this.errors = errors;
    this.subscriptions = subscriptions;
  }
}

/** No reply in time (or not connected in time): `code` is `"TIMEOUT"`. */
export class RequestTimeout extends RevengeError {
  /** @param {string} message */
  constructor(message) {
    super(message, ErrorCode.TIMEOUT);
  }
}

/** The connection ended (for good, or before a reply came): `code` is the close code or null. */
export class ConnectionClosed extends RevengeError {
  /** @param {number | null} code @param {string} [reason] */
  constructor(code, reason = "") {
    super(code == null ? `connection closed: ${reason}` : `connection closed (${code}): ${reason}`, code);
    /** @type {number | null} */
    this.code = code;
    this.reason = reason;
  }
}

// ------------------------------------------------------------------------------ backoff

/** The reconnect timing knobs (seconds), as in the Python client's ReconnectPolicy. */
export const DEFAULT_POLICY = Object.freeze({
  backoffMin: 0.5,
  backoffMax: 20.0,
  restartWindow: 5.0,
  rateLimitWait: 5.0,
  maxWindow: 300.0,
  rateLimitSpread: 5.0,
});

/**
 * Full-jitter exponential backoff for the attempt-th retry (0-based), in seconds:
 * `min + U(0, min(max, min * 2^attempt))`, never above `max`.
 * @param {number} attempt
 * @param {() => number} [rng]
 */
export function backoffDelay(attempt, rng = Math.random, minimum = 0.5, maximum = 20.0) {
  const step = Math.min(Math.max(Math.floor(attempt) || 0, 0), 31);
  const spread = Math.min(maximum, minimum * 2 ** step);
  return Math.min(maximum, minimum + rng() * spread);
}

/** First attempt after a server restart: uniform over [0, window) seconds. */
export function restartDelay(window, rng = Math.random) {
  if (!(window > 0) || !Number.isFinite(window)) return 0;
  return rng() * window;
}

const WINDOW_RE =
  /(?:^|[\s;,(])(?:restart_|reconnect_)?window\s*[=:]\s*(\d+(?:\.\d+)?)\s*(ms|s)?(?![\w.])/i;

/**
 * The spread window a close reason advises (`window=10` or `window=2500ms`), clamped to
 * [0, maximum] seconds; null when it advises none.
 * @param {string | null | undefined} reason
 */
export function advisedWindow(reason, maximum = 300.0) {
  if (!reason) return null;
  const m = WINDOW_RE.exec(reason);
  if (!m) return null;
  let value = Number(m[1]);
  if ((m[2] || "s").toLowerCase() === "ms") value /= 1000;
  return Math.min(Math.max(value, 0), maximum);
}

/**
 * Seconds to wait before the next attempt (same rules as the Python client).
 * @param {{backoffMin: number, backoffMax: number, restartWindow: number, rateLimitWait: number, maxWindow: number, rateLimitSpread: number}} policy
 * @param {number} attempt failed attempts since the last stable connection
 * @param {() => number} rng
 * @param {{code?: number | null, httpStatus?: number | null, retryAfter?: number | null, window?: number | null}} [info]
 *   `window`: a spread window the server advised (close reason, welcome, Reconnect-Window)
 */
export function reconnectDelay(policy, attempt, rng = Math.random, info = {}) {
  const lo = policy.backoffMin;
  const hi = policy.backoffMax;
  const { code = null, httpStatus = null, retryAfter = null, window = null } = info;
  const advised = window == null ? null : Math.min(Math.max(window, 0), policy.maxWindow);
  if (code === 4004 || httpStatus === 429) {
    // Spread, not a fixed wait: clients refused together would otherwise come back together.
    const floor = Math.max(policy.rateLimitWait, retryAfter || 0);
    let delay = restartDelay(advised ?? policy.rateLimitSpread, rng);
    if (attempt > 0) delay = Math.max(delay, backoffDelay(attempt, rng, lo, hi));
    return floor + delay;
  }
  if (httpStatus === 503 || (retryAfter != null && retryAfter > 0)) {
    const spread = advised ?? policy.restartWindow;
    return Math.max(backoffDelay(attempt, rng, lo, hi), (retryAfter || 0) + restartDelay(spread, rng));
  }
  if (code === 1001 || code === 1012 || (code != null && advised != null)) {
    let delay = restartDelay(advised ?? policy.restartWindow, rng);
    if (attempt > 0) delay = Math.max(delay, backoffDelay(attempt, rng, lo, hi));
    return delay;
  }
  return backoffDelay(attempt, rng, lo, hi);
}

// ------------------------------------------------------------------------------ clock

/** One ping/pong exchange (ms since the Unix epoch). */
export class ClockSample {
  /** @param {number} t0 @param {number} t1 @param {number} t2 @param {number} t3 */
  constructor(t0, t1, t2, t3) {
    this.t0 = t0;
    this.t1 = t1;
    this.t2 = t2;
    this.t3 = t3;
  }
  /** Server clock minus client clock (ms). */
  get offset() {
    return (this.t1 - this.t0 + (this.t2 - this.t3)) / 2;
  }
  /** Round-trip network delay, server processing excluded (ms, never negative). */
  get delay() {
    return Math.max(0, this.t3 - this.t0 - (this.t2 - this.t1));
  }
}

/** NTP-style clock estimate: keeps the last `size` samples, uses the min-delay one. */
export class ClockSync {
  constructor(size = 8) {
    if (size < 1) throw new RangeError("size must be at least 1");
    this.size = size;
    /** @type {ClockSample[]} */
    this._samples = [];
  }
  /** Record one exchange; null when unusable (not finite, or t3 < t0). */
  add(t0, t1, t2, t3) {
    if (![t0, t1, t2, t3].every(Number.isFinite) || t3 < t0) return null;
    const s = new ClockSample(t0, t1, t2, t3);
    this._samples.push(s);
    if (this._samples.length > this.size) this._samples.shift();
    return s;
  }
  reset() {
    this._samples = [];
  }
  get samples() {
    return this._samples.slice();
  }
  /** The min-delay sample (the newest among equals), or null. */
  get best() {
    let best = null;
    for (const s of this._samples) if (best === null || s.delay <= best.delay) best = s;
    return best;
  }
  get latest() {
    return this._samples.length ? this._samples[this._samples.length - 1] : null;
  }
  /** Server clock minus local clock (ms), or null before any sample. */
  get offset() {
    const b = this.best;
    return b === null ? null : b.offset;
  }
  get delay() {
    const b = this.best;
    return b === null ? null : b.delay;
  }
  /** The server's clock at local time `localMs`. */
  serverTime(localMs) {
    const o = this.offset;
    return o === null ? localMs : localMs + o;
  }
}

// ------------------------------------------------------------------------------ tracker

/** Verdicts of the tracker for one incoming publication. */
export const Verdict = Object.freeze({
  DELIVER: "deliver",
  DUPLICATE: "duplicate",
  HELD: "held",
  GAP: "gap",
  DELIVER_AND_RECOVER: "deliver_and_recover",
  IGNORED: "ignored",
});

const LATEST_ONLY_FAMILIES = new Set(["transcode"]);
/** @param {string} channel */
export function latestOnly(channel) {
  return LATEST_ONLY_FAMILIES.has(channel.split(":", 1)[0]);
}

/** @param {unknown} v @returns {v is number} */
function isInt(v) {
  return typeof v === "number" && Number.isInteger(v);
}
/** @param {unknown} v @returns {v is number} */
function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

class ChannelState {
  /** @param {string} name */
  constructor(name, epoch = null, seq = null, automatic = false) {
    this.name = name;
    /** @type {string | null} */
    this.epoch = epoch;
    /** @type {number | null} */
    this.seq = seq;
    this.automatic = automatic;
    this.wanted = false;
    this.recovering = false;
    this.dropped = false;
    /** @type {{epoch: string, seq: number} | null} */
    this.sentSince = null;
    /** @type {Record<string, any> | null} */
    this.entry = null;
    this.generation = -1;
  }
  get position() {
    return this.epoch === null || this.seq === null ? null : { epoch: this.epoch, seq: this.seq };
  }
}

/**
 * Per-channel positions, de-duplication and recovery bookkeeping (a port of the Python
 * client's Tracker): every publication reaches the application once and in order per channel.
 */
export class Tracker {
  constructor(notificationIds = 10000) {
    /** @type {Map<string, ChannelState>} */
    this.channels = new Map();
    /** @type {Map<string, true>} */
    this._seen = new Map();
    this._seenLimit = Math.max(1, notificationIds);
  }

  /** @param {string} name @param {{epoch: string, seq: number} | null} [since] */
  want(name, since = null) {
    let st = this.channels.get(name);
    if (!st) this.channels.set(name, (st = new ChannelState(name)));
    st.wanted = true;
    st.dropped = false;
    if (since && st.position === null) {
      st.epoch = since.epoch;
      st.seq = since.seq;
    }
    return st;
  }
  drop(name) {
    const st = this.channels.get(name);
    if (st) {
      st.dropped = true;
      st.wanted = false;
    }
  }
  forget(name) {
    this.channels.delete(name);
  }
  ackedIn(name, generation) {
    const st = this.channels.get(name);
    return !!st && !st.dropped && st.generation === generation;
  }
  /** @returns {Record<string, {epoch: string, seq: number}>} */
  positions() {
    /** @type {Record<string, {epoch: string, seq: number}>} */
    const out = {};
    for (const [n, st] of this.channels) {
      const p = st.position;
      if (p) out[n] = p;
    }
    return out;
  }

  /** `subscribe` items for these channels: with `since` when a position is known. */
  itemsFor(names) {
    /** @type {(string | {name: string, since: {epoch: string, seq: number}})[]} */
    const items = [];
    for (const name of names) {
      let st = this.channels.get(name);
      if (!st) {
        st = new ChannelState(name);
        st.wanted = true;
        this.channels.set(name, st);
      }
      const pos = st.position;
      st.sentSince = pos;
      if (pos === null) items.push(name);
      else {
        st.recovering = true;
        items.push({ name, since: { epoch: pos.epoch, seq: pos.seq } });
      }
    }
    return items;
  }

  /** Apply a welcome's automatic subscriptions; returns what to (re)subscribe. */
  onWelcome(entries, generation) {
    const listed = new Set();
    const need = [];
    for (const e of entries) {
      const { channel: name, epoch, seq } = e || {};
      if (typeof name !== "string" || typeof epoch !== "string" || !isInt(seq)) continue;
      listed.add(name);
      let st = this.channels.get(name);
      if (!st) this.channels.set(name, (st = new ChannelState(name)));
      st.automatic = true;
      st.dropped = false;
      const pos = st.position;
      if (pos === null || (pos.epoch === epoch && pos.seq === seq)) {
        st.epoch = epoch;
        st.seq = seq;
        st.recovering = false;
        st.sentSince = null;
        st.entry = { ...e };
        st.generation = generation;
      } else need.push(name);
    }
    for (const [name, st] of [...this.channels]) {
      if (listed.has(name)) continue;
      if (st.dropped) {
        this.channels.delete(name);
        continue;
      }
      need.push(name);
    }
    return this.itemsFor(need);
  }

  /** Apply one `subscribe` ack entry; false when a requested recovery failed. */
  applyEntry(entry, generation) {
    const { channel: name, epoch, seq } = entry || {};
    if (typeof name !== "string") return true;
    let st = this.channels.get(name);
    if (!st) {
      st = new ChannelState(name);
      st.wanted = true;
      this.channels.set(name, st);
    }
    const since = st.sentSince;
    st.sentSince = null;
    st.recovering = false;
    st.entry = { ...entry };
    st.generation = generation;
    if (typeof epoch !== "string" || !isInt(seq)) return true;
    if (since && entry.recovered === true) {
      st.epoch = since.epoch;
      st.seq = since.seq;
      return true;
    }
    st.epoch = epoch;
    st.seq = seq;
    return since === null;
  }

  cancel(names) {
    for (const name of names) {
      const st = this.channels.get(name);
      if (st) {
        st.recovering = false;
        st.sentSince = null;
      }
    }
  }

  /** `subscription.reset`: the server continues the channel from here. */
  onReset(name, epoch, seq) {
    let st = this.channels.get(name);
    if (!st) this.channels.set(name, (st = new ChannelState(name, null, null, true)));
    st.epoch = epoch;
    st.seq = seq;
    st.recovering = false;
  }

  /**
   * `subscription.added` (the server subscribed this connection: a job started, a room was
   * joined). Returns false when a known position could not be continued (another epoch).
   */
  onAdded(entry, generation) {
    const { channel: name, epoch, seq } = entry || {};
    if (typeof name !== "string" || typeof epoch !== "string" || !isInt(seq)) return true;
    const missed = isInt(entry.missed) ? entry.missed : 0;
    const start = Math.max(0, seq - missed);
    let st = this.channels.get(name);
    let ok = true;
    if (!st) this.channels.set(name, (st = new ChannelState(name, epoch, start, true)));
    else {
      st.dropped = false;
      st.recovering = false;
      st.sentSince = null;
      if (st.epoch !== epoch || st.seq === null || st.seq > seq) {
        ok = st.position === null;
        st.epoch = epoch;
        st.seq = start;
      } else if (st.seq < start) {
        // The server continues after what we missed: the first live publication would be a
        // gap, and the recovery re-subscribes with since. Nothing to do here.
      }
    }
    st.automatic = true;
    st.entry = { ...entry };
    st.generation = generation;
    return ok;
  }

  /** @param {string} name @param {string} epoch @param {number} seq */
  onPublication(name, epoch, seq) {
    const st = this.channels.get(name);
    if (!st) {
      this.channels.set(name, new ChannelState(name, epoch, seq, true));
      return Verdict.DELIVER;
    }
    if (st.dropped) return Verdict.IGNORED;
    if (st.recovering) return Verdict.HELD;
    if (st.epoch === null || st.seq === null) {
      st.epoch = epoch;
      st.seq = seq;
      return Verdict.DELIVER;
    }
    if (epoch === st.epoch) {
      if (seq <= st.seq) return Verdict.DUPLICATE;
      if (seq === st.seq + 1 || latestOnly(name)) {
        st.seq = seq;
        return Verdict.DELIVER;
      }
    }
    st.recovering = true;
    return Verdict.GAP;
  }

  /** A `notification`: delivered unless its `data.id` was seen. */
  onNotification(message) {
    let verdict = /** @type {string} */ (Verdict.DELIVER);
    const { channel: name, epoch, seq } = message;
    if (typeof name === "string" && typeof epoch === "string" && isInt(seq)) {
      const st = this.channels.get(name);
      if (!st) this.channels.set(name, new ChannelState(name, epoch, seq, true));
      else if (!st.recovering && !st.dropped && st.seq !== null) {
        if (epoch === st.epoch && seq === st.seq + 1) st.seq = seq;
        else if (epoch !== st.epoch || seq > st.seq + 1) {
          st.recovering = true;
          verdict = Verdict.DELIVER_AND_RECOVER;
        }
      }
    }
    const data = message.data;
    const nid = data && typeof data === "object" ? data.id : undefined;
    if (typeof nid === "string" || isNum(nid)) {
      const key = String(nid);
      if (this._seen.has(key)) {
        this._seen.delete(key);
        this._seen.set(key, true);
        return verdict === Verdict.DELIVER_AND_RECOVER ? Verdict.GAP : Verdict.DUPLICATE;
      }
      this._seen.set(key, true);
      if (this._seen.size > this._seenLimit) {
        const oldest = this._seen.keys().next().value;
        if (oldest !== undefined) this._seen.delete(oldest);
      }
    }
    return verdict;
  }
}

// ------------------------------------------------------------------------------ helpers

/** A small event emitter: `on(key, fn)` returns a function that removes the handler. */
class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
  }
  /** @param {string} key @param {(msg: any) => any} handler */
  on(key, handler) {
    let set = this._handlers.get(key);
    if (!set) this._handlers.set(key, (set = new Set()));
    set.add(handler);
    return () => {
      this._handlers.get(key)?.delete(handler);
    };
  }
  /** @param {string} key @param {(msg: any) => any} handler */
  off(key, handler) {
    this._handlers.get(key)?.delete(handler);
  }
  /** @param {string} key @param {(msg: any) => any} handler */
  once(key, handler) {
    const off = this.on(key, (m) => {
      off();
      return handler(m);
    });
    return off;
  }
  /** @protected */
  _dispatch(key, arg, logger) {
    const set = this._handlers.get(key);
    if (!set || set.size === 0) return;
    for (const fn of [...set]) {
      try {
        const r = fn(arg);
        if (r && typeof r.then === "function") {
          r.then(undefined, (/** @type {any} */ err) => logger?.error?.("revenge-ws: handler failed", err));
        }
      } catch (err) {
        logger?.error?.("revenge-ws: handler failed", err);
      }
    }
  }
}

/** @param {unknown} raw */
function decode(raw) {
  if (typeof raw !== "string") return null;
  try {
    const obj = JSON.parse(raw);
    return obj && typeof obj === "object" && !Array.isArray(obj) ? obj : null;
  } catch {
    return null;
  }
}

function defaultNow() {
  const perf = globalThis.performance;
  if (perf && typeof perf.now === "function" && isNum(perf.timeOrigin)) {
    return perf.timeOrigin + perf.now();
  }
  return Date.now();
}

const DEFAULT_TIMERS = {
  now: defaultNow,
  setTimeout: (/** @type {() => void} */ fn, /** @type {number} */ ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (/** @type {any} */ id) => globalThis.clearTimeout(id),
};

const QUIET_LOGGER = {
  debug() {},
  info() {},
  warn: (/** @type {any[]} */ ...a) => globalThis.console?.warn(...a),
  error: (/** @type {any[]} */ ...a) => globalThis.console?.error(...a),
};

/**
 * The `exp` claim of a JWT (ms since the epoch), or null; the signature is not checked (the
 * client only uses it to avoid connecting with a token it knows is expired).
 * @param {string | null | undefined} token
 */
export function tokenExpiry(token) {
  if (!token) return null;
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
    const text =
      typeof globalThis.atob === "function"
        ? globalThis.atob(b64)
        : // @ts-ignore Node without atob (never on Node 20, kept for old runtimes)
          Buffer.from(b64, "base64").toString("binary");
    const payload = JSON.parse(text);
    return isNum(payload.exp) ? payload.exp * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * An absolute ws(s):// URL for `url`: relative paths resolve against the page (http -> ws,
 * https -> wss), http(s) URLs change scheme.
 * @param {string} url
 */
export function websocketUrl(url) {
  const base = globalThis.location?.href;
  const u = base ? new URL(url, base) : new URL(url);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  return u.toString();
}

const REPLY_TYPES = new Set(["ack", "error", "pong"]);
const SUBSCRIBE_CHUNK = 128;
const MAX_UNAUTHORIZED = 3;
const MIN_REFRESH_GAP = 1.0;

/** Default options of {@link RevengeClient} (seconds unless noted). */
export const DEFAULT_OPTIONS = Object.freeze({
  requestTimeout: 5.0,
  connectTimeout: 10.0,
  backoffMin: 0.5,
  backoffMax: 20.0,
  restartWindow: 5.0,
  rateLimitWait: 5.0,
  maxWindow: 300.0,
  rateLimitSpread: 5.0,
  stableAfter: 5.0,
  refreshMargin: 60.0,
  initialPings: 3,
  initialPingInterval: 1.0,
  pingInterval: null,
  watchdogTimeout: null,
  clockSamples: 8,
  reconnect: true,
  notificationIds: 10000,
  probeHandshake: true,
  watchNetwork: true,
  playbackInterval: 10.0,
});

/**
 * A self-healing connection to the hub.
 *
 * Events (`client.on(key, fn)`, key = message type, channel name, or "*"): every server
 * message except replies, plus the client's own events `client.connected`,
 * `client.disconnected`, `client.recovery_failed`, `client.subscription_error`,
 * `client.closed` and `client.state` (shaped `{type, data}`).
 */
export class RevengeClient extends Emitter {
  /**
   * @param {string} url e.g. "/api/v1/ws" (relative to the page) or "wss://hub/api/v1/ws"
   * @param {import("./revenge-ws").ClientOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    const o = { ...DEFAULT_OPTIONS, ...options };
    this.url = url;
    this.options = o;
    this.policy = {
      backoffMin: o.backoffMin,
      backoffMax: o.backoffMax,
      restartWindow: o.restartWindow,
      rateLimitWait: o.rateLimitWait,
      maxWindow: o.maxWindow,
      rateLimitSpread: o.rateLimitSpread,
    };
    if (!(0 < this.policy.backoffMin && this.policy.backoffMin <= this.policy.backoffMax)) {
      throw new RangeError("need 0 < backoffMin <= backoffMax");
    }
    this._WS = o.WebSocket ?? globalThis.WebSocket;
    // `fetch: null` disables the handshake probe.
    this._fetch =
      o.fetch !== undefined
        ? o.fetch
        : typeof globalThis.fetch === "function"
          ? globalThis.fetch.bind(globalThis)
          : null;
    this._timers = { ...DEFAULT_TIMERS, ...(o.timers ?? {}) };
    this._rng = o.random ?? Math.random;
    this.logger = o.logger ?? QUIET_LOGGER;
    this._token = o.token ?? null;
    this._provider = o.tokenProvider ?? null;
    this._needToken = this._token == null && this._provider != null;
    this._onRecoveryFailed = o.onRecoveryFailed ?? null;
    this.stats = {
      connects: 0,
      attempts: 0,
      disconnects: 0,
      delivered: 0,
      duplicates: 0,
      held: 0,
      gaps: 0,
      recoveries: 0,
      recoveryFailures: 0,
      pings: 0,
      watchdogFired: 0,
      tokenRefreshes: 0,
      invalidFrames: 0,
    };
    this.clock = new ClockSync(o.clockSamples);
    /** @type {Record<string, any> | null} the last welcome data */
    this.welcome = null;
    /** @type {{code: number | null, reason: string} | null} */
    this.lastClose = null;
    this._tracker = new Tracker(o.notificationIds);
    /** @type {Map<string, {resolve: Function, reject: Function, onReply: Function | null, timer: any}>} */
    this._pending = new Map();
    this._ids = 0;
    /** @type {any} the current connection (after its welcome) */
    this._conn = null;
    /** @type {any} the socket being opened or served */
    this._attempt = null;
    this._gen = 0;
    this._connected = false;
    this._done = false;
    this._closing = false;
    /** @type {ConnectionClosed | null} */
    this._error = null;
    /** @type {Promise<void> | null} */
    this._main = null;
    /** @type {{resolve: Function, reject: Function}[]} */
    this._readyWaiters = [];
    /** @type {(() => void) | null} */
    this._wake = null;
    this._coarseOffset = null;
    this._expiresAt = null;
    this._pingInterval = 30;
    this._watchdog = 90;
    this._welcomeWindow = null;
    this._unauthorized = 0;
    this._state = "idle";
    /** @type {Record<string, any> | null} the device.hello data (option `device`, setDevice) */
    this._device = o.device ? deviceHello(o.device) : null;
    /** @type {Record<string, any> | null} the hub's device object, from the last hello */
    this.device = null;
    this._deviceActive = false;
    /** @type {{data: Record<string, any>, at: number} | null} the last playback report */
    this._playback = null;
    /** @type {any} */
    this._playbackTimer = null;
    /** @type {((cmd: any) => unknown) | null} */
    this._commandHandler = null;
    this._onOnline = () => {
      if (this._state === "waiting") this._wakeUp();
    };
    this._onOffline = () => {
      if (this._conn && !this._conn.ended) this._abort("the browser went offline");
    };
  }

  // -- lifecycle -----------------------------------------------------------------------

  /** Start connecting in the background; resolves with the welcome once connected. */
  connect(timeout) {
    this.start();
    return this.waitConnected(timeout);
  }

  /** Start connecting in the background (idempotent). */
  start() {
    if (this._main) return;
    if (typeof this._WS !== "function") {
      throw new RevengeError("no WebSocket implementation (pass options.WebSocket)", null);
    }
    if (this.options.watchNetwork && typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("online", this._onOnline);
      globalThis.addEventListener("offline", this._onOffline);
    }
    this._main = this._run();
  }

  /** Close the connection and stop reconnecting. Idempotent. */
  async close() {
    this._closing = true;
    this._wakeUp();
    const conn = this._conn ?? this._attempt;
    if (conn && !conn.ended) conn.finish({ code: 1000, reason: "client closed" }, 1000);
    if (this._main) await this._main;
    this._finish();
  }

  /**
   * Wait until connected and re-subscribed; resolves with the welcome data. Rejects with
   * ConnectionClosed when the client ended, RequestTimeout after `timeout` seconds.
   * @param {number} [timeout]
   */
  async waitConnected(timeout) {
    const deadline = timeout == null ? null : this._timers.now() + timeout * 1000;
    await this._ready(deadline);
    return /** @type {Record<string, any>} */ (this.welcome);
  }

  /** Resolves when the client ended; with the terminal error (null after close()). */
  waitClosed() {
    if (this._done) return Promise.resolve(this._error);
    return new Promise((resolve) => {
      const off = this.on("client.closed", () => {
        off();
        resolve(this._error);
      });
    });
  }

  // -- state ---------------------------------------------------------------------------

  /** `idle`, `connecting`, `connected`, `waiting` (to reconnect) or `closed`. */
  get state() {
    return this._state;
  }
  get connected() {
    return this._connected;
  }
  /** The terminal close, once the client gave up (never set by close()). */
  get error() {
    return this._error;
  }
  get sessionId() {
    return this.welcome?.session_id ?? null;
  }
  get userId() {
    return this.welcome?.user_id ?? null;
  }
  /** Server clock minus local clock (ms): min-delay of the last 8 pings, or the welcome's. */
  get clockOffset() {
    const o = this.clock.offset;
    return o === null ? this._coarseOffset : o;
  }
  /**
   * Round-trip time (ms, server processing excluded) of the min-delay sample of the last
   * `clockSamples` pings: the one `clockOffset` comes from. Queueing only ever adds delay, so
   * this is the path's own RTT without one-off spikes; what SyncPlay's lead (2 × the worst
   * member's RTT) and its reports are built on. Null before the first pong.
   */
  get rtt() {
    return this.clock.delay;
  }
  /** Round-trip time of the latest ping (ms), jitter included; null before the first pong. */
  get rttLatest() {
    return this.clock.latest?.delay ?? null;
  }
  /** The server's clock now (ms since the Unix epoch), as estimated. */
  serverTime() {
    return this._timers.now() + (this.clockOffset ?? 0);
  }
  /** Each channel's last delivered position. */
  positions() {
    return this._tracker.positions();
  }
  /** Channels followed (subscribed or automatic). */
  get channels() {
    return [...this._tracker.channels.values()].filter((s) => !s.dropped).map((s) => s.name);
  }
  /** The current token (after refreshes). */
  get token() {
    return this._token;
  }

  // -- application API -----------------------------------------------------------------

  /**
   * Send a request and resolve with its `ack` data. Waits for the connection within the
   * timeout (seconds, default requestTimeout). Rejects with RequestError (`.code`),
   * RequestTimeout (`.code === "TIMEOUT"`) or ConnectionClosed.
   * @param {string} type
   * @param {Record<string, any>} [data]
   * @param {{timeout?: number}} [opts]
   */
  async request(type, data = {}, opts = {}) {
    const timeout = opts.timeout ?? this.options.requestTimeout;
    const deadline = this._timers.now() + timeout * 1000;
    await this._ready(deadline);
    const reply = await this._call(type, data, Math.max(0, deadline - this._timers.now()));
    return reply.data ?? {};
  }

  /**
   * Send a message without an id (no ack; an error still comes back as an `error` message).
   * Returns false when not connected.
   */
  send(type, data = {}) {
    const conn = this._conn;
    if (!conn || conn.ended) return false;
    try {
      conn.ws.send(JSON.stringify({ type, data }));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Subscribe channels; resolves with their ack entries. They stay subscribed across
   * reconnects. Rejects with SubscribeError when some were refused.
   * @param {string | string[]} channels
   * @param {{since?: Record<string, {epoch: string, seq: number}>, handler?: (msg: any) => any, timeout?: number}} [opts]
   */
  async subscribe(channels, opts = {}) {
    const names = Array.isArray(channels) ? channels : [channels];
    if (names.length === 0) throw new RangeError("subscribe needs at least one channel");
    for (const name of names) {
      this._tracker.want(name, opts.since?.[name] ?? null);
      if (opts.handler) this.on(name, opts.handler);
    }
    const timeout = opts.timeout ?? this.options.requestTimeout;
    const deadline = this._timers.now() + timeout * 1000;
    /** @type {Map<string, any>} */
    const errors = new Map();
    for (;;) {
      await this._ready(deadline);
      const gen = this._gen;
      const todo = names.filter((n) => !this._tracker.ackedIn(n, gen));
      if (todo.length === 0) break;
      let reply;
      try {
        reply = await this._call(
          "subscribe",
          { channels: this._tracker.itemsFor(todo) },
          Math.max(0, deadline - this._timers.now()),
          this._subscribeReply(todo, gen),
        );
      } catch (err) {
        if (err instanceof RequestTimeout) this._tracker.cancel(todo);
        if (err instanceof ConnectionClosed && !this._error && !this._closing) continue;
        throw err;
      }
      for (const e of reply.data?.errors ?? []) {
        if (e && names.includes(e.channel)) errors.set(e.channel, e);
      }
      break;
    }
    const entries = [];
    for (const name of names) {
      const st = this._tracker.channels.get(name);
      if (!errors.has(name) && st && st.entry) entries.push({ ...st.entry });
    }
    if (errors.size) throw new SubscribeError([...errors.values()], entries);
    return entries;
  }

  /** Stop following channels (also on later reconnects). */
  async unsubscribe(channels, opts = {}) {
    const names = Array.isArray(channels) ? channels : [channels];
    for (const name of names) this._tracker.drop(name);
    try {
      if (this._connected) {
        await this._call(
          "unsubscribe",
          { channels: names },
          (opts.timeout ?? this.options.requestTimeout) * 1000,
        );
      }
    } finally {
      for (const name of names) {
        const st = this._tracker.channels.get(name);
        if (st && st.dropped) this._tracker.forget(name);
      }
    }
  }

  /** `notification.ack`: the hub stops re-sending these notifications. */
  ackNotifications(ids) {
    return this.request("notification.ack", { ids: Array.isArray(ids) ? ids : [ids] });
  }

  // -- devices, now playing, remote control (contract §13) ------------------------------

  /**
   * Make this client a device (or change it; `null` stops being one at the next connect).
   * The client says `device.hello` now when connected, and again after every reconnect.
   * Resolves with the hub's device object (null when not connected yet or without a device).
   * @param {import("./revenge-ws").DeviceConfig | null} config
   */
  async setDevice(config) {
    this._device = config == null ? null : deviceHello(config);
    this._deviceActive = false;
    this.device = null;
    const conn = this._conn;
    if (!this._device || !conn || conn.ended) return null;
    await this._hello(conn);
    return this.device;
  }

  /** The `device.hello` data this client sends, or null when it is not a device. */
  get deviceConfig() {
    return this._device ? { ...this._device, capabilities: { ...this._device.capabilities } } : null;
  }

  /**
   * Whether the hub knows this connection as the device: hello acknowledged, not taken over
   * by another connection (`device.ended`), connection up.
   */
  get deviceActive() {
    return this._deviceActive && this._connected;
  }

  /**
   * Report what this device plays (`playback.update`): on every state change; while
   * `playing` the client repeats it every `playbackInterval` seconds (10) with the position
   * extrapolated, and re-sends it after a reconnect. `stopped` clears it.
   * Resolves true when the hub acknowledged it, false when it is kept for later (not
   * connected, no device, device taken over); rejects with RequestError when the hub refused
   * it (e.g. INVALID_MESSAGE).
   * @param {import("./revenge-ws").PlaybackReport} report
   */
  reportPlayback(report) {
    let data;
    try {
      data = playbackData(report);
    } catch (err) {
      return Promise.reject(err);
    }
    this._playback = data.state === "stopped" ? null : { data, at: this._timers.now() };
    this._schedulePlayback();
    if (!this._deviceActive || !this._conn || this._conn.ended) return Promise.resolve(false);
    return this._sendPlayback(data);
  }

  /**
   * What this device reported last, the position extrapolated to now while playing (as the
   * periodic update sends it); null when nothing plays.
   * @returns {Record<string, any> | null}
   */
  currentPlayback() {
    const p = this._playback;
    if (!p) return null;
    const data = { ...p.data };
    if (data.state === "playing") {
      let pos = data.position + ((this._timers.now() - p.at) / 1000) * (data.rate ?? 1);
      if (isNum(data.duration) && data.duration > 0) pos = Math.min(pos, data.duration);
      data.position = round3(Math.max(0, pos));
    }
    return data;
  }

  /**
   * Handle `remote.command` sent to this device: `handler({command, args, from, commandId})`
   * may be async; its return value (an object) is sent as the result's `state`, a thrown
   * error as `ok: false` with the error's message. One handler; returns a function that
   * removes it. Without a handler, commands are answered `ok: false`.
   * @param {(cmd: import("./revenge-ws").RemoteCommand) => unknown} handler
   */
  onCommand(handler) {
    this._commandHandler = handler;
    return () => {
      if (this._commandHandler === handler) this._commandHandler = null;
    };
  }

  /**
   * Send a remote command to a device of this user (or, for admins, of `userId`); resolves
   * with the device's result `{ok: true, state?, command_id}`. Rejects with RequestError
   * whose `code` is REJECTED (the device said no, or does not take that command), TIMEOUT
   * (no answer within `timeoutMs`, default 10000), NOT_FOUND, FORBIDDEN, UNAVAILABLE (it
   * went away before answering), RATE_LIMITED or INVALID_MESSAGE.
   * @param {string} deviceId
   * @param {string} command
   * @param {Record<string, any> | null} [args]
   * @param {{userId?: string, timeoutMs?: number, timeout?: number}} [opts]
   */
  async sendCommand(deviceId, command, args = null, opts = {}) {
    /** @type {Record<string, any>} */
    const data = { device_id: deviceId, command };
    if (args != null) data.args = args;
    if (opts.userId != null) data.user_id = opts.userId;
    if (opts.timeoutMs != null) data.timeout_ms = opts.timeoutMs;
    // The hub answers TIMEOUT itself after timeout_ms: wait a little longer than that.
    const timeout = opts.timeout ?? (opts.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS) / 1000 + this.options.requestTimeout;
    const ack = await this.request("remote.command", data, { timeout });
    return { ...(ack.result ?? { ok: true }), command_id: ack.command_id ?? null };
  }

  /**
   * `devices.list`: this user's devices; admins may name `userId` or ask for `all`.
   * @param {{userId?: string, all?: boolean, timeout?: number}} [opts]
   * @returns {Promise<import("./revenge-ws").Device[]>}
   */
  async listDevices(opts = {}) {
    /** @type {Record<string, any>} */
    const data = {};
    if (opts.userId != null) data.user_id = opts.userId;
    if (opts.all) data.all = true;
    const ack = await this.request("devices.list", data, { timeout: opts.timeout });
    return Array.isArray(ack.devices) ? ack.devices : [];
  }

  /** One ping/pong exchange; resolves with the clock sample it produced (or null). */
  async ping(opts = {}) {
    const timeout = opts.timeout ?? this.options.requestTimeout;
    const deadline = this._timers.now() + timeout * 1000;
    await this._ready(deadline);
    return this._ping(Math.max(0, deadline - this._timers.now()));
  }

  /**
   * Like `on`, keyed by message type or channel; client events are types too.
   * @param {string} key
   * @param {(msg: any) => any} handler
   */
  on(key, handler) {
    return super.on(key, handler);
  }

  // -- internals: requests -------------------------------------------------------------

  /** @param {number | null} deadline local ms */
  _ready(deadline) {
    if (!this._main) {
      return Promise.reject(new RevengeError("the client is not started (call start())", null));
    }
    if (this._connected) return Promise.resolve();
    if (this._done) {
      const err = this._error;
      return Promise.reject(err ? new ConnectionClosed(err.code, err.reason) : new ConnectionClosed(1000, "client closed"));
    }
    return new Promise((resolve, reject) => {
      /** @type {any} */
      let timer = null;
      const waiter = {
        resolve: () => {
          if (timer !== null) this._timers.clearTimeout(timer);
          resolve(undefined);
        },
        reject: (/** @type {any} */ err) => {
          if (timer !== null) this._timers.clearTimeout(timer);
          reject(err);
        },
      };
      this._readyWaiters.push(waiter);
      if (deadline !== null) {
        timer = this._timers.setTimeout(() => {
          const i = this._readyWaiters.indexOf(waiter);
          if (i >= 0) this._readyWaiters.splice(i, 1);
          reject(new RequestTimeout("not connected in time"));
        }, Math.max(0, deadline - this._timers.now()));
      }
    });
  }

  _settleWaiters() {
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    if (this._connected) for (const w of waiters) w.resolve();
    else {
      const err = this._error;
      for (const w of waiters) {
        w.reject(err ? new ConnectionClosed(err.code, err.reason) : new ConnectionClosed(1000, "client closed"));
      }
    }
  }

  /**
   * Send one request on the current connection; resolves with the reply envelope.
   * `onReply(msg, t3)` runs on the reader before any later frame is handled.
   * @param {string} type @param {Record<string, any>} data @param {number} timeoutMs
   * @param {((msg: any, t3: number) => void) | null} [onReply]
   * @returns {Promise<any>}
   */
  _call(type, data, timeoutMs, onReply = null) {
    const conn = this._conn;
    if (!conn || conn.ended) return Promise.reject(new ConnectionClosed(null, "not connected"));
    const id = `c${++this._ids}`;
    return new Promise((resolve, reject) => {
      const timer = this._timers.setTimeout(() => {
        this._pending.delete(id);
        reject(new RequestTimeout(`no reply to '${type}' within ${Math.round(timeoutMs) / 1000}s`));
      }, timeoutMs);
      this._pending.set(id, {
        resolve: (/** @type {any} */ msg) => {
          if (msg.type === "error") {
            const err = msg.data ?? {};
            const code = typeof err.code === "string" ? err.code : ErrorCode.INTERNAL;
            reject(
              new RequestError(code, String(err.message ?? code), {
                retryable: Boolean(err.retryable),
                requestId: id,
                type,
              }),
            );
          } else resolve(msg);
        },
        reject,
        onReply,
        timer,
      });
      try {
        conn.ws.send(JSON.stringify({ type, id, data }));
      } catch (err) {
        this._timers.clearTimeout(timer);
        this._pending.delete(id);
        reject(new ConnectionClosed(null, `send failed: ${/** @type {any} */ (err)?.message ?? err}`));
      }
    });
  }

  /** @param {number} timeoutMs */
  async _ping(timeoutMs) {
    /** @type {ClockSample | null} */
    let sample = null;
    const t0 = this._timers.now();
    this.stats.pings += 1;
    await this._call("ping", { t0 }, timeoutMs, (msg, t3) => {
      const d = msg.data ?? {};
      if (msg.type === "pong" && isNum(d.t1) && isNum(d.t2)) sample = this.clock.add(t0, d.t1, d.t2, t3);
    });
    return sample;
  }

  /** The ack of a `subscribe` is applied on the reader, before the missed publications. */
  _subscribeReply(names, gen) {
    return (/** @type {any} */ msg) => {
      if (msg.type !== "ack") {
        this._tracker.cancel(names);
        return;
      }
      const data = msg.data ?? {};
      for (const entry of data.subscriptions ?? []) {
        if (!entry || typeof entry !== "object") continue;
        const name = entry.channel;
        const st = typeof name === "string" ? this._tracker.channels.get(name) : undefined;
        const recovering = !!st && st.sentSince !== null;
        const ok = this._tracker.applyEntry(entry, gen);
        if (recovering) this.stats.recoveries += 1;
        if (!ok && typeof name === "string") {
          this._recoveryFailed(name, entry.epoch, entry.seq, "history does not cover the gap (recovered: false)", entry.latest);
        }
      }
      for (const e of data.errors ?? []) {
        if (!e || typeof e.channel !== "string") continue;
        const st = this._tracker.channels.get(e.channel);
        this._tracker.forget(e.channel);
        if (st && (st.automatic || st.generation >= 0)) {
          this.logger.warn?.(`revenge-ws: re-subscribing ${e.channel} was refused: ${e.code}`);
        }
        this._emit("client.subscription_error", { ...e });
      }
    };
  }

  // -- internals: the device -----------------------------------------------------------

  /** Say `device.hello` on `conn`; never rejects (a refusal is logged and emitted). */
  async _hello(conn) {
    const hello = this._device;
    if (!hello) return;
    this._deviceActive = false;
    let reply;
    try {
      reply = await this._call("device.hello", hello, this.options.requestTimeout * 1000);
    } catch (err) {
      if (err instanceof ConnectionClosed || conn.ended) return;
      this.logger.warn?.(`revenge-ws: device.hello failed: ${/** @type {any} */ (err)?.message ?? err}`);
      this._emit("client.device", { active: false, device: null, error: errorData(err) });
      return;
    }
    if (conn.ended || this._conn !== conn || this._device !== hello) return;
    this.device = reply.data?.device ?? null;
    this._deviceActive = true;
    this._emit("client.device", { active: true, device: this.device });
    const now = this.currentPlayback();
    if (now) this._sendPlayback(now).catch((err) => this.logger.warn?.("revenge-ws: playback.update refused", err));
  }

  /** @param {Record<string, any>} data */
  async _sendPlayback(data) {
    this._schedulePlayback();
    try {
      await this._call("playback.update", data, this.options.requestTimeout * 1000);
      return true;
    } catch (err) {
      if (err instanceof RequestError) throw err;
      return false; // the connection went: sent again after the next hello
    }
  }

  /** While playing, repeat the report every playbackInterval seconds. */
  _schedulePlayback() {
    if (this._playbackTimer !== null) this._timers.clearTimeout(this._playbackTimer);
    this._playbackTimer = null;
    if (this._done || this._playback?.data.state !== "playing") return;
    this._playbackTimer = this._timers.setTimeout(() => {
      this._playbackTimer = null;
      const now = this.currentPlayback();
      if (now && this._deviceActive && this._conn && !this._conn.ended) {
        this._sendPlayback(now).catch((err) => this.logger.warn?.("revenge-ws: playback.update refused", err));
      } else this._schedulePlayback();
    }, this.options.playbackInterval * 1000);
  }

  /** `device.ended`: another connection took this device over; no hello until a reconnect. */
  _onDeviceEnded(msg) {
    const d = msg.data ?? {};
    if (!this._device || (d.device_id != null && d.device_id !== this._device.device_id)) return;
    this._deviceActive = false;
    this.logger.info?.(`revenge-ws: device ${this._device.device_id} ended (${d.reason ?? "?"})`);
    this._emit("client.device", { active: false, device: this.device, reason: d.reason ?? null });
  }

  /** `remote.command`: run the handler, answer with `remote.result` on the same connection. */
  async _onRemoteCommand(msg) {
    const d = msg.data ?? {};
    const id = d.command_id;
    if (typeof id !== "string" && !isNum(id)) return;
    const conn = this._conn;
    const handler = this._commandHandler;
    /** @type {Record<string, any>} */
    let result;
    if (!handler) result = { ok: false, error: "this device takes no remote commands" };
    else {
      try {
        const state = await handler({
          command: String(d.command ?? ""),
          args: d.args && typeof d.args === "object" ? d.args : {},
          from: d.from ?? null,
          commandId: id,
          message: msg,
        });
        result = { ok: true };
        if (state && typeof state === "object" && !Array.isArray(state)) result.state = state;
      } catch (err) {
        const text = String(/** @type {any} */ (err)?.message ?? err ?? "").slice(0, 500);
        result = { ok: false, error: text || "failed" };
      }
    }
    // The command died with its connection: the sender got UNAVAILABLE.
    if (!conn || conn.ended || this._conn !== conn) return;
    try {
      await this._call("remote.result", { command_id: id, ...result }, this.options.requestTimeout * 1000);
    } catch (err) {
      // NOT_FOUND: the answer came too late (the sender got TIMEOUT).
      this.logger.debug?.("revenge-ws: remote.result not taken", err);
    }
  }

  // -- internals: the connection loop --------------------------------------------------

  async _run() {
    let attempt = 0;
    try {
      while (!this._closing) {
        this._setState("connecting");
        this.stats.attempts += 1;
        const disc = await this._connectOnce();
        if (this._closing) break;
        if (disc.opened) {
          this.stats.disconnects += 1;
          this.lastClose = { code: disc.code, reason: disc.reason };
        }
        const terminal = this._terminal(disc);
        if (terminal || !this.options.reconnect) {
          this._error = terminal ?? new ConnectionClosed(disc.code, disc.reason);
          this.logger.warn?.(`revenge-ws: not reconnecting: ${this._error.message}`);
          this._emit("client.disconnected", discEvent(disc, null));
          break;
        }
        if (disc.stable) attempt = 0;
        if (disc.code === 4001 && this._provider) this._needToken = true;
        const delay = reconnectDelay(this.policy, attempt, this._rng, {
          code: disc.code,
          httpStatus: disc.httpStatus,
          retryAfter: disc.retryAfter,
          window: disc.window,
        });
        attempt += 1;
        this.logger.info?.(`revenge-ws: disconnected (${disc.code} ${disc.reason}); retry in ${delay.toFixed(2)}s`);
        this._emit("client.disconnected", discEvent(disc, delay));
        this._setState("waiting");
        await this._sleep(delay * 1000);
      }
    } catch (err) {
      this.logger.error?.("revenge-ws: client loop failed", err);
      this._error = new ConnectionClosed(null, "client loop failed");
    } finally {
      this._finish();
    }
  }

  _finish() {
    if (this._done) return;
    this._done = true;
    this._connected = false;
    this._deviceActive = false;
    if (this._playbackTimer !== null) this._timers.clearTimeout(this._playbackTimer);
    this._playbackTimer = null;
    this._setState("closed");
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
      globalThis.removeEventListener("offline", this._onOffline);
    }
    const err = this._error;
    this._rejectPending(err ? new ConnectionClosed(err.code, err.reason) : new ConnectionClosed(1000, "client closed"));
    this._settleWaiters();
    this._emit("client.closed", { code: err ? err.code : null, reason: err ? err.reason : "closed" });
  }

  /** @param {ConnectionClosed} err */
  _rejectPending(err) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      this._timers.clearTimeout(p.timer);
      p.reject(err);
    }
  }

  /** @param {number} ms */
  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = this._timers.setTimeout(() => {
        this._wake = null;
        resolve(undefined);
      }, ms);
      this._wake = () => {
        this._timers.clearTimeout(timer);
        this._wake = null;
        resolve(undefined);
      };
    });
  }

  _wakeUp() {
    if (this._wake) this._wake();
  }

  /** Reconnect now instead of waiting for the backoff (e.g. the app knows the network is back). */
  reconnectNow() {
    if (this._state === "waiting") this._wakeUp();
  }

  /** @param {string} state */
  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("client.state", { state });
  }

  /** @returns {ConnectionClosed | null} null when the client should reconnect after `disc` */
  _terminal(disc) {
    const status = disc.httpStatus;
    if (status != null) {
      if (status === 401) {
        this._unauthorized += 1;
        if (this._provider && this._unauthorized < MAX_UNAUTHORIZED) {
          this._needToken = true;
          return null;
        }
        return new ConnectionClosed(4501, disc.reason);
      }
      if (status >= 400 && status < 500 && status !== 408 && status !== 429) {
        return new ConnectionClosed(1008, disc.reason);
      }
      return null;
    }
    if (disc.code != null && !shouldReconnect(disc.code)) return new ConnectionClosed(disc.code, disc.reason);
    return null;
  }

  async _tokenNow() {
    const provider = this._provider;
    if (provider) {
      let stale = this._needToken || this._token == null;
      if (!stale) {
        const exp = tokenExpiry(this._token);
        stale = exp !== null && exp <= this.serverTime();
      }
      if (stale) {
        this._token = await provider();
        this._needToken = false;
      }
    }
    return this._token;
  }

  /** @param {string | null} token */
  _connectUrl(token) {
    const u = new URL(websocketUrl(this.url));
    if (token) u.searchParams.set("token", token);
    return u.toString();
  }

  async _connectOnce() {
    let token;
    try {
      token = await this._tokenNow();
    } catch (err) {
      this.logger.warn?.("revenge-ws: token provider failed", err);
      return newDisc({ reason: `token provider failed: ${/** @type {any} */ (err)?.name ?? "Error"}` });
    }
    if (this._closing) return newDisc({ code: 1000, reason: "client closed" });
    const url = this._connectUrl(token);
    const disc = await this._runSocket(url);
    if (!disc.opened && disc.code == null && this.options.probeHandshake && !this._closing) {
      const probe = await this._probe(url);
      if (probe) Object.assign(disc, probe);
    }
    return disc;
  }

  /**
   * A browser hides why a handshake failed; the hub refuses with plain HTTP before the
   * upgrade (contract §1), so the same URL fetched without upgrading tells 401/403/429/503,
   * Retry-After and the spread window (Reconnect-Window).
   * @param {string} wsUrl
   */
  async _probe(wsUrl) {
    const fetcher = this._fetch;
    if (!fetcher) return null;
    const httpUrl = wsUrl.replace(/^ws/, "http");
    /** @type {any} */
    let timer = null;
    try {
      const ctrl = typeof AbortController === "function" ? new AbortController() : null;
      if (ctrl) timer = this._timers.setTimeout(() => ctrl.abort(), 5000);
      const r = await fetcher(httpUrl, { method: "GET", cache: "no-store", signal: ctrl?.signal });
      if ([401, 403, 429, 503].includes(r.status)) {
        let reason = `handshake refused: HTTP ${r.status}`;
        /** @type {any} */
        let error = null;
        try {
          error = (await r.json())?.error ?? null;
          if (error?.message) reason += ` ${error.code}: ${error.message}`;
        } catch {
          /* not JSON */
        }
        // The body repeats both headers: a cross-origin page cannot read them unless the
        // hub's origin exposes them (Access-Control-Expose-Headers).
        const seconds = (/** @type {string} */ header, /** @type {unknown} */ fallback) => {
          const v = Number.parseFloat(r.headers?.get?.(header) ?? String(fallback ?? ""));
          return Number.isFinite(v) ? Math.max(0, v) : null;
        };
        return {
          httpStatus: r.status,
          retryAfter: seconds("Retry-After", error?.retry_after),
          window: seconds("Reconnect-Window", error?.window),
          reason,
        };
      }
    } catch {
      /* network down: a plain network loss */
    } finally {
      if (timer !== null) this._timers.clearTimeout(timer);
    }
    return null;
  }

  /**
   * Open one socket and serve it until it ends; resolves with how it ended.
   * @param {string} url
   * @returns {Promise<any>}
   */
  _runSocket(url) {
    return new Promise((resolve) => {
      /** @type {any} */
      let ws;
      try {
        ws = new this._WS(url, [SUBPROTOCOL]);
      } catch (err) {
        resolve(newDisc({ reason: `connect failed: ${/** @type {any} */ (err)?.message ?? err}` }));
        return;
      }
      const timers = this._timers;
      const conn = {
        ws,
        gen: 0,
        opened: false,
        openedAt: 0,
        ended: false,
        lastRx: timers.now(),
        /** @type {Set<any>} */
        timers: new Set(),
        /** @param {() => void} fn @param {number} ms */
        later: (fn, ms) => {
          if (conn.ended) return null;
          const id = timers.setTimeout(() => {
            conn.timers.delete(id);
            if (!conn.ended) fn();
          }, Math.max(0, ms));
          conn.timers.add(id);
          return id;
        },
        /** @param {any} disc @param {number} [closeCode] */
        finish: (disc, closeCode = 1000) => {
          if (conn.ended) return;
          conn.ended = true;
          if (this._attempt === conn) this._attempt = null;
          for (const id of conn.timers) timers.clearTimeout(id);
          conn.timers.clear();
          ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
          if (ws.readyState === 0 || ws.readyState === 1) {
            try {
              ws.close(closeCode, String(disc.reason ?? "").slice(0, 100));
            } catch {
              try {
                ws.close();
              } catch {
                /* already closing */
              }
            }
          }
          const d = newDisc(disc);
          d.opened = conn.opened;
          d.stable = conn.opened && timers.now() - conn.openedAt >= this.options.stableAfter * 1000;
          if (conn.opened) this._connectionEnded(conn, d);
          resolve(d);
        },
      };
      this._attempt = conn;
      conn.later(
        () => conn.finish({ reason: `connect timed out after ${this.options.connectTimeout}s` }),
        this.options.connectTimeout * 1000,
      );
      ws.onmessage = (/** @type {any} */ ev) => {
        const t3 = timers.now();
        conn.lastRx = t3;
        if (!conn.opened) {
          const welcome = decode(ev.data);
          if (!welcome || welcome.type !== "welcome") {
            conn.finish({ reason: "the first frame was not a welcome" });
            return;
          }
          for (const id of conn.timers) timers.clearTimeout(id);
          conn.timers.clear();
          conn.opened = true;
          conn.openedAt = t3;
          this._unauthorized = 0;
          if (ws.protocol && ws.protocol !== SUBPROTOCOL) {
            this.logger.warn?.(`revenge-ws: the server selected ${ws.protocol}, not ${SUBPROTOCOL}`);
          }
          this._serve(conn, welcome.data ?? {}, t3);
          return;
        }
        this._onFrame(ev.data, t3);
      };
      ws.onclose = (/** @type {any} */ ev) => {
        const code = ev.code === 1006 || ev.code === 1005 || !ev.code ? null : ev.code;
        const reason = ev.reason || (conn.opened ? "connection lost" : "connection failed");
        if (code === null) conn.finish({ code: null, reason });
        else conn.finish(this._closedByServer(code, reason));
      };
      ws.onerror = () => {
        /* a close event follows */
      };
    });
  }

  /** @param {number} code @param {string} reason */
  _closedByServer(code, reason) {
    let window = advisedWindow(reason, this.policy.maxWindow);
    if (window === null && (code === 1001 || code === 1012)) window = this._welcomeWindow;
    return newDisc({ code, reason, window });
  }

  /** @param {string} reason */
  _abort(reason) {
    const conn = this._conn;
    if (conn && !conn.ended) {
      this.logger.warn?.(`revenge-ws: closing the connection: ${reason}`);
      conn.finish({ code: null, reason }, 1000);
    }
  }

  /** Drop the current connection as if the network failed (tests, "reconnect" buttons). */
  dropConnection(reason = "dropped by the application") {
    this._abort(reason);
  }

  _serve(conn, welcome, t3) {
    this._gen += 1;
    conn.gen = this._gen;
    this._conn = conn;
    const items = this._onWelcome(welcome, t3, conn.gen);
    this._setState("connected");
    this._resync(conn, items, this._device ? this._hello(conn) : null);
    this._startPinger(conn);
    this._startWatchdog(conn);
    this._scheduleRefresh(conn);
  }

  _connectionEnded(conn, disc) {
    if (this._conn === conn) this._conn = null;
    this._connected = false;
    this._deviceActive = false;
    this._rejectPending(new ConnectionClosed(disc.code, disc.reason));
  }

  _onWelcome(data, t3, gen) {
    const previous = this.welcome;
    this.welcome = data;
    if (previous && previous.node_id !== data.node_id) this.clock.reset();
    this._coarseOffset = isNum(data.server_time) ? data.server_time - t3 : null;
    const hb = data.heartbeat && typeof data.heartbeat === "object" ? data.heartbeat : {};
    this._pingInterval = this.options.pingInterval || (isNum(hb.interval) && hb.interval > 0 ? hb.interval : 30);
    this._watchdog = this.options.watchdogTimeout || (isNum(hb.timeout) && hb.timeout > 0 ? hb.timeout : 90);
    this._expiresAt = isNum(data.expires_at) ? data.expires_at : null;
    let window = data.restart_window ?? data.reconnect?.restart_window;
    this._welcomeWindow = isNum(window) ? Math.min(Math.max(window, 0), this.policy.maxWindow) : null;
    const subs = Array.isArray(data.subscriptions) ? data.subscriptions.filter((e) => e && typeof e === "object") : [];
    this.logger.info?.(`revenge-ws: connected: session ${data.session_id} on node ${data.node_id}`);
    return this._tracker.onWelcome(subs, gen);
  }

  /** @param {Promise<void> | null} [hello] the device.hello in flight (sent first) */
  async _resync(conn, items, hello = null) {
    for (let i = 0; i < items.length; i += SUBSCRIBE_CHUNK) {
      const chunk = items.slice(i, i + SUBSCRIBE_CHUNK);
      const names = chunk.map((x) => (typeof x === "string" ? x : x.name));
      try {
        await this._call(
          "subscribe",
          { channels: chunk },
          this.options.requestTimeout * 1000,
          this._subscribeReply(names, conn.gen),
        );
      } catch (err) {
        if (err instanceof ConnectionClosed || conn.ended) return;
        this._tracker.cancel(names);
        this._abort(`re-subscribing failed: ${/** @type {any} */ (err)?.message ?? err}`);
        return;
      }
    }
    if (hello) await hello;
    if (conn.ended || this._conn !== conn) return;
    this._connected = true;
    this.stats.connects += 1;
    this._settleWaiters();
    this._emit("client.connected", { ...(this.welcome ?? {}) });
  }

  _startPinger(conn) {
    let n = 0;
    const loop = async () => {
      n += 1;
      try {
        await this._ping(Math.min(this.options.requestTimeout, this._watchdog) * 1000);
      } catch (err) {
        if (err instanceof ConnectionClosed) return;
        this.logger.debug?.("revenge-ws: ping failed", err);
      }
      const quick = n < this.options.initialPings;
      const wait = quick ? Math.min(this.options.initialPingInterval, this._pingInterval) : this._pingInterval;
      conn.later(loop, wait * 1000);
    };
    loop();
  }

  /** Reconnect when nothing arrives for heartbeat.timeout (pongs arrive every interval). */
  _startWatchdog(conn) {
    const limit = () => this._watchdog * 1000;
    const check = () => {
      const idle = this._timers.now() - conn.lastRx;
      if (idle >= limit()) {
        this.stats.watchdogFired += 1;
        this.logger.warn?.(`revenge-ws: nothing received for ${this._watchdog}s: reconnecting`);
        conn.finish({ code: null, reason: `watchdog: nothing received for ${this._watchdog}s` });
        return;
      }
      conn.later(check, limit() - idle);
    };
    conn.later(check, limit());
  }

  _scheduleRefresh(conn) {
    const margin = this.options.refreshMargin;
    if (!this._provider || margin == null) return;
    const expires = this._expiresAt;
    if (expires == null) return;
    const remaining = (expires - this.serverTime()) / 1000;
    if (remaining <= 0) return; // too late: the server closes with 4001 and we reconnect
    const wait = Math.max(remaining - Math.min(margin, remaining / 2), 0);
    conn.later(async () => {
      let token;
      let reply;
      try {
        token = await /** @type {Function} */ (this._provider)();
        reply = await this._call("auth.refresh", { token }, this.options.requestTimeout * 1000);
      } catch (err) {
        if (err instanceof ConnectionClosed || conn.ended) return;
        this.logger.warn?.(`revenge-ws: token refresh failed: ${/** @type {any} */ (err)?.name ?? err}`);
        const left = (expires - this.serverTime()) / 1000;
        conn.later(() => this._scheduleRefresh(conn), Math.max(MIN_REFRESH_GAP, Math.min(30, left / 4)) * 1000);
        return;
      }
      this._token = token;
      this.stats.tokenRefreshes += 1;
      const next = reply.data?.expires_at;
      if (isNum(next)) this._expiresAt = next;
      conn.later(() => this._scheduleRefresh(conn), MIN_REFRESH_GAP * 1000);
    }, wait * 1000);
  }

  // -- internals: incoming -------------------------------------------------------------

  _onFrame(raw, t3) {
    const msg = decode(raw);
    if (!msg) {
      this.stats.invalidFrames += 1;
      this.logger.warn?.("revenge-ws: ignored a frame that is not a JSON object");
      return;
    }
    const type = msg.type;
    const id = msg.id;
    if (id != null && REPLY_TYPES.has(type)) {
      const pending = this._pending.get(String(id));
      if (!pending) return; // late or unknown reply
      this._pending.delete(String(id));
      this._timers.clearTimeout(pending.timer);
      if (pending.onReply) {
        try {
          pending.onReply(msg, t3);
        } catch (err) {
          this.logger.error?.("revenge-ws: applying a reply failed", err);
        }
      }
      pending.resolve(msg);
      return;
    }
    if (typeof type !== "string") {
      this.stats.invalidFrames += 1;
      return;
    }
    if (type === "welcome") return;
    if (type === "remote.command" && msg.channel == null) {
      this._onRemoteCommand(msg).catch((err) => this.logger.error?.("revenge-ws: remote command failed", err));
    } else if (type === "device.ended" && msg.channel == null) this._onDeviceEnded(msg);
    if (type === "subscription.reset") {
      this._onReset(msg);
      return;
    }
    if (type === "subscription.added") {
      const entry = msg.data ?? {};
      const ok = this._tracker.onAdded(entry, this._gen);
      this._deliver(msg);
      if (!ok) this._recoveryFailed(entry.channel, entry.epoch, entry.seq, "the server continued the channel in another epoch", entry.latest);
      return;
    }
    if (type === "subscription.ended") {
      const name = msg.data?.channel;
      if (typeof name === "string") this._tracker.forget(name);
      this._deliver(msg);
      return;
    }
    const { channel, epoch, seq } = msg;
    let verdict;
    if (type === "notification") verdict = this._tracker.onNotification(msg);
    else if (typeof channel === "string" && typeof epoch === "string" && isInt(seq)) {
      verdict = this._tracker.onPublication(channel, epoch, seq);
    } else verdict = Verdict.DELIVER;
    switch (verdict) {
      case Verdict.DELIVER:
        this._deliver(msg);
        break;
      case Verdict.DUPLICATE:
        this.stats.duplicates += 1;
        break;
      case Verdict.HELD:
        this.stats.held += 1;
        break;
      case Verdict.GAP:
      case Verdict.DELIVER_AND_RECOVER:
        if (verdict === Verdict.DELIVER_AND_RECOVER) this._deliver(msg);
        else this.stats.gaps += 1;
        if (typeof channel === "string") this._recover([channel], this._gen);
        break;
      default:
        break;
    }
  }

  async _recover(names, gen) {
    const items = this._tracker.itemsFor(names);
    try {
      await this._call("subscribe", { channels: items }, this.options.requestTimeout * 1000, this._subscribeReply(names, gen));
    } catch (err) {
      if (err instanceof RequestError) this.logger.warn?.(`revenge-ws: recovering ${names} failed: ${err.message}`);
      else if (err instanceof RequestTimeout) {
        this._tracker.cancel(names);
        this._abort("recovery request timed out");
      }
    }
  }

  _onReset(msg) {
    const d = msg.data ?? {};
    if (typeof d.channel !== "string" || typeof d.epoch !== "string" || !isInt(d.seq)) return;
    this._tracker.onReset(d.channel, d.epoch, d.seq);
    this._deliver(msg);
    this._recoveryFailed(d.channel, d.epoch, d.seq, String(d.reason || "reset"), null);
  }

  _recoveryFailed(channel, epoch, seq, reason, latest) {
    this.stats.recoveryFailures += 1;
    const cb = this._onRecoveryFailed;
    if (cb) {
      try {
        /** @type {any} */
        const r = cb(channel);
        if (r && typeof r.then === "function") r.then(undefined, (/** @type {any} */ e) => this.logger.error?.(e));
      } catch (err) {
        this.logger.error?.("revenge-ws: onRecoveryFailed failed", err);
      }
    }
    /** @type {Record<string, any>} */
    const event = { channel, epoch, seq, reason };
    if (latest != null) event.latest = latest;
    this._emit("client.recovery_failed", event);
  }

  _deliver(msg) {
    this.stats.delivered += 1;
    const keys = new Set([msg.type, msg.channel, "*"]);
    for (const key of keys) if (typeof key === "string") this._dispatch(key, msg, this.logger);
  }

  /** @param {string} type @param {Record<string, any>} data */
  _emit(type, data) {
    this._dispatch(type, { type, data }, this.logger);
  }
}

/** @param {Record<string, any>} d */
function newDisc(d = {}) {
  return {
    code: d.code ?? null,
    reason: d.reason ?? "",
    httpStatus: d.httpStatus ?? null,
    retryAfter: d.retryAfter ?? null,
    window: d.window ?? null,
    opened: false,
    stable: false,
  };
}

function discEvent(disc, delay) {
  return {
    code: disc.code,
    reason: disc.reason,
    http_status: disc.httpStatus,
    reconnect_in: delay,
    opened: disc.opened,
  };
}

// ------------------------------------------------------------------------------ devices

/** Commands the hub validates (contract §13); names starting with `x-` are a device's own. */
export const REMOTE_COMMANDS = Object.freeze([
  "play",
  "pause",
  "unpause",
  "toggle_pause",
  "stop",
  "seek",
  "next",
  "previous",
  "set_volume",
  "mute",
  "unmute",
  "display_message",
]);

const DEFAULT_COMMAND_TIMEOUT_MS = 10000;
const PLAYBACK_STATES = new Set(["playing", "paused", "buffering", "stopped"]);
const PLAYBACK_ALIASES = {
  itemId: "item_id",
  itemType: "item_type",
  playMethod: "play_method",
  transcodeJobId: "transcode_job_id",
  roomId: "room_id",
};

function randomId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  return `d-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
}

/**
 * The `device.hello` data of a device configuration (camelCase or wire names).
 * @param {Record<string, any>} cfg
 */
export function deviceHello(cfg) {
  if (!cfg || typeof cfg !== "object") throw new TypeError("a device needs a configuration object");
  const commands = Array.isArray(cfg.commands) ? cfg.commands.map(String) : [];
  const caps = cfg.capabilities && typeof cfg.capabilities === "object" ? cfg.capabilities : {};
  const hello = {
    device_id: String(cfg.deviceId ?? cfg.device_id ?? randomId()),
    name: String(cfg.name ?? "Web browser"),
    client: String(cfg.client ?? "revenge-ws.js"),
    version: String(cfg.version ?? VERSION),
    capabilities: {
      remote_control: Boolean(cfg.remoteControl ?? caps.remote_control ?? commands.length > 0),
      commands: commands.length ? commands : Array.isArray(caps.commands) ? caps.commands.map(String) : [],
    },
  };
  if (hello.device_id.length < 1 || hello.device_id.length > 128) throw new RangeError("deviceId must have 1-128 characters");
  if (hello.name.length < 1 || hello.name.length > 100) throw new RangeError("a device name must have 1-100 characters");
  if (hello.client.length < 1 || hello.client.length > 100) throw new RangeError("a client name must have 1-100 characters");
  if (hello.version.length > 50) throw new RangeError("a version must have at most 50 characters");
  return hello;
}

/**
 * The `playback.update` data of a report (wire names or camelCase aliases; null and
 * undefined fields left out).
 * @param {Record<string, any>} report
 */
export function playbackData(report) {
  if (!report || typeof report !== "object") throw new TypeError("reportPlayback needs an object");
  /** @type {Record<string, any>} */
  const data = {};
  for (const [k, v] of Object.entries(report)) {
    if (v === undefined || v === null) continue;
    data[/** @type {Record<string, string>} */ (PLAYBACK_ALIASES)[k] ?? k] = v;
  }
  if (typeof data.item_id !== "string" || data.item_id.length < 1) throw new RangeError("a playback report needs an item_id");
  if (!PLAYBACK_STATES.has(data.state)) throw new RangeError(`state must be one of ${[...PLAYBACK_STATES].join(", ")}`);
  if (!isNum(data.position) || data.position < 0) throw new RangeError("position must be a number >= 0 (seconds)");
  data.position = round3(data.position);
  if (isNum(data.duration)) data.duration = round3(Math.max(0, data.duration));
  return data;
}

/**
 * Where a device's `now_playing` is at server time `serverNow` (ms): its position,
 * extrapolated from `updated_at` while playing (capped at the duration).
 * @param {Record<string, any> | null | undefined} np
 * @param {number} serverNow
 */
export function nowPlayingPosition(np, serverNow) {
  if (!np || !isNum(np.position)) return 0;
  let pos = np.position;
  if (np.state === "playing" && isNum(np.updated_at) && serverNow > np.updated_at) {
    pos += ((serverNow - np.updated_at) / 1000) * (isNum(np.rate) ? np.rate : 1);
  }
  if (isNum(np.duration) && np.duration > 0) pos = Math.min(pos, np.duration);
  return Math.max(0, pos);
}

/** @param {unknown} err */
function errorData(err) {
  const e = /** @type {any} */ (err);
  return { code: e?.code ?? null, message: String(e?.message ?? e) };
}

/** @param {any} d */
function deviceKey(d) {
  return `${d.user_id}\u0000${d.device_id}`;
}

/**
 * Devices kept live: `devices.list`, then `device.updated` / `device.removed` (the user's
 * own, on `user:{id}`) or, with `all: true` (admins), `sessions.updated` on the `sessions`
 * channel. Reloads after every reconnect and after a failed recovery. Event: `change`
 * (the sorted list).
 *
 *     const devices = new DeviceList(client);            // or { all: true } for admins
 *     devices.on("change", (list) => render(list));
 *     await devices.start();
 */
export class DeviceList extends Emitter {
  /**
   * @param {RevengeClient} client
   * @param {{all?: boolean, userId?: string}} [opts]
   */
  constructor(client, opts = {}) {
    super();
    this.client = client;
    this.all = Boolean(opts.all);
    this.userId = opts.userId ?? null;
    /** @type {Map<string, any>} */
    this.devices = new Map();
    this.loaded = false;
    /** @type {unknown} */
    this.error = null;
    this._offs = /** @type {(() => void)[]} */ ([]);
    this._gen = 0;
    /** @type {Set<string> | null} keys removed while a list was loading */
    this._removed = null;
    /** @type {Set<string> | null} keys updated while a list was loading */
    this._touched = null;
    this._started = false;
  }

  /** Follow the devices; resolves once the first list is in (or failed: see `error`). */
  async start() {
    if (this._started) return;
    this._started = true;
    const c = this.client;
    const on = (/** @type {string} */ key, /** @type {(m: any) => void} */ fn) => this._offs.push(c.on(key, fn));
    const mine = (/** @type {any} */ msg) => typeof msg.channel === "string" && msg.channel.startsWith("user:");
    on("device.updated", (msg) => {
      if (!mine(msg) || !msg.data?.device) return;
      if (this.all || this._wanted(msg.data.device.user_id)) this._put(msg.data.device) && this._changed();
    });
    on("device.removed", (msg) => {
      if (!mine(msg) || !msg.data?.device_id) return;
      const userId = msg.data.user_id ?? msg.channel.slice(5);
      if (this._drop(userId, msg.data.device_id)) this._changed();
    });
    on("sessions.updated", (msg) => {
      if (!this.all) return;
      const d = msg.data ?? {};
      let changed = false;
      for (const dev of Array.isArray(d.devices) ? d.devices : []) changed = this._put(dev) || changed;
      for (const r of Array.isArray(d.removed) ? d.removed : []) changed = this._drop(r.user_id, r.device_id) || changed;
      if (changed) this._changed();
    });
    on("client.connected", async () => {
      await this._follow();
      await this.reload();
    });
    on("client.recovery_failed", (ev) => {
      const ch = ev.data?.channel ?? "";
      if (ch === "sessions" || ch.startsWith("user:")) this.reload();
    });
    if (c.connected) {
      await this._follow();
      await this.reload();
    }
  }

  /** With `all`: subscribe `sessions` (once; the client keeps it across reconnects). */
  async _follow() {
    const c = this.client;
    if (!this.all || c.channels.includes("sessions")) return;
    try {
      await c.subscribe("sessions");
    } catch (err) {
      this.error = err;
    }
  }

  /** Stop following (the `sessions` subscription stays with the client). */
  stop() {
    for (const off of this._offs.splice(0)) off();
    this._started = false;
    this._gen += 1;
  }

  /** Load the list again (after a reconnect the client does it by itself). */
  async reload() {
    const gen = ++this._gen;
    this._removed = new Set();
    this._touched = new Set();
    let list;
    try {
      list = await this.client.listDevices(this.all ? { all: true } : this.userId ? { userId: this.userId } : {});
    } catch (err) {
      if (gen === this._gen) {
        this.error = err;
        this._removed = this._touched = null;
        this._dispatch("error", err, this.client.logger);
      }
      return;
    }
    if (gen !== this._gen) return;
    const removed = this._removed;
    const touched = this._touched;
    this._removed = this._touched = null;
    /** @type {Map<string, any>} */
    const next = new Map();
    for (const d of list) {
      if (!d || typeof d !== "object") continue;
      const key = deviceKey(d);
      if (removed.has(key)) continue;
      const cur = this.devices.get(key);
      next.set(key, cur && touched.has(key) && (cur.updated_at ?? 0) > (d.updated_at ?? 0) ? cur : d);
    }
    for (const key of touched) if (!next.has(key) && this.devices.has(key)) next.set(key, this.devices.get(key));
    this.devices = next;
    this.error = null;
    this.loaded = true;
    this._changed();
  }

  /** The devices, by user then name. */
  list() {
    return [...this.devices.values()].sort(
      (a, b) => String(a.user_id).localeCompare(String(b.user_id)) || String(a.name).localeCompare(String(b.name)) || String(a.device_id).localeCompare(String(b.device_id)),
    );
  }

  /** @param {string} deviceId @param {string} [userId] */
  get(deviceId, userId) {
    for (const d of this.devices.values()) if (d.device_id === deviceId && (userId == null || d.user_id === userId)) return d;
    return null;
  }

  get size() {
    return this.devices.size;
  }

  /** @param {string} userId */
  _wanted(userId) {
    return this.userId == null ? userId === this.client.userId || userId == null : userId === this.userId;
  }

  /** @param {any} dev */
  _put(dev) {
    if (!dev || typeof dev.device_id !== "string") return false;
    const d = dev.user_id == null ? { ...dev, user_id: this.client.userId } : dev;
    const key = deviceKey(d);
    const cur = this.devices.get(key);
    if (cur && isNum(cur.updated_at) && isNum(d.updated_at) && cur.updated_at > d.updated_at) return false;
    this.devices.set(key, d);
    this._touched?.add(key);
    this._removed?.delete(key);
    return true;
  }

  /** @param {string} userId @param {string} deviceId */
  _drop(userId, deviceId) {
    const key = deviceKey({ user_id: userId, device_id: deviceId });
    this._removed?.add(key);
    this._touched?.delete(key);
    return this.devices.delete(key);
  }

  _changed() {
    this._dispatch("change", this.list(), this.client.logger);
  }
}

// ------------------------------------------------------------------------------ presence

/** @param {unknown} value @returns {{user_id: string, name: string}[]} */
function presenceUsers(value) {
  if (!Array.isArray(value)) return [];
  const out = [];
  for (const e of value) {
    if (e && typeof e === "object" && typeof e.user_id === "string") {
      out.push({ user_id: e.user_id, name: typeof e.name === "string" ? e.name : e.user_id });
    }
  }
  return out;
}

/**
 * The data of an `activity.presence` message (contract §11), malformed entries dropped;
 * null for any other message.
 * @param {any} msg
 * @returns {{online: {user_id: string, name: string}[], offline: {user_id: string, name: string}[], more?: {online: number, offline: number}} | null}
 */
export function parsePresence(msg) {
  if (msg?.type !== "activity.presence") return null;
  const data = msg.data;
  if (!data || typeof data !== "object" || Array.isArray(data)) return null;
  const change = { online: presenceUsers(data.online), offline: presenceUsers(data.offline) };
  // A large batch names some users and counts the rest (extension f28).
  const more = data.more;
  if (more && typeof more === "object" && Number.isInteger(more.online) && Number.isInteger(more.offline)) {
    change.more = { online: more.online, offline: more.offline };
  }
  return change;
}

/**
 * Who is online, kept from `activity.presence` messages (a port of the Python client's
 * OnlineUsers). The hub sends net changes at most once a second and no snapshot, so it knows
 * the users whose changes it has seen since it started:
 *
 *     const online = new OnlineUsers();
 *     client.on("activity.presence", (msg) => online.apply(msg));
 *     await client.subscribe("activity");
 */
export class OnlineUsers {
  constructor() {
    /** @type {Map<string, string>} user_id -> name, in the order they came online */
    this.users = new Map();
  }

  /**
   * Apply one message (others are ignored); returns the change it carried, or null.
   * @param {any} msg
   */
  apply(msg) {
    const change = parsePresence(msg);
    if (!change) return null;
    // The hub names a user in one list at most; were both to name one, the user stays
    // listed (offline first), as a dropped entry would not come back.
    for (const u of change.offline) this.users.delete(u.user_id);
    for (const u of change.online) this.users.set(u.user_id, u.name);
    return change;
  }

  /** @param {string} userId */
  has(userId) {
    return this.users.has(userId);
  }

  get size() {
    return this.users.size;
  }

  clear() {
    this.users.clear();
  }
}

// ------------------------------------------------------------------------------ SyncPlay

/** Correction tuning, the same defaults as revenge_ws.client.syncplay.SyncConfig. */
export const DEFAULT_SYNC_CONFIG = Object.freeze({
  deadBandS: 0.06,
  releaseBandS: 0.02,
  seekThresholdS: 3.0,
  maxNudge: 0.08,
  nudgeHorizonS: 2.0,
  rateStep: 0.01,
  pausedToleranceS: 0.1,
  seekSettleMs: 500.0,
  seekCooldownMs: 2000.0,
  seekCooldownMaxMs: 30000.0,
});

/** Where the room is: at server time `when` at `position`, advancing at `rate` when playing. */
export class Timeline {
  constructor(position, when, rate, playing) {
    this.position = position;
    this.when = when;
    this.rate = rate;
    this.playing = playing;
  }
  at(nowMs) {
    if (!this.playing || nowMs <= this.when) return this.position;
    return this.position + ((nowMs - this.when) / 1000) * this.rate;
  }
  running(nowMs) {
    return this.playing && nowMs >= this.when;
  }
}

/**
 * Drive a player from `syncplay.command`/`state`/`sync` messages, with hysteresis:
 * under deadBandS (60 ms) nothing; above, a proportional rate nudge kept until within
 * releaseBandS (20 ms) or the sign flips; from seekThresholdS (3 s) a seek, spaced by a
 * doubling cooldown. Pure logic: reads the clock from `serverTime()` (or `now`).
 */
export class SyncController {
  /**
   * @param {import("./revenge-ws").Player} player
   * @param {() => number} serverTime
   * @param {Partial<import("./revenge-ws").SyncConfig>} [config]
   */
  constructor(player, serverTime, config = {}) {
    const c = { ...DEFAULT_SYNC_CONFIG, ...config };
    if (!(0 <= c.releaseBandS && c.releaseBandS < c.deadBandS && c.deadBandS < c.seekThresholdS)) {
      throw new RangeError("need 0 <= releaseBandS < deadBandS < seekThresholdS");
    }
    if (!(0 < c.maxNudge && c.maxNudge < 1) || c.nudgeHorizonS <= 0) {
      throw new RangeError("need 0 < maxNudge < 1 and nudgeHorizonS > 0");
    }
    this.player = player;
    this.serverTime = serverTime;
    this.config = c;
    /** @type {Timeline | null} */
    this.timeline = null;
    this.commandSeq = -1;
    this.seeks = 0;
    this.rateChanges = 0;
    this.directionChanges = 0;
    this._nudge = 0;
    this._lastNudge = 0;
    /** @type {number | null} */
    this._lastSeekAt = null;
    this._seekStreak = 0;
    this._obey = false;
  }

  /** Apply a `syncplay.command` payload; returns the actions taken right away. */
  onCommand(cmd, now) {
    const seq = cmd.command_seq;
    if (isInt(seq)) {
      if (seq <= this.commandSeq) return [];
      this.commandSeq = seq;
    }
    let playing;
    if (cmd.command === "play") playing = true;
    else if (cmd.command === "pause") playing = false;
    else playing = this.timeline ? this.timeline.playing : false;
    this.timeline = new Timeline(Number(cmd.position), Number(cmd.when), Number(cmd.rate ?? 1), playing);
    this._obey = true;
    return this.tick(now);
  }

  /** Adopt a `syncplay.state` payload unless a newer command is already known. */
  onState(state, now) {
    const seq = state.command_seq;
    if (isInt(seq)) {
      if (this.timeline && seq <= this.commandSeq) return this.tick(now);
      this.commandSeq = Math.max(this.commandSeq, seq);
    }
    const when = state.when ?? state.updated_at ?? 0;
    this.timeline = new Timeline(Number(state.position), Number(when), Number(state.rate ?? 1), state.state === "playing");
    this._obey = true;
    return this.tick(now);
  }

  /** Adopt a `syncplay.sync` hint. */
  onSync(hint, now) {
    const rate = this.timeline ? this.timeline.rate : 1;
    this.timeline = new Timeline(Number(hint.target_position), Number(hint.at), rate, Boolean(hint.should_be_playing));
    return this.tick(now);
  }

  /** The data of a `syncplay.report` (send it every 5 s). */
  report(rttMs = null, isBuffering = false) {
    /** @type {Record<string, any>} */
    const data = {
      position: Math.round(Math.max(0, this.player.position()) * 1000) / 1000,
      is_playing: this.player.isPlaying(),
      is_buffering: isBuffering,
      rtt_ms: rttMs,
    };
    if (this.commandSeq >= 0) data.command_seq = this.commandSeq;
    return data;
  }

  /** The position the room is at now (seconds), or null before any state. */
  target(now) {
    const t = now ?? this.serverTime();
    return this.timeline ? this.timeline.at(t) : null;
  }

  /** Compare the player with the timeline at `now` (server ms) and correct it. */
  tick(now) {
    const t = now ?? this.serverTime();
    const tl = this.timeline;
    if (!tl) return [];
    /** @type {{kind: string, value?: number}[]} */
    const actions = [];
    try {
      this._correct(tl, t, actions);
    } finally {
      this._obey = false;
    }
    return actions;
  }

  _correct(tl, t, actions) {
    const target = tl.at(t);
    const diff = this.player.position() - target; // > 0: ahead of the room
    const cfg = this.config;
    if (!tl.running(t)) {
      if (this.player.isPlaying()) {
        this.player.pause();
        actions.push({ kind: "pause" });
      }
      this._release(tl.rate, actions);
      if (Math.abs(diff) > cfg.pausedToleranceS) this._seek(target, t, actions);
      else this._seekStreak = 0;
      return;
    }
    if (!this.player.isPlaying()) {
      this.player.play();
      actions.push({ kind: "play" });
    }
    const settling = this._lastSeekAt !== null && t - this._lastSeekAt < cfg.seekSettleMs;
    if (settling && !this._obey) return;
    if (Math.abs(diff) >= cfg.seekThresholdS) {
      if (this._seek(target, t, actions)) {
        this._release(tl.rate, actions);
        return;
      }
    } else this._seekStreak = 0;
    this._steer(diff, tl.rate, actions);
  }

  _seek(target, t, actions) {
    const cfg = this.config;
    if (this._obey) this._seekStreak = 0;
    else if (this._lastSeekAt !== null) {
      const cooldown = Math.min(cfg.seekCooldownMaxMs, cfg.seekCooldownMs * 2 ** this._seekStreak);
      if (t - this._lastSeekAt < cooldown) return false;
      this._seekStreak += 1;
    }
    this.player.seek(target);
    this._lastSeekAt = t;
    this.seeks += 1;
    actions.push({ kind: "seek", value: target });
    return true;
  }

  _steer(diff, base, actions) {
    const cfg = this.config;
    const want = diff > 0 ? -1 : 1;
    if (this._nudge === 0) {
      if (Math.abs(diff) <= cfg.deadBandS) {
        this._setRate(base, actions);
        return;
      }
      this._nudge = want;
      if (this._lastNudge && want !== this._lastNudge) this.directionChanges += 1;
      this._lastNudge = want;
    } else if (Math.abs(diff) <= cfg.releaseBandS || want !== this._nudge) {
      this._release(base, actions);
      return;
    }
    const size = Math.min(cfg.maxNudge, Math.abs(diff) / cfg.nudgeHorizonS);
    const rate = base * (1 + this._nudge * size);
    if (Math.abs(rate - this.player.rate) >= cfg.rateStep * base) this._setRate(rate, actions);
  }

  _release(base, actions) {
    this._nudge = 0;
    this._setRate(base, actions);
  }

  _setRate(rate, actions) {
    if (Math.abs(this.player.rate - rate) < 1e-9) return;
    this.player.setRate(rate);
    this.rateChanges += 1;
    actions.push({ kind: "rate", value: rate });
  }
}

/**
 * The Player interface over an HTMLMediaElement. A play() refused by the autoplay policy is
 * retried muted once (browsers allow muted autoplay); `onAutoplayBlocked` tells the page so it
 * can offer an "unmute" button.
 */
export class MediaElementPlayer {
  /**
   * @param {HTMLMediaElement} el
   * @param {{autoMute?: boolean, onAutoplayBlocked?: (muted: boolean) => void}} [opts]
   */
  constructor(el, opts = {}) {
    this.el = el;
    this.autoMute = opts.autoMute ?? true;
    this.onAutoplayBlocked = opts.onAutoplayBlocked ?? null;
    this._playing = false;
    this._blockedAt = -Infinity;
  }
  position() {
    return this.el.currentTime;
  }
  isPlaying() {
    return this._playing || !this.el.paused;
  }
  get rate() {
    return this.el.playbackRate;
  }
  setRate(rate) {
    this.el.playbackRate = rate;
  }
  seek(position) {
    const d = this.el.duration;
    const p = Number.isFinite(d) && d > 0 ? Math.min(Math.max(0, position), d) : Math.max(0, position);
    this.el.currentTime = p;
  }
  play() {
    if (Date.now() - this._blockedAt < 2000) return;
    this._playing = true;
    const p = this.el.play();
    if (p && typeof p.then === "function") {
      p.then(
        () => {
          this._playing = false;
        },
        (err) => {
          this._playing = false;
          if (err && err.name === "NotAllowedError") {
            this._blockedAt = Date.now();
            if (this.autoMute && !this.el.muted) {
              this.el.muted = true;
              this._blockedAt = -Infinity;
              this.onAutoplayBlocked?.(true);
            } else this.onAutoplayBlocked?.(false);
          }
        },
      );
    } else this._playing = false;
  }
  pause() {
    this._playing = false;
    this.el.pause();
  }
}

/**
 * A SyncPlay room session: joins or creates a room over a RevengeClient and keeps a media
 * element on the room's timeline. Events: `room`, `state`, `command`, `members`, `chat`,
 * `ended`, `sync`, `error`, `autoplay-blocked` (`sp.on(name, fn)`).
 */
export class SyncPlay extends Emitter {
  /**
   * @param {RevengeClient} client
   * @param {HTMLMediaElement | import("./revenge-ws").Player} media
   * @param {import("./revenge-ws").SyncPlayOptions} [opts]
   */
  constructor(client, media, opts = {}) {
    super();
    this.client = client;
    this.el = isMediaElement(media) ? /** @type {HTMLMediaElement} */ (media) : null;
    this.player = this.el
      ? new MediaElementPlayer(this.el, { onAutoplayBlocked: (muted) => this._dispatch("autoplay-blocked", { muted }, client.logger) })
      : /** @type {any} */ (media);
    this.controller = new SyncController(this.player, () => client.serverTime(), opts.config);
    this.tickInterval = (opts.tickInterval ?? 0.25) * 1000;
    this.reportInterval = (opts.reportInterval ?? 5) * 1000;
    this.bufferingDebounce = (opts.bufferingDebounce ?? 0.75) * 1000;
    this._timers = { ...DEFAULT_TIMERS, ...(opts.timers ?? {}) };
    this.precisionMs = opts.precisionMs ?? 50;
    /** @type {any} */
    this._whenToken = null;
    /** @type {(() => void)[]} */
    this._yieldQueue = [];
    /** @type {MessageChannel | null} */
    this._channel = null;
    if (!opts.timers && typeof globalThis.MessageChannel === "function") {
      this._channel = new MessageChannel();
      this._channel.port1.onmessage = () => this._yieldQueue.shift()?.();
    }
    /** @type {Record<string, any> | null} */
    this.room = null;
    /** @type {Record<string, any> | null} */
    this.state = null;
    /** @type {Map<string, any>} */
    this.members = new Map();
    this.ready = false;
    this.buffering = false;
    this._password = null;
    this._offs = /** @type {(() => void)[]} */ ([]);
    this._tickTimer = null;
    this._reportTimer = null;
    this._whenTimer = null;
    this._bufferTimer = null;
    this._media = /** @type {(() => void)[]} */ ([]);
    this._rejoining = false;
  }

  get roomId() {
    return this.room?.room_id ?? null;
  }
  get isLeader() {
    return !!this.room && this.room.leader_id === this.client.userId;
  }

  /** Create a room (the creator joins it as leader); resolves with the room. */
  async create(data) {
    const ack = await this.client.request("syncplay.create", data);
    this._enter(ack);
    return this.room;
  }

  /**
   * Join a room by id (with `password`) or by invitation code.
   * @param {string | null} roomId
   * @param {{password?: string, inviteCode?: string}} [opts]
   */
  async join(roomId, opts = {}) {
    /** @type {Record<string, any>} */
    const data = {};
    if (roomId) data.room_id = roomId;
    if (opts.password) data.password = opts.password;
    if (opts.inviteCode) data.invite_code = opts.inviteCode;
    const rtt = this.client.rtt; // min-delay, not rttLatest: the hub's lead is 2 × the worst RTT
    if (rtt != null) data.rtt_ms = Math.round(rtt * 10) / 10;
    const ack = await this.client.request("syncplay.join", data);
    this._password = opts.password ?? null;
    this._enter(ack);
    return ack;
  }

  /** Leave the room (the player stays where it is). */
  async leave() {
    const id = this.roomId;
    this._exit();
    if (id) await this.client.request("syncplay.leave", { room_id: id });
  }

  /** End the room for everyone (leader). */
  async end() {
    const id = this.roomId;
    if (id) await this.client.request("syncplay.end", { room_id: id });
  }

  play() {
    return this._control("syncplay.play", {});
  }
  pause(position) {
    return this._control("syncplay.pause", position == null ? {} : { position: round3(position) });
  }
  seek(position) {
    return this._control("syncplay.seek", { position: round3(Math.max(0, position)) });
  }
  setRate(rate) {
    return this._control("syncplay.rate", { rate });
  }
  chat(message) {
    return this.client.request("syncplay.chat", { room_id: this.roomId, message });
  }
  invite(userId) {
    return this.client.request("syncplay.invite", userId ? { room_id: this.roomId, user_id: userId } : { room_id: this.roomId });
  }
  /** The room's position now (seconds), or null. */
  target() {
    return this.controller.target();
  }

  /** Stop driving the player and forget the room (without telling the server). */
  detach() {
    this._exit();
  }

  // -- internals

  _control(type, extra) {
    if (!this.roomId) return Promise.reject(new RevengeError("not in a room", "NOT_FOUND"));
    /** @type {Record<string, any>} */
    const data = { room_id: this.roomId, ...extra };
    if (this.controller.commandSeq >= 0) data.command_seq = this.controller.commandSeq;
    return this.client.request(type, data);
  }

  _enter(ack) {
    const first = !this.room;
    this.room = ack.room ?? this.room;
    if (Array.isArray(ack.members)) {
      this.members = new Map(ack.members.map((m) => [m.user_id, m]));
      this._dispatch("members", [...this.members.values()], this.client.logger);
    }
    if (first) this._attach();
    this._dispatch("room", this.room, this.client.logger);
    if (ack.state) this._onState(ack.state);
    this._checkReady();
  }

  _attach() {
    const c = this.client;
    const on = (key, fn) => this._offs.push(c.on(key, fn));
    const mine = (/** @type {any} */ msg) => this.room && (msg.channel === `playback:${this.room.room_id}` || msg.data?.room_id === this.room.room_id);
    on("syncplay.state", (msg) => mine(msg) && this._onState(msg.data));
    on("syncplay.command", (msg) => {
      if (!mine(msg)) return;
      this._dispatch("command", msg.data, c.logger);
      this.controller.onCommand(msg.data);
      this._scheduleWhen(msg.data.when);
    });
    on("syncplay.sync", (msg) => {
      if (!mine(msg)) return;
      this._dispatch("sync", msg.data, c.logger);
      this.controller.onSync(msg.data);
    });
    for (const t of ["syncplay.member_joined", "syncplay.member_updated"]) {
      on(t, (msg) => {
        if (!mine(msg) || !msg.data?.user_id) return;
        this.members.set(msg.data.user_id, { ...(this.members.get(msg.data.user_id) ?? {}), ...msg.data });
        if (msg.data.is_leader && this.room) this.room.leader_id = msg.data.user_id;
        this._dispatch("members", [...this.members.values()], c.logger);
      });
    }
    on("syncplay.member_left", (msg) => {
      if (!mine(msg)) return;
      this.members.delete(msg.data?.user_id);
      this._dispatch("members", [...this.members.values()], c.logger);
    });
    on("syncplay.room_updated", (msg) => {
      if (!mine(msg)) return;
      const contentChanged = JSON.stringify(msg.data?.room?.content) !== JSON.stringify(this.room?.content);
      this.room = { ...this.room, ...(msg.data?.room ?? {}) };
      if (contentChanged) this.ready = false;
      this._dispatch("room", this.room, c.logger);
      this._checkReady();
    });
    on("syncplay.chat", (msg) => mine(msg) && this._dispatch("chat", msg.data, c.logger));
    on("syncplay.ended", (msg) => {
      if (!mine(msg)) return;
      const data = msg.data;
      this._exit();
      this._dispatch("ended", data, c.logger);
    });
    on("client.connected", () => this._rejoin());
    this._tickTimer = this._every(() => this.controller.tick(), this.tickInterval);
    this._reportTimer = this._every(() => this._report(), this.reportInterval);
    if (this.el) {
      const el = this.el;
      const listen = (/** @type {string} */ name, /** @type {() => void} */ fn) => {
        el.addEventListener(name, fn);
        this._media.push(() => el.removeEventListener(name, fn));
      };
      listen("canplay", () => this._checkReady());
      listen("canplaythrough", () => this._checkReady());
      listen("playing", () => this._bufferEnd());
      listen("seeked", () => this._checkReady());
      listen("waiting", () => this._bufferStart());
      listen("loadstart", () => {
        this.ready = false;
      });
    }
  }

  _every(fn, ms) {
    const timers = this._timers;
    const state = { id: /** @type {any} */ (null), stopped: false };
    const loop = () => {
      if (state.stopped) return;
      try {
        fn();
      } catch (err) {
        this.client.logger.error?.("revenge-ws syncplay:", err);
      }
      state.id = timers.setTimeout(loop, ms);
    };
    state.id = timers.setTimeout(loop, ms);
    return () => {
      state.stopped = true;
      timers.clearTimeout(state.id);
    };
  }

  _exit() {
    for (const off of this._offs.splice(0)) off();
    for (const off of this._media.splice(0)) off();
    for (const stop of [this._tickTimer, this._reportTimer]) if (stop) stop();
    this._tickTimer = this._reportTimer = null;
    if (this._whenTimer !== null) this._timers.clearTimeout(this._whenTimer);
    if (this._bufferTimer !== null) this._timers.clearTimeout(this._bufferTimer);
    this._whenTimer = this._bufferTimer = null;
    this._whenToken = null;
    this.room = null;
    this.state = null;
    this.ready = false;
    this.buffering = false;
    this.members = new Map();
  }

  _onState(state) {
    this.state = state;
    this._dispatch("state", state, this.client.logger);
    this.controller.onState(state);
    this._scheduleWhen(state.when);
  }

  /**
   * Tick exactly at `when` (a scheduled start), not up to tickInterval later. Browsers fire
   * timers late (tens of ms on a busy machine), so the timer is set `precisionMs` early and
   * the last stretch is waited out by yielding to the event loop (a MessageChannel round
   * trip is well under a millisecond).
   */
  _scheduleWhen(when) {
    if (!isNum(when)) return;
    const delay = when - this.client.serverTime();
    if (delay <= 0 || delay > 60000) return;
    if (this._whenTimer !== null) this._timers.clearTimeout(this._whenTimer);
    const token = (this._whenToken = {});
    this._whenTimer = this._timers.setTimeout(() => {
      this._whenTimer = null;
      const step = () => {
        if (this._whenToken !== token || !this.room) return;
        if (this.client.serverTime() >= when) {
          this._whenToken = null;
          this.controller.tick();
        } else this._yield(step);
      };
      step();
    }, Math.max(0, delay - this.precisionMs));
  }

  /** Run `fn` as soon as the event loop is free (no 4 ms timer clamp). */
  _yield(fn) {
    if (this._channel) {
      this._yieldQueue.push(fn);
      this._channel.port2.postMessage(0);
    } else this._timers.setTimeout(fn, 1);
  }

  _mediaReady() {
    if (!this.el) return true;
    return this.el.readyState >= 3 && !this.el.seeking;
  }

  _checkReady() {
    if (!this.room) return;
    if (this.buffering && this._mediaReady()) {
      this._bufferEnd();
      return;
    }
    if (this.ready || !this._mediaReady()) return;
    this.ready = true;
    this._send("syncplay.ready", { position: round3(this.player.position()) });
  }

  _bufferStart() {
    if (!this.room || !this.ready || this._bufferTimer !== null) return;
    // Short stalls (a seek, a few frames) are absorbed by drift correction.
    this._bufferTimer = this._timers.setTimeout(() => {
      this._bufferTimer = null;
      if (!this.room || this._mediaReady() || this.buffering) return;
      const tl = this.controller.timeline;
      if (!tl || !tl.running(this.client.serverTime())) return;
      this.buffering = true;
      this.ready = false;
      this._send("syncplay.buffering", { position: round3(this.player.position()) });
    }, this.bufferingDebounce);
  }

  _bufferEnd() {
    if (this._bufferTimer !== null) {
      this._timers.clearTimeout(this._bufferTimer);
      this._bufferTimer = null;
    }
    if (!this.buffering) {
      this._checkReady();
      return;
    }
    this.buffering = false;
    this.ready = true;
    this._send("syncplay.ready", { position: round3(this.player.position()) });
  }

  _report() {
    if (!this.room || !this.client.connected) return;
    const rtt = this.client.rtt; // min-delay (see join): one queued ping does not move it
    const data = this.controller.report(rtt == null ? null : Math.round(rtt * 10) / 10, this.buffering);
    this._send("syncplay.report", data);
  }

  _send(type, data) {
    if (!this.room) return;
    this.client.request(type, { room_id: this.room.room_id, ...data }).catch((err) => {
      this._dispatch("error", err, this.client.logger);
    });
  }

  /** After a reconnect, take the seat back with the new connection and adopt the state. */
  async _rejoin() {
    if (!this.room || this._rejoining) return;
    this._rejoining = true;
    try {
      /** @type {Record<string, any>} */
      const data = { room_id: this.room.room_id };
      if (this._password) data.password = this._password;
      const ack = await this.client.request("syncplay.join", data);
      if (this.room) {
        this.ready = false;
        this._enter(ack);
      }
    } catch (err) {
      this._dispatch("error", err, this.client.logger);
      if (err instanceof RequestError && (err.code === "NOT_FOUND" || err.code === "FORBIDDEN")) {
        const room = this.room;
        this._exit();
        this._dispatch("ended", { room_id: room?.room_id, reason: err.code.toLowerCase() }, this.client.logger);
      }
    } finally {
      this._rejoining = false;
    }
  }
}

function isMediaElement(m) {
  return !!m && typeof m === "object" && "currentTime" in m && typeof m.addEventListener === "function";
}

function round3(x) {
  return Math.round(x * 1000) / 1000;
}
