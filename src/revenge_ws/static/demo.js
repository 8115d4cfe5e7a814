// The hub's demo page: notifications as toasts (acknowledged once shown), transcoding
// progress bars, a watch party whose <video> follows the room's timeline, who is online, and
// the user's devices: the page is a device itself (its <video> obeys remote commands and
// reports what it plays) and controls the user's other devices.
// Plain ES module, no build step; everything goes through /client/revenge-ws.js.
import { DeviceList, OnlineUsers, RequestError, RevengeClient, SyncPlay, VERSION, nowPlayingPosition } from "/client/revenge-ws.js";

const $ = (id) => /** @type {any} */ (document.getElementById(id));
const params = new URLSearchParams(location.search);
const TOKEN_KEY = "revenge-ws-demo-token";
const INVITE_RE = /^[ABCDEFGHJKMNPQRSTUVWXYZ23456789]{8}$/;
const FEED_LENGTH = 20;

/** Everything the page knows; `window.revengeDemo` for the console and for tests. */
const demo = {
  client: /** @type {RevengeClient | null} */ (null),
  party: /** @type {SyncPlay | null} */ (null),
  video: $("video"),
  /** notification ids in the order they were shown */
  shown: /** @type {string[]} */ ([]),
  /** ids the hub confirmed as acknowledged */
  acked: new Set(),
  /** ids waiting to be acknowledged (retried after a reconnect) */
  toAck: new Set(),
  jobs: new Map(),
  inviteCode: null,
  /** users online, from the activity.presence messages since the page connected */
  online: new OnlineUsers(),
  /** the user's devices (this page among them), live */
  devices: /** @type {DeviceList | null} */ (null),
  /** remote commands this page obeyed: {command, args, from, at} */
  remoteLog: /** @type {any[]} */ ([]),
  /** the outcome of the last command sent from "My devices" */
  lastCommand: /** @type {any} */ (null),
  lastItem: /** @type {string | null} */ (null),
};
globalThis.revengeDemo = demo;

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function fmtTime(s) {
  if (!Number.isFinite(s)) return "0:00";
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
}

function setStatus(kind, text) {
  $("status-dot").className = `dot ${kind}`;
  $("status-text").textContent = text;
}

function showSignedIn(who) {
  $("signin").classList.toggle("signed-in", !!who);
  $("signed-in-as").classList.toggle("hidden", !who);
  $("signed-in-as").textContent = who ? `Signed in as ${who}.` : "";
}

function reportError(err) {
  const text = err instanceof RequestError ? `${err.code}: ${err.message}` : String(err?.message ?? err);
  $("room-error").textContent = text;
}

// ---------------------------------------------------------------- connection

function signOut() {
  const client = demo.client;
  if (demo.party) demo.party.detach();
  demo.party = null;
  demo.devices?.stop();
  demo.devices = null;
  demo.client = null;
  if (client) client.close();
  sessionStorage.removeItem(TOKEN_KEY);
  setStatus("", "signed out");
  $("who").textContent = "";
  $("clock").classList.add("hidden");
  $("disconnect").disabled = true;
  showSignedIn(null);
  for (const id of ["create", "join", "local-play"]) $(id).disabled = true;
  showRoom(null);
  resetPresence();
  $("this-device").classList.add("hidden");
  renderDevices();
}

