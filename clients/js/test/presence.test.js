import { test } from "node:test";
import assert from "node:assert/strict";
import { OnlineUsers, parsePresence } from "../revenge-ws.js";

const presence = (online, offline) => ({
  type: "activity.presence",
  channel: "activity",
  seq: 1,
  data: {
    online: online.map((u) => ({ user_id: u, name: u.toUpperCase() })),
    offline: offline.map((u) => ({ user_id: u, name: u.toUpperCase() })),
  },
});

test("OnlineUsers follows activity.presence messages", () => {
  const online = new OnlineUsers();
  assert.deepEqual(online.apply(presence(["ann", "bob"], [])).online.length, 2);
  assert.equal(online.apply({ type: "activity.user_watching", data: { user_id: "cat" } }), null);
  assert.deepEqual([...online.users.keys()], ["ann", "bob"]);
  online.apply(presence(["cat"], ["ann"]));
  assert.deepEqual(Object.fromEntries(online.users), { bob: "BOB", cat: "CAT" });
  assert.equal(online.size, 2);
  assert.ok(online.has("cat") && !online.has("ann"));
  online.apply(presence([], ["zed"])); // went offline before this tracker saw them online
  online.apply(presence(["bob"], [])); // already known: listed once
  assert.deepEqual([...online.users.keys()], ["bob", "cat"]);
  online.clear();
  assert.equal(online.size, 0);
});

test("parsePresence keeps well-formed entries only", () => {
  const msg = {
    type: "activity.presence",
    data: { online: [{ user_id: "ann" }, { name: "no id" }, "bob", { user_id: 3 }], offline: null },
  };
  assert.deepEqual(parsePresence(msg), { online: [{ user_id: "ann", name: "ann" }], offline: [] });
  assert.equal(parsePresence({ type: "activity.presence", data: [] }), null);
  assert.equal(parsePresence({ type: "activity.user_online", data: { user_id: "a" } }), null);
  assert.equal(parsePresence(null), null);
});

test("parsePresence keeps the count of users a large batch left out", () => {
  const msg = presence(["ann"], []);
  assert.equal(parsePresence(msg).more, undefined);
  msg.data.more = { online: 150, offline: 0 };
  assert.deepEqual(parsePresence(msg).more, { online: 150, offline: 0 });
  msg.data.more = { online: "many" };
  assert.equal(parsePresence(msg).more, undefined);
});
