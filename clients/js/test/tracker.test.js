import { test } from "node:test";
import assert from "node:assert/strict";
import { Tracker, Verdict } from "../revenge-ws.js";

test("in order, duplicates dropped, gaps start a recovery", () => {
  const t = new Tracker();
  t.want("library:l1");
  const items = t.itemsFor(["library:l1"]);
  assert.deepEqual(items, ["library:l1"]);
  assert.equal(t.applyEntry({ channel: "library:l1", epoch: "e", seq: 4, recovered: false, missed: 0 }, 1), true);
  assert.equal(t.onPublication("library:l1", "e", 5), Verdict.DELIVER);
  assert.equal(t.onPublication("library:l1", "e", 5), Verdict.DUPLICATE);
  assert.equal(t.onPublication("library:l1", "e", 3), Verdict.DUPLICATE);
  assert.equal(t.onPublication("library:l1", "e", 7), Verdict.GAP);
  assert.equal(t.onPublication("library:l1", "e", 8), Verdict.HELD, "held while recovering");
  assert.deepEqual(t.itemsFor(["library:l1"]), [{ name: "library:l1", since: { epoch: "e", seq: 5 } }]);
  assert.equal(t.applyEntry({ channel: "library:l1", epoch: "e", seq: 8, recovered: true, missed: 3 }, 1), true);
  assert.equal(t.onPublication("library:l1", "e", 6), Verdict.DELIVER);
  assert.deepEqual(t.positions(), { "library:l1": { epoch: "e", seq: 6 } });
});

test("a new epoch is a gap; recovered: false reports a failed recovery", () => {
  const t = new Tracker();
  t.onWelcome([{ channel: "user:a", epoch: "e1", seq: 2 }], 1);
  assert.equal(t.onPublication("user:a", "e2", 1), Verdict.GAP);
  t.itemsFor(["user:a"]);
  assert.equal(t.applyEntry({ channel: "user:a", epoch: "e2", seq: 1, recovered: false, missed: 0 }, 1), false);
  assert.equal(t.onPublication("user:a", "e2", 2), Verdict.DELIVER);
});

test("latest-value channels accept gaps", () => {
  const t = new Tracker();
  t.onAdded({ channel: "transcode:j1", epoch: "e", seq: 10, missed: 1 }, 1);
  assert.equal(t.onPublication("transcode:j1", "e", 10), Verdict.DELIVER, "the latest value follows the notice");
  assert.equal(t.onPublication("transcode:j1", "e", 14), Verdict.DELIVER);
  assert.equal(t.onPublication("transcode:j1", "e", 14), Verdict.DUPLICATE);
});

test("welcome: known channels whose position moved are re-subscribed with since", () => {
  const t = new Tracker();
  t.onWelcome([{ channel: "notifications:a", epoch: "e", seq: 3 }], 1);
  t.want("activity");
  t.applyEntry({ channel: "activity", epoch: "x", seq: 9, recovered: false, missed: 0 }, 1);
  t.drop("gone");
  const items = t.onWelcome([{ channel: "notifications:a", epoch: "e", seq: 5 }], 2);
  assert.deepEqual(items, [
    { name: "notifications:a", since: { epoch: "e", seq: 3 } },
    { name: "activity", since: { epoch: "x", seq: 9 } },
  ]);
});

test("notifications: de-duplicated by id, seq only moves the position forward", () => {
  const t = new Tracker();
  t.onWelcome([{ channel: "notifications:a", epoch: "e", seq: 0 }], 1);
  const pub = (id, seq) => ({ type: "notification", channel: "notifications:a", epoch: "e", seq, data: { id } });
  const direct = (id) => ({ type: "notification", channel: "notifications:a", data: { id } });
  assert.equal(t.onNotification(direct("n1")), Verdict.DELIVER);
  assert.equal(t.onNotification(pub("n1", 1)), Verdict.DUPLICATE);
  assert.equal(t.onNotification(pub("n2", 2)), Verdict.DELIVER);
  assert.equal(t.onNotification(direct("n2")), Verdict.DUPLICATE);
  assert.equal(t.onNotification(pub("n4", 4)), Verdict.DELIVER_AND_RECOVER, "a gap still delivers, by id");
  const small = new Tracker(2);
  small.onNotification(direct("a"));
  small.onNotification(direct("b"));
  small.onNotification(direct("c"));
  assert.equal(small.onNotification(direct("a")), Verdict.DELIVER, "the oldest id was forgotten");
});

test("subscription.reset continues from the server's position", () => {
  const t = new Tracker();
  t.onWelcome([{ channel: "user:a", epoch: "e", seq: 1 }], 1);
  assert.equal(t.onPublication("user:a", "e", 5), Verdict.GAP);
  t.onReset("user:a", "e", 5);
  assert.equal(t.onPublication("user:a", "e", 6), Verdict.DELIVER);
});