function signIn(token) {
  signOut();
  sessionStorage.setItem(TOKEN_KEY, token);
  // The page is a device: it says device.hello after every (re)connect (contract §13).
  const client = new RevengeClient("/api/v1/ws", { token, device: pageDevice() });
  demo.client = client;
  $("disconnect").disabled = false;

  client.on("client.state", (ev) => {
    const s = ev.data.state;
    if (s === "connected") setStatus("warn", "syncing…");
    else if (s === "connecting") setStatus("warn", "connecting…");
  });
  client.on("client.connected", (ev) => {
    setStatus("ok", "connected");
    $("who").textContent = `${ev.data.user_id} · node ${ev.data.node_id}`;
    showSignedIn(ev.data.user_id);
    for (const id of ["create", "join"]) $(id).disabled = false;
    flushAcks();
  });
  client.on("client.disconnected", (ev) => {
    const d = ev.data;
    if (d.reconnect_in == null) return;
    setStatus("warn", `reconnecting in ${d.reconnect_in.toFixed(1)} s${d.code ? ` (close ${d.code})` : ""}`);
  });
  client.on("client.closed", (ev) => {
    if (client !== demo.client) return;
    const d = ev.data;
    setStatus("bad", d.code ? `closed (${d.code}): ${d.reason}` : "closed");
    showSignedIn(null);
  });
  client.on("notification", (msg) => showNotification(msg.data));
  client.on("client.recovery_failed", (ev) => {
    // Some notifications may have been lost: the hub re-sends every unacknowledged one at
    // the next connect; transcode bars get their latest value with the re-subscription.
    console.info("revenge-ws demo: recovery failed on", ev.data.channel);
  });
  for (const type of ["transcode.progress", "transcode.complete", "transcode.error"]) {
    client.on(type, (msg) => updateJob(msg));
  }
  client.on("subscription.added", (msg) => {
    const latest = msg.data?.latest;
    if (msg.data?.channel?.startsWith("transcode:")) ensureJob(msg.data.channel.slice(10));
    if (latest) updateJob(latest);
  });
  client.on("subscription.ended", (msg) => {
    const ch = msg.data?.channel;
    if (ch?.startsWith("transcode:")) finishJob(ch.slice(10));
  });
  setupParty(client);
  setupPresence(client);
  setupDevices(client);
  client.start();
}

setInterval(() => {
  const client = demo.client;
  if (!client || !client.connected) return;
  const rtt = client.rtt;
  const off = client.clockOffset;
  const pill = $("clock");
  pill.classList.remove("hidden");
  pill.textContent = `rtt ${rtt == null ? "–" : rtt.toFixed(1)} ms · offset ${off == null ? "–" : off.toFixed(1)} ms`;
}, 1000);

// ---------------------------------------------------------------- notifications

function showNotification(n) {
  if (!n || n.id == null) return;
  const id = String(n.id);
  if (demo.shown.includes(id)) {
    // Shown before but its acknowledgement was lost: acknowledge it again.
    if (!demo.acked.has(id)) queueAck(id);
    return;
  }
  demo.shown.push(id);
  const toast = el(
    "div",
    { class: `toast ${n.priority ?? "normal"}`, "data-id": id },
    el("div", { class: "title", textContent: n.title ?? n.notification_type ?? "Notification" }),
    n.body ? el("div", { class: "body", textContent: n.body }) : null,
    el("div", { class: "meta", textContent: `${n.notification_type ?? ""} · ${n.priority ?? "normal"}` }),
  );
  $("toasts").prepend(toast);
  setTimeout(() => toast.remove(), 8000);
  const inbox = $("inbox");
  inbox.querySelector(".empty")?.remove();
  inbox.prepend(
    el("li", { "data-id": id }, el("b", { textContent: n.title ?? "Notification" }), " ", el("span", { class: "muted", textContent: n.body ?? "" })),
  );
  $("unread").textContent = String(inbox.querySelectorAll("li[data-id]").length);
  // Acknowledged once seen: the next frame is painted only while the page is visible.
  const seen = () => requestAnimationFrame(() => queueAck(id));
  if (document.visibilityState === "visible") seen();
  else document.addEventListener("visibilitychange", seen, { once: true });
}

let ackTimer = null;
function queueAck(id) {
  demo.toAck.add(id);
  if (ackTimer === null) ackTimer = setTimeout(flushAcks, 150);
}

async function flushAcks() {
  ackTimer = null;
  const client = demo.client;
  const ids = [...demo.toAck];
  if (!client || !client.connected || ids.length === 0) return;
  try {
    await client.ackNotifications(ids);
    for (const id of ids) {
      demo.toAck.delete(id);
      demo.acked.add(id);
    }
  } catch (err) {
    // Retried at the next connect (client.connected).
    console.warn("revenge-ws demo: ack failed", err);
  }
}

