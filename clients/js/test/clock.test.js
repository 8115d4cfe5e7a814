import { test } from "node:test";
import assert from "node:assert/strict";
import { ClockSample, ClockSync } from "../revenge-ws.js";

test("NTP formulas", () => {
  // Server 1000 ms ahead, 20 ms up, 40 ms down, 5 ms in the server.
  const s = new ClockSample(0, 1020, 1025, 65);
  assert.equal(s.offset, (1020 + (1025 - 65)) / 2);
  assert.equal(s.delay, 60);
  assert.equal(new ClockSample(10, 0, 0, 5).delay, 0);
});

test("the estimate is the min-delay sample of the last 8", () => {
  const c = new ClockSync();
  assert.equal(c.offset, null);
  assert.equal(c.serverTime(5), 5);
  // One precise exchange among noisy ones.
  c.add(0, 500 + 50, 500 + 50, 200); // delay 200
  c.add(1000, 1500 + 5, 1500 + 5, 1010); // delay 10, offset 500
  c.add(2000, 2500 + 90, 2500 + 90, 2150); // delay 150
  assert.equal(c.delay, 10);
  assert.equal(c.offset, 500);
  assert.equal(c.serverTime(10_000), 10_500);
  for (let i = 0; i < 8; i++) c.add(3000 + i, 3600 + i, 3600 + i, 3100 + i); // delay 100
  assert.equal(c.samples.length, 8);
  assert.equal(c.delay, 100, "old samples are forgotten");
  assert.equal(c.latest.t0, 3007);
});

test("unusable samples are refused", () => {
  const c = new ClockSync(2);
  assert.equal(c.add(10, 0, 0, 5), null, "t3 < t0");
  assert.equal(c.add(NaN, 0, 0, 5), null);
  assert.equal(c.samples.length, 0);
  assert.throws(() => new ClockSync(0));
  c.add(0, 1, 1, 2);
  c.reset();
  assert.equal(c.best, null);
});
