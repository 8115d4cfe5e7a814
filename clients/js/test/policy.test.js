import { test } from "node:test";
import assert from "node:assert/strict";
import {
  DEFAULT_POLICY,
  advisedWindow,
  backoffDelay,
  reconnectDelay,
  restartDelay,
  shouldReconnect,
} from "../revenge-ws.js";
import { seeded } from "./fakes.js";

test("full-jitter backoff stays within min + U(0, min(max, min*2^n))", () => {
  const rng = seeded(1);
  for (let attempt = 0; attempt < 12; attempt++) {
    const cap = Math.min(20, 0.5 + Math.min(20, 0.5 * 2 ** attempt));
    let lo = Infinity;
    let hi = 0;
    for (let i = 0; i < 1000; i++) {
      const d = backoffDelay(attempt, rng);
      assert.ok(d >= 0.5 && d <= cap, `attempt ${attempt}: ${d}`);
      lo = Math.min(lo, d);
      hi = Math.max(hi, d);
    }
    // Jitter really spreads the delays (no fleet reconnects in lockstep).
    assert.ok(hi - lo > (cap - 0.5) * 0.8, `attempt ${attempt} spread ${lo}..${hi}`);
  }
  assert.equal(backoffDelay(0, () => 0), 0.5);
  assert.equal(backoffDelay(0, () => 0.999999), 0.5 + 0.5 * 0.999999);
  assert.equal(backoffDelay(50, () => 0.999999), 20);
  assert.equal(backoffDelay(-3, () => 0), 0.5);
});

test("restart codes spread the first attempt over the window", () => {
  const rng = seeded(2);
  for (const code of [1001, 1012]) {
    const ds = Array.from({ length: 1000 }, () => reconnectDelay(DEFAULT_POLICY, 0, rng, { code }));
    assert.ok(ds.every((d) => d >= 0 && d < 5));
    assert.ok(Math.min(...ds) < 0.5 && Math.max(...ds) > 4.5, "uses the whole 5 s window");
  }
  // An advised window wins, clamped to maxWindow.
  const ds = Array.from({ length: 200 }, () => reconnectDelay(DEFAULT_POLICY, 0, rng, { code: 1012, window: 1 }));
  assert.ok(ds.every((d) => d < 1));
  assert.equal(restartDelay(0, rng), 0);
  assert.equal(restartDelay(Infinity, rng), 0);
  // Later attempts never go below the backoff.
  for (let i = 0; i < 200; i++) assert.ok(reconnectDelay(DEFAULT_POLICY, 3, rng, { code: 1012 }) >= 0.5);
});

test("4004 and HTTP 429 wait at least 5 s; Retry-After is honoured", () => {
  const rng = seeded(3);
  for (let i = 0; i < 500; i++) {
    assert.ok(reconnectDelay(DEFAULT_POLICY, i % 8, rng, { code: 4004 }) >= 5);
    assert.ok(reconnectDelay(DEFAULT_POLICY, 0, rng, { httpStatus: 429, retryAfter: 12 }) >= 12);
    const d = reconnectDelay(DEFAULT_POLICY, 0, rng, { httpStatus: 503, retryAfter: 3 });
    assert.ok(d >= 3 && d < 3 + 5 + 1e-9);
  }
  for (let i = 0; i < 500; i++) {
    const d = reconnectDelay(DEFAULT_POLICY, 0, rng, { code: 4002 });
    assert.ok(d >= 0.5 && d <= 1);
  }
});

test("4004 and 429 waits are spread over 5 s beyond the floor, not fixed", () => {
  // 1,000 clients refused at the same moment: none back before the floor, no second
  // gets more than 30% of them (before: all within 5.5-6.0 s).
  const rng = seeded(4);
  for (const info of [{ code: 4004 }, { httpStatus: 429 }, { httpStatus: 429, retryAfter: 8 }]) {
    const floor = Math.max(5, info.retryAfter ?? 0);
    const ds = Array.from({ length: 1000 }, () => reconnectDelay(DEFAULT_POLICY, 0, rng, info));
    assert.ok(ds.every((d) => d >= floor && d <= floor + DEFAULT_POLICY.rateLimitSpread));
    assert.ok(Math.max(...ds) - Math.min(...ds) > 4.5, "uses the whole spread");
    const perSecond = new Map();
    for (const d of ds) perSecond.set(Math.floor(d), (perSecond.get(Math.floor(d)) ?? 0) + 1);
    assert.ok(Math.max(...perSecond.values()) <= 300, JSON.stringify([...perSecond]));
  }
  // Later attempts still back off beyond the spread.
  const late = Array.from({ length: 1000 }, () => reconnectDelay(DEFAULT_POLICY, 8, rng, { code: 4004 }));
  assert.ok(Math.min(...late) >= 5.5 && Math.max(...late) > 15);
  // The same draws as the Python client: floor + U(0, spread) at attempt 0.
  assert.equal(reconnectDelay(DEFAULT_POLICY, 0, () => 0.5, { code: 4004 }), 7.5);
  assert.equal(reconnectDelay({ ...DEFAULT_POLICY, rateLimitSpread: 0 }, 0, rng, { code: 4004 }), 5);
});