// ---------------------------------------------------------------- transcoding

function ensureJob(jobId) {
  let job = demo.jobs.get(jobId);
  if (job) return job;
  $("jobs-empty")?.classList.add("hidden");
  const fill = el("div");
  const label = el("span", { class: "muted mono", textContent: "waiting" });
  const node = el(
    "div",
    { class: "job", "data-job": jobId },
    el("div", { class: "head" }, el("span", { textContent: jobId }), label),
    el("div", { class: "bar" }, fill),
  );
  $("jobs").append(node);
  job = { node, fill, label, progress: 0 };
  demo.jobs.set(jobId, job);
  return job;
}

function updateJob(msg) {
  const jobId = msg.data?.job_id ?? msg.channel?.slice(10);
  if (!jobId) return;
  const job = ensureJob(jobId);
  const d = msg.data ?? {};
  if (msg.type === "transcode.complete") {
    job.progress = 100;
    job.node.classList.add("done");
    job.label.textContent = "done";
  } else if (msg.type === "transcode.error") {
    job.node.classList.add("error");
    job.label.textContent = `error${d.message ? `: ${d.message}` : ""}`;
  } else {
    const p = Number(d.progress ?? d.percent ?? 0);
    job.progress = Math.max(0, Math.min(100, p));
    const eta = Number.isFinite(d.eta_seconds) ? ` · ${fmtTime(d.eta_seconds)} left` : "";
    job.label.textContent = `${job.progress.toFixed(1)} %${d.status ? ` · ${d.status}` : ""}${eta}`;
  }
  job.fill.style.width = `${job.progress}%`;
  job.node.dataset.progress = String(job.progress);
}

function finishJob(jobId) {
  const job = demo.jobs.get(jobId);
  if (!job) return;
  setTimeout(() => {
    job.node.remove();
    demo.jobs.delete(jobId);
    if (demo.jobs.size === 0) $("jobs-empty")?.classList.remove("hidden");
  }, 10_000);
}

$("watch-job").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const id = $("job-id").value.trim();
  if (!id || !demo.client) return;
  try {
    const [entry] = await demo.client.subscribe(`transcode:${id}`);
    ensureJob(id);
    if (entry?.latest) updateJob(entry.latest);
    $("job-id").value = "";
  } catch (err) {
    alert(err?.message ?? err);
  }
});

// ---------------------------------------------------------------- who's online

function setupPresence(client) {
  client.on("activity.presence", (msg) => {
    const change = demo.online.apply(msg);
    if (!change) return;
    for (const u of change.online) addFeed(`${u.name} came online`, "ok");
    for (const u of change.offline) addFeed(`${u.name} went offline`, "");
    renderOnline();
  });
  client.on("client.recovery_failed", (ev) => {
    // There is no snapshot to reload: the list stays, and corrects itself as users change.
    if (ev.data.channel === "activity") addFeed("some changes were missed while away", "warn");
  });
  client.on("client.connected", () => {
    // Subscribed once, like any app: after a reconnect the client re-subscribes with `since`
    // by itself and the changes missed meanwhile arrive. A failed first try is retried here.
    if (client.channels.includes("activity")) return;
    client.subscribe("activity").catch((err) => addFeed(`activity unavailable: ${err?.message ?? err}`, "bad"));
  });
}

function renderOnline() {
  const users = [...demo.online.users];
  $("online-count").textContent = String(users.length);
  $("online").replaceChildren(
    ...(users.length
      ? users.map(([id, name]) => el("li", { "data-user": id, title: id }, el("span", { class: "dot ok" }), name))
      : [el("li", { class: "empty", textContent: "Nobody online." })]),
  );
}

function addFeed(text, kind) {
  const feed = $("presence-feed");
  feed.querySelector(".empty")?.remove();
  feed.prepend(el("div", { class: kind ? `feed-${kind}` : "" }, el("span", { class: "muted mono", textContent: new Date().toLocaleTimeString() }), ` ${text}`));
  while (feed.childElementCount > FEED_LENGTH) feed.lastElementChild.remove();
}

function resetPresence() {
  demo.online.clear();
  $("online-count").textContent = "0";
  $("online").replaceChildren(el("li", { class: "empty", textContent: "Nobody yet. Users appear as they come online, from when this page connected." }));
  $("presence-feed").replaceChildren(el("div", { class: "empty", textContent: "No change yet." }));
}

// ---------------------------------------------------------------- watch party

const video = demo.video;
const controlIds = ["play", "pause", "back", "fwd", "rate", "seekbar"];

function setupParty(client) {
  const party = new SyncPlay(client, video);
  demo.party = party;
  party.on("room", (room) => {
    showRoom(room);
    const src = room.content?.id;
    if (src && video.getAttribute("src") !== src) {
      video.src = src;
      video.load();
    }
  });
  party.on("state", (state) => {
    $("room-state").textContent = state.state;
    $("room-state").className = `badge ${state.state === "playing" ? "ok" : state.state === "waiting" ? "warn" : "accent"}`;
  });
  party.on("members", (members) => renderMembers(members));
  party.on("chat", (m) => {
    const log = $("chatlog");
    log.append(el("div", {}, el("b", { textContent: m.username ?? m.user_id }), ` ${m.message}`));
    log.scrollTop = log.scrollHeight;
  });
  party.on("ended", (d) => {
    showRoom(null);
    $("room-error").textContent = `The room ended (${d.reason}).`;
  });
  party.on("autoplay-blocked", () => $("unmute").classList.remove("hidden"));
  party.on("error", (err) => console.warn("revenge-ws demo:", err));
}

function showRoom(room) {
  const inRoom = !!room;
  // Outside a room the video is the page's own (native controls); in a room the buttons below drive the room.
  video.controls = !inRoom && !!video.getAttribute("src");
  $("no-room").classList.toggle("hidden", inRoom);
  $("in-room").classList.toggle("hidden", !inRoom);
  for (const id of controlIds) $(id).disabled = !inRoom;
  if (!inRoom) {
    $("room-state").textContent = "no room";
    $("room-state").className = "badge";
    $("members").replaceChildren();
    $("chatlog").replaceChildren();
    $("invite-code").textContent = "–";
    return;
  }
  $("room-error").textContent = "";
  $("room-name-view").textContent = room.name;
  $("room-id").textContent = room.room_id;
  $("room-leader").textContent = room.leader_id ?? "–";
  const url = new URL(location.href);
  url.searchParams.set("room", room.room_id);
  history.replaceState(null, "", url);
}

function renderMembers(members) {
  const box = $("members");
  box.replaceChildren(
    ...members.map((m) => {
      const state = m.is_buffering ? ["warn", "buffering"] : m.is_ready ? ["ok", "ready"] : ["", "loading"];
      const rtt = m.rtt_ms == null ? "" : ` · ${Math.round(m.rtt_ms)} ms`;
      return el(
        "span",
        { class: `badge ${state[0]}`, "data-user": m.user_id, title: state[1] },
        `${m.is_leader ? "★ " : ""}${m.username ?? m.user_id} · ${state[1]}${rtt}`,
      );
    }),
  );
  const leader = members.find((m) => m.is_leader);
  if (leader) $("room-leader").textContent = leader.username ?? leader.user_id;
}

$("create-room").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const party = demo.party;
  const media = $("media-url").value.trim();
  if (!party || !media) {
    $("room-error").textContent = "Give the video URL the room will play.";
    return;
  }
  try {
    video.src = media;
    video.load();
    await party.create({ name: $("room-name").value.trim() || "Watch party", content: { type: "movie", id: media } });
  } catch (err) {
    reportError(err);
  }
});

$("join-room").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const party = demo.party;
  const raw = $("join-id").value.trim();
  if (!party || !raw) return;
  const code = raw.replace(/[-\s]/g, "").toUpperCase();
  const password = $("join-password").value || undefined;
  try {
    if (INVITE_RE.test(code) && raw.length <= 9) await party.join(null, { inviteCode: code });
    else await party.join(raw, { password });
  } catch (err) {
    reportError(err);
  }
});