/** The largest share of `ds` that falls in one second. */
function busiestSecond(ds) {
  const perSecond = new Map();
  for (const d of ds) perSecond.set(Math.floor(d), (perSecond.get(Math.floor(d)) ?? 0) + 1);
  return Math.max(...perSecond.values());
}

test("a close that advises a window spreads the first attempt over it (contract §12)", () => {
  const rng = seeded(5);
  for (const code of [4002, 4003, 1001, 1012]) {
    const ds = Array.from({ length: 1000 }, () => reconnectDelay(DEFAULT_POLICY, 0, rng, { code, window: 8 }));
    assert.ok(ds.every((d) => d >= 0 && d < 8), String(code));
    assert.ok(Math.min(...ds) < 0.5 && Math.max(...ds) > 7, `${code}: the whole window, no floor`);
    assert.ok(busiestSecond(ds) <= 300);
  }
  // Without a window 4002 and 4003 back off as before.
  for (const code of [4002, 4003]) {
    for (let i = 0; i < 200; i++) {
      const d = reconnectDelay(DEFAULT_POLICY, 0, rng, { code });
      assert.ok(d >= 0.5 && d <= 1);
    }
  }
  // 4004 waits its floor, then the advised spread.
  const rl = Array.from({ length: 1000 }, () => reconnectDelay(DEFAULT_POLICY, 0, rng, { code: 4004, window: 10 }));
  assert.ok(rl.every((d) => d >= 5 && d <= 15) && Math.max(...rl) > 14);
  assert.ok(busiestSecond(rl) <= 300);
  // Later attempts never wait less than the backoff.
  const late = Array.from({ length: 1000 }, () => reconnectDelay(DEFAULT_POLICY, 8, rng, { code: 4002, window: 1 }));
  assert.ok(Math.min(...late) >= 0.5 && Math.max(...late) > 15);
  // The same draws as the Python client: U(0, window) at attempt 0.
  assert.equal(reconnectDelay(DEFAULT_POLICY, 0, () => 0.5, { code: 4003, window: 5 }), 2.5);
  assert.equal(reconnectDelay(DEFAULT_POLICY, 0, () => 0.5, { code: 4004, window: 10 }), 10);
});

test("a 503 waits Retry-After plus a spread over the advised window", () => {
  const rng = seeded(6);
  const ds = Array.from({ length: 1000 }, () =>
    reconnectDelay(DEFAULT_POLICY, 0, rng, { httpStatus: 503, retryAfter: 3, window: 20 }),
  );
  assert.ok(ds.every((d) => d >= 3 && d <= 23) && Math.max(...ds) > 22);
  assert.ok(busiestSecond(ds) <= 300);
  // A window without Retry-After still spreads, never below the backoff.
  const bare = Array.from({ length: 1000 }, () => reconnectDelay(DEFAULT_POLICY, 0, rng, { httpStatus: 503, window: 10 }));
  assert.ok(Math.min(...bare) >= 0.5 && Math.max(...bare) > 9);
  assert.equal(reconnectDelay(DEFAULT_POLICY, 0, () => 0.5, { httpStatus: 503, retryAfter: 2, window: 6 }), 5);
});

test("advised windows are parsed from close reasons", () => {
  assert.equal(advisedWindow("slow consumer; window=5"), 5);
  assert.equal(advisedWindow("heartbeat timeout; window=5"), 5);
  assert.equal(advisedWindow("restart; window=10"), 10);
  assert.equal(advisedWindow("restart window=2500ms"), 2.5);
  assert.equal(advisedWindow("reconnect_window: 7s"), 7);
  assert.equal(advisedWindow("window=99999"), 300);
  assert.equal(advisedWindow("windows=3"), null);
  assert.equal(advisedWindow("window=3x"), null);
  assert.equal(advisedWindow(""), null);
  assert.equal(advisedWindow(null), null);
});

test("close codes: terminal ones never reconnect (contract §4)", () => {
  for (const code of [null, undefined, 1001, 1006, 1011, 1012, 4001, 4002, 4003, 4004, 4000, 4499]) {
    assert.equal(shouldReconnect(code), true, String(code));
  }
  for (const code of [1000, 1003, 1008, 1009, 4501, 4503, 4500, 4999]) {
    assert.equal(shouldReconnect(code), false, String(code));
  }
});