const act = (fn) => async () => {
  try {
    await fn();
  } catch (err) {
    reportError(err);
  }
};
$("play").addEventListener("click", act(() => demo.party.play()));
$("pause").addEventListener("click", act(() => demo.party.pause()));
$("back").addEventListener("click", act(() => demo.party.seek(Math.max(0, (demo.party.target() ?? 0) - 10))));
$("fwd").addEventListener("click", act(() => demo.party.seek((demo.party.target() ?? 0) + 10)));
$("rate").addEventListener("change", act(() => demo.party.setRate(Number($("rate").value))));
$("seekbar").addEventListener("change", act(() => demo.party.seek(Number($("seekbar").value))));
$("leave").addEventListener(
  "click",
  act(async () => {
    await demo.party.leave();
    showRoom(null);
  }),
);
$("invite").addEventListener(
  "click",
  act(async () => {
    const r = await demo.party.invite();
    demo.inviteCode = r.code;
    $("invite-code").textContent = r.code;
  }),
);
$("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || !demo.party?.roomId) return;
  $("chat-input").value = "";
  await act(() => demo.party.chat(text))();
});
$("unmute").addEventListener("click", () => {
  video.muted = false;
  $("unmute").classList.add("hidden");
});

// Drift and position, a few times a second.
setInterval(() => {
  const party = demo.party;
  const target = party?.roomId ? party.target() : null;
  const dur = Number.isFinite(video.duration) ? video.duration : 0;
  $("time").textContent = `${fmtTime(video.currentTime)} / ${fmtTime(dur)}`;
  const bar = $("seekbar");
  bar.max = String(dur || 100);
  if (document.activeElement !== bar) bar.value = String(video.currentTime);
  if (target == null) {
    $("drift").textContent = "–";
    return;
  }
  const drift = (video.currentTime - target) * 1000;
  $("drift").textContent = `${drift >= 0 ? "+" : "−"}${Math.abs(drift).toFixed(0)} ms · ${video.playbackRate.toFixed(2)}×`;
}, 250);

// ---------------------------------------------------------------- devices and remote control

const DEVICE_KEY = "revenge-ws-demo-device";
/** What this page's video obeys (capabilities.commands of its device.hello). */
const PAGE_COMMANDS = ["play", "pause", "unpause", "toggle_pause", "seek", "stop", "set_volume", "mute", "unmute", "display_message"];

/** One device id per tab (sessionStorage: it survives a reload, a second tab gets its own). */
function pageDevice() {
  let id = sessionStorage.getItem(DEVICE_KEY);
  if (!id) {
    id = `demo-${crypto.randomUUID()}`;
    sessionStorage.setItem(DEVICE_KEY, id);
  }
  const ua = navigator.userAgent;
  const browser = /Edg\//.test(ua) ? "Edge" : /Firefox\//.test(ua) ? "Firefox" : /Chrome\//.test(ua) ? "Chrome" : /Safari\//.test(ua) ? "Safari" : "Browser";
  const name = params.get("device") || `${browser} · tab ${id.slice(5, 9)}`;
  return { deviceId: id, name, client: "revenge-ws demo", version: VERSION, commands: PAGE_COMMANDS, remoteControl: true };
}

function setupDevices(client) {
  const devices = new DeviceList(client);
  demo.devices = devices;
  devices.on("change", () => renderDevices());
  devices.on("error", (err) => setDeviceNote(`devices unavailable: ${err?.code ?? ""} ${err?.message ?? err}`, "bad"));
  client.on("client.device", (ev) => {
    const d = ev.data;
    const badge = $("this-device");
    badge.classList.toggle("hidden", !d.device && !d.active);
    if (d.active) {
      badge.textContent = `this page: ${client.deviceConfig?.name}`;
      badge.className = "badge accent";
    } else if (d.reason) {
      badge.textContent = `this page: taken over (${d.reason})`;
      badge.className = "badge warn";
    } else if (d.error) {
      setDeviceNote(`this page is not a device: ${d.error.code ?? ""} ${d.error.message}`, "bad");
    }
    renderDevices();
  });
  client.onCommand((cmd) => obey(cmd));
  client.on("client.connected", () => {
    $("local-play").disabled = false;
  });
  devices.start().catch((err) => console.warn("revenge-ws demo: devices", err));
}

/** Carry out a remote command on this page's video; the returned object is the result's state. */
async function obey(cmd) {
  const { command, args } = cmd;
  demo.remoteLog.push({ command, args, from: cmd.from, at: Date.now() });
  const party = demo.party?.roomId ? demo.party : null;
  const hasMedia = () => !!video.currentSrc;
  switch (command) {
    case "play": {
      const item = args.item_ids?.[0];
      if (args.mode && args.mode !== "now") throw new Error("this page has no queue (mode 'now' only)");
      if (party) throw new Error("this page is in a watch party: leave it first");
      if (!item) throw new Error("play needs item_ids");
      await playHere(item, Number(args.start_position ?? 0));
      break;
    }
    case "pause":
      if (party) await party.pause();
      else video.pause();
      break;
    case "unpause":
      if (!hasMedia()) throw new Error("nothing to play");
      if (party) await party.play();
      else await startVideo();
      break;
    case "toggle_pause":
      if (!hasMedia()) throw new Error("nothing to play");
      if (party) await (video.paused ? party.play() : party.pause());
      else if (video.paused) await startVideo();
      else video.pause();
      break;
    case "seek": {
      if (!hasMedia()) throw new Error("nothing is playing");
      const pos = Math.max(0, Number(args.position));
      if (party) await party.seek(pos);
      else video.currentTime = Number.isFinite(video.duration) ? Math.min(pos, video.duration) : pos;
      break;
    }
    case "stop":
      if (party) await party.leave().catch(() => {});
      if (party) showRoom(null);
      stopVideo();
      break;
    case "set_volume":
      video.volume = Math.min(100, Math.max(0, Number(args.volume))) / 100;
      break;
    case "mute":
      video.muted = true;
      break;
    case "unmute":
      video.muted = false;
      $("unmute").classList.add("hidden");
      break;
    case "display_message":
      showMessage(args.header, args.text, Number(args.timeout_ms) || 6000, cmd.from);
      break;
    default:
      throw new Error(`unknown command '${command}'`);
  }
  return playerState();
}

async function startVideo() {
  try {
    await video.play();
  } catch (err) {
    // No user gesture on this page: browsers allow muted playback.
    if (err?.name !== "NotAllowedError" || video.muted) throw err;
    video.muted = true;
    $("unmute").classList.remove("hidden");
    await video.play();
  }
}

/** Play `src` on this page from `position` (s), outside a room. */
async function playHere(src, position = 0) {
  if (demo.party?.roomId) throw new Error("this page is in a watch party: leave it first");
  if (video.getAttribute("src") !== src) {
    video.src = src;
    video.load();
  }
  video.controls = true;
  if (position > 0) {
    if (video.readyState < 1) await new Promise((r) => video.addEventListener("loadedmetadata", r, { once: true }));
    video.currentTime = Number.isFinite(video.duration) ? Math.min(position, video.duration) : position;
  }
  await startVideo();
}

function stopVideo() {
  video.pause();
  video.removeAttribute("src");
  video.load();
  reportNow();
}

function playerState() {
  const s = {
    state: !video.currentSrc ? "stopped" : video.paused ? "paused" : "playing",
    position: Math.round(video.currentTime * 1000) / 1000,
    volume: Math.round(video.volume * 100),
    muted: video.muted,
  };
  if (Number.isFinite(video.duration)) s.duration = video.duration;
  return s;
}

function showMessage(header, text, ms, from) {
  const toast = el(
    "div",
    { class: "toast message" },
    el("div", { class: "title", textContent: header || "Message" }),
    el("div", { class: "body", textContent: String(text ?? "") }),
    el("div", { class: "meta", textContent: `remote message${from?.user_id ? ` from ${from.user_id}` : ""}` }),
  );
  $("toasts").prepend(toast);
  setTimeout(() => toast.remove(), Math.min(Math.max(ms, 1000), 60_000));
}

// What the video does, reported as playback.update (debounced: events come in bursts).
let reportTimer = null;
let reported = false;
function reportSoon() {
  if (reportTimer === null) reportTimer = setTimeout(reportNow, 80);
}
function reportNow() {
  if (reportTimer !== null) clearTimeout(reportTimer);
  reportTimer = null;
  const client = demo.client;
  if (!client) return;
  const src = video.getAttribute("src");
  if (!src || !video.currentSrc) {
    if (reported) client.reportPlayback({ item_id: demo.lastItem ?? "none", state: "stopped", position: 0 }).catch(() => {});
    reported = false;
    return;
  }
  const item = src.slice(0, 128);
  demo.lastItem = item;
  const state = video.ended ? "stopped" : video.paused ? "paused" : video.readyState < 3 && !video.seeking ? "buffering" : "playing";
  const report = {
    item_id: item,
    item_type: "video",
    title: decodeURIComponent(src.split("/").pop() || src).slice(0, 300),
    state,
    position: video.currentTime,
    rate: Math.min(4, Math.max(0.25, video.playbackRate || 1)),
    volume: Math.round(video.volume * 100),
    muted: video.muted,
    play_method: "direct",
  };
  if (Number.isFinite(video.duration)) report.duration = video.duration;
  if (demo.party?.roomId) report.room_id = demo.party.roomId;
  reported = state !== "stopped";
  client.reportPlayback(report).catch((err) => console.warn("revenge-ws demo: playback.update refused", err));
}
for (const ev of ["play", "playing", "pause", "seeked", "waiting", "ended", "ratechange", "volumechange", "loadedmetadata", "emptied"]) {
  video.addEventListener(ev, reportSoon);
}

function setDeviceNote(text, kind = "") {
  const note = $("device-note");
  note.textContent = text;
  note.className = `note ${kind ? `error-text` : "muted"}`;
}

/** One row per device, updated in place (so a click is never lost to a re-render). */
const deviceRows = new Map();

function renderDevices() {
  const client = demo.client;
  const list = demo.devices?.list() ?? [];
  const box = $("devices");
  $("device-count").textContent = String(list.length);
  const seen = new Set();
  box.querySelector(".empty")?.remove();
  for (const d of list) {
    const key = d.device_id;
    seen.add(key);
    let row = deviceRows.get(key);
    if (!row) {
      row = deviceRow(key);
      deviceRows.set(key, row);
      box.append(row.node);
    }
    updateDeviceRow(row, d, client);
  }
  for (const [key, row] of deviceRows) {
    if (seen.has(key)) continue;
    row.node.remove();
    deviceRows.delete(key);
  }
  if (list.length === 0) box.replaceChildren(el("li", { class: "empty", textContent: client ? "No device yet." : "Sign in to see your devices." }));
}

function deviceRow(deviceId) {
  const name = el("b");
  const meta = el("span", { class: "muted mono" });
  const what = el("span", { class: "what" });
  const state = el("span", { class: "badge" });
  const pos = el("span", { class: "mono muted" });
  const fill = el("div");
  const result = el("span", { class: "muted result" });
  const button = (cmd, label, title) => {
    const b = el("button", { type: "button", class: "secondary small", textContent: label, title, "data-cmd": cmd });
    b.addEventListener("click", () => remoteClick(deviceId, cmd, row));
    return b;
  };
  const buttons = el(
    "span",
    { class: "row remote" },
    button("pause", "Pause", "pause it"),
    button("unpause", "Play", "play it (unpause)"),
    button("back", "−10 s", "seek back 10 s"),
    button("fwd", "+10 s", "seek forward 10 s"),
    button("here", "Play here", "continue its video on this page (and pause it there)"),
  );
  const node = el(
    "li",
    { "data-device": deviceId },
    el("div", { class: "head" }, name, " ", meta, el("span", { class: "spacer" }), state),
    el("div", { class: "np" }, what, " ", pos),
    el("div", { class: "bar" }, fill),
    el("div", { class: "row mt6" }, buttons, result),
  );
  const row = { node, name, meta, what, state, pos, fill, buttons, result, device: null };
  return row;
}

function updateDeviceRow(row, d, client) {
  row.device = d;
  const mine = client?.deviceConfig?.device_id === d.device_id;
  const np = d.now_playing;
  row.name.textContent = d.name;
  row.meta.textContent = `${d.client} ${d.version}${mine ? " · this page" : ""}`;
  row.node.classList.toggle("self", mine);
  const st = np?.state ?? "idle";
  row.state.textContent = st;
  row.state.className = `badge ${st === "playing" ? "ok" : st === "buffering" ? "warn" : st === "paused" ? "accent" : ""}`;
  row.node.dataset.state = st;
  row.what.textContent = np ? np.title || np.item_id : "nothing playing";
  const now = client ? client.serverTime() : Date.now();
  const at = np ? nowPlayingPosition(np, now) : 0;
  row.pos.textContent = np ? `${fmtTime(at)}${np.duration ? ` / ${fmtTime(np.duration)}` : ""}${np.play_method ? ` · ${np.play_method}` : ""}` : "";
  row.fill.style.width = np?.duration ? `${Math.min(100, (100 * at) / np.duration).toFixed(1)}%` : "0%";
  const cmds = new Set(d.capabilities?.remote_control ? d.capabilities.commands ?? [] : []);
  const need = { pause: "pause", unpause: "unpause", back: "seek", fwd: "seek", here: null };
  for (const b of row.buttons.children) {
    const cmd = b.dataset.cmd;
    const ok = cmd === "here" ? !!np && !demo.party?.roomId : cmds.has(need[cmd]) && !!np;
    b.disabled = mine || !ok;
  }
  row.buttons.classList.toggle("hidden", mine);
}

async function remoteClick(deviceId, what, row) {
  const client = demo.client;
  const d = row.device;
  if (!client || !d) return;
  const np = d.now_playing;
  const at = np ? nowPlayingPosition(np, client.serverTime()) : 0;
  row.result.textContent = "…";
  row.result.className = "muted result";
  try {
    if (what === "here") {
      await playHere(np.item_id, at);
      await client.sendCommand(deviceId, "pause").catch(() => {});
      row.result.textContent = "continued here";
      return;
    }
    const [command, args] =
      what === "back" ? ["seek", { position: Math.max(0, at - 10) }] : what === "fwd" ? ["seek", { position: at + 10 }] : [what, null];
    const t0 = performance.now();
    const res = await client.sendCommand(deviceId, command, args, { timeoutMs: 5000 });
    demo.lastCommand = { deviceId, command, result: res };
    row.result.textContent = `${command}: ok (${Math.round(performance.now() - t0)} ms)${res.state?.state ? ` · ${res.state.state}` : ""}`;
    row.result.className = "result feed-ok";
  } catch (err) {
    demo.lastCommand = { deviceId, command: what, error: { code: err?.code ?? null, message: err?.message ?? String(err) } };
    row.result.textContent = err instanceof RequestError ? `${err.code}: ${err.message}` : String(err?.message ?? err);
    row.result.className = "result error-text";
  }
}

// Positions move while playing: refresh the rows every second.
setInterval(() => {
  if (demo.devices && deviceRows.size) renderDevices();
}, 1000);

$("local-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const src = $("local-url").value.trim();
  if (!src) return;
  try {
    await playHere(src, 0);
  } catch (err) {
    setDeviceNote(String(err?.message ?? err), "bad");
  }
});

// ---------------------------------------------------------------- start

$("signin").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = $("token").value.trim();
  if (token) signIn(token);
});
$("disconnect").addEventListener("click", () => {
  $("token").value = "";
  signOut();
});
if (params.get("media")) $("media-url").value = $("local-url").value = params.get("media");
if (params.get("room")) $("join-id").value = params.get("room");
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) {
  $("token").value = saved;
  signIn(saved);
}
