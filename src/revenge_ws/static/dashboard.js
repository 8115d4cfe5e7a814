// The hub's live dashboard (admins): node statistics from GET /api/v1/realtime/info,
// message rates from /metrics, health from /readyz, rooms from GET /api/v1/syncplay/rooms,
// and the `server` and `activity` channels live over the JavaScript client (online users from
// activity.presence), and what every device plays (devices.list {all: true}, then the admin
// `sessions` channel). No libraries: the chart is SVG.
import { DeviceList, OnlineUsers, RevengeClient, nowPlayingPosition } from "/client/revenge-ws.js";

const $ = (id) => /** @type {any} */ (document.getElementById(id));
const params = new URLSearchParams(location.search);
const TOKEN_KEY = "revenge-ws-dashboard-token";
const MAX_SAMPLES = 90;
const FEED_LENGTH = 50;
const SVG = "http://www.w3.org/2000/svg";
const CLOSE_MEANINGS = {
  1000: "normal",
  1001: "going away",
  1003: "binary frame",
  1006: "network loss",
  1008: "policy",
  1009: "too big",
  1011: "server error",
  1012: "service restart",
  4001: "token expired",
  4002: "slow consumer",
  4003: "heartbeat timeout",
  4004: "rate limited",
  4501: "unauthorized",
  4503: "disconnected",
};

const dash = {
  token: "",
  interval: Number(params.get("interval")) || 2000,
  timer: /** @type {any} */ (null),
  /** @type {{t: number, connections: number, rateIn: number, rateOut: number}[]} */
  samples: [],
  prev: /** @type {{t: number, in: number, out: number, opened: number} | null} */ (null),
  info: /** @type {any} */ (null),
  rooms: /** @type {any[] | null} */ (null),
  client: /** @type {RevengeClient | null} */ (null),
  /** users online, from the activity.presence messages since the page connected */
  online: new OnlineUsers(),
  /** every device of every user, live (admin JWT) */
  devices: /** @type {DeviceList | null} */ (null),
  polls: 0,
};
globalThis.revengeDashboard = dash;

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

function fmt(n, digits = 0) {
  if (n == null || !Number.isFinite(n)) return "–";
  return n.toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function fmtDuration(s) {
  if (!Number.isFinite(s)) return "–";
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return `${m}m ${Math.floor(s % 60)}s`;
}

function isJwt(token) {
  return token.split(".").length === 3;
}

// ---------------------------------------------------------------- Prometheus text

/** Parse the Prometheus text format into samples `{name, labels, value}`. */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number.parseFloat(m[3]) });
  }
  return out;
}

function total(samples, name) {
  let sum = 0;
  for (const s of samples) if (s.name === name && Number.isFinite(s.value)) sum += s.value;
  return sum;
}

// ---------------------------------------------------------------- polling

async function getJson(url, headers) {
  const r = await fetch(url, { headers, cache: "no-store" });
  let body = null;
  try {
    body = await r.json();
  } catch {
    body = null;
  }
  if (!r.ok) {
    const e = body?.error ?? {};
    const err = new Error(e.message || `HTTP ${r.status}`);
    Object.assign(err, { status: r.status, code: e.code });
    throw err;
  }
  return body;
}

async function poll() {
  const headers = { Authorization: `Bearer ${dash.token}` };
  const [info, metrics, ready, rooms] = await Promise.allSettled([
    getJson("/api/v1/realtime/info", headers),
    fetch("/metrics", { cache: "no-store" }).then((r) => (r.ok ? r.text() : Promise.reject(new Error(`HTTP ${r.status}`)))),
    fetch("/readyz", { cache: "no-store" }).then(async (r) => ({ status: r.status, body: await r.json().catch(() => ({})) })),
    isJwt(dash.token) ? getJson("/api/v1/syncplay/rooms", headers) : Promise.resolve(null),
  ]);
  dash.polls += 1;
  const now = Date.now();
  $("updated").textContent = `updated ${new Date(now).toLocaleTimeString()}`;

  if (info.status === "fulfilled") {
    $("error").textContent = "";
    renderInfo(info.value);
  } else {
    const err = info.reason;
    $("error").textContent =
      err.status === 401
        ? "The token was refused (UNAUTHORIZED)."
        : err.status === 403
          ? "This needs an admin token (role: admin) or an API key."
          : `Node statistics unavailable: ${err.message}`;
  }
  if (metrics.status === "fulfilled") renderMetrics(parseMetrics(metrics.value), now);
  if (ready.status === "fulfilled") renderHealth(ready.value);
  else renderHealth({ status: 0, body: { status: "unreachable", checks: {} } });
  if (rooms.status === "fulfilled") renderRooms(rooms.value);
  else renderRooms({ error: rooms.reason });
  renderChart();
}

function renderInfo(info) {
  dash.info = info;
  $("connections").textContent = fmt(info.connections);
  $("users").textContent = fmt(info.users);
  $("online-node").textContent = fmt(info.users);
  $("channels").textContent = fmt(info.channels);
  $("delivered").textContent = fmt(info.delivered);
  $("node").textContent = `${info.node_id} · v${info.version}`;
  const rows = [
    ["node", info.node_id],
    ["version", info.version],
    ["protocol", info.protocol],
    ["uptime", fmtDuration(info.uptime)],
    ["broker", info.broker],
    ["closing", info.closing ? "yes (draining)" : "no"],
  ];
  $("node-info").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: String(v ?? "–") })]));
}

function renderMetrics(samples, now) {
  const cur = {
    t: now,
    in: total(samples, "revenge_messages_in_total"),
    out: total(samples, "revenge_messages_out_total"),
    opened: total(samples, "revenge_connections_opened_total"),
  };
  const connections = dash.info?.connections ?? total(samples, "revenge_connections");
  let rateIn = null;
  let rateOut = null;
  let opened = null;
  const prev = dash.prev;
  if (prev && cur.t > prev.t) {
    const dt = (cur.t - prev.t) / 1000;
    rateIn = Math.max(0, (cur.in - prev.in) / dt);
    rateOut = Math.max(0, (cur.out - prev.out) / dt);
    opened = Math.max(0, (cur.opened - prev.opened) / dt);
  }
  dash.prev = cur;
  $("rate-in").textContent = fmt(rateIn, 1);
  $("rate-out").textContent = fmt(rateOut, 1);
  $("opened-rate").textContent = fmt(opened, 1);
  $("refused").textContent = fmt(total(samples, "revenge_handshakes_refused_total"));
  dash.samples.push({ t: now, connections, rateIn: rateIn ?? 0, rateOut: rateOut ?? 0 });
  if (dash.samples.length > MAX_SAMPLES) dash.samples.shift();

  const byCode = samples.filter((s) => s.name === "revenge_disconnects_total" && s.value > 0);
  byCode.sort((a, b) => b.value - a.value);
  $("closes").replaceChildren(
    ...(byCode.length
      ? byCode.map((s) =>
          el(
            "tr",
            {},
            el("td", { class: "mono", textContent: s.labels.code }),
            el("td", { class: "muted", textContent: CLOSE_MEANINGS[s.labels.code] ?? "" }),
            el("td", { textContent: fmt(s.value) }),
          ),
        )
      : [el("tr", {}, el("td", { colSpan: 3, class: "empty", textContent: "none" }))]),
  );
}

function renderHealth(ready) {
  const body = ready.body ?? {};
  const ok = ready.status === 200 && body.status === "ok";
  $("health-dot").className = `dot ${ok ? "ok" : body.closing ? "warn" : "bad"}`;
  $("health-text").textContent = ok ? "ready" : body.closing ? "draining" : `not ready (${body.status ?? ready.status})`;
  const checks = Object.entries(body.checks ?? {});
  $("checks").replaceChildren(
    ...checks.flatMap(([k, v]) => [
      el("dt", { textContent: k }),
      el("dd", {}, el("span", { class: `badge ${v === "ok" ? "ok" : "bad"}`, textContent: String(v) })),
    ]),
  );
}

function renderRooms(res) {
  const tbody = $("rooms");
  if (!res || res.error) {
    const err = res?.error;
    dash.rooms = null;
    $("room-count").textContent = "–";
    $("room-note").textContent =
      res === null ? "rooms need a JWT (not an API key)" : err?.status === 404 ? "SyncPlay is not enabled on this hub" : `unavailable: ${err?.message ?? ""}`;
    tbody.replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "empty", textContent: $("room-note").textContent })));
    return;
  }
  const rooms = res.rooms ?? [];
  dash.rooms = rooms;
  const members = rooms.reduce((n, r) => n + (r.member_count ?? 0), 0);
  $("room-count").textContent = fmt(rooms.length);
  $("room-note").textContent = `rooms · ${fmt(members)} members · ${rooms.filter((r) => r.state === "playing").length} playing`;
  tbody.replaceChildren(
    ...(rooms.length
      ? rooms.map((r) =>
          el(
            "tr",
            { "data-room": r.room_id },
            el("td", {}, r.name, " ", el("span", { class: "muted mono", textContent: r.room_id })),
            el("td", {}, el("span", { class: `badge ${r.state === "playing" ? "ok" : r.state === "waiting" ? "warn" : ""}`, textContent: r.state })),
            el("td", { textContent: `${r.member_count} / ${r.max_participants}` }),
            el("td", { textContent: r.control_mode }),
            el("td", { class: "mono", textContent: r.leader_id ?? "–" }),
          ),
        )
      : [el("tr", {}, el("td", { colSpan: 5, class: "empty", textContent: "no room" }))]),
  );
}

// ---------------------------------------------------------------- chart

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function renderChart() {
  const chart = $("chart");
  const W = 800;
  const H = 180;
  const pad = 18;
  const samples = dash.samples;
  const nodes = [];
  for (let i = 0; i <= 3; i++) {
    const y = pad + ((H - 2 * pad) * i) / 3;
    nodes.push(svg("line", { x1: 0, x2: W, y1: y, y2: y, class: "grid" }));
  }
  const series = [
    { key: "connections", color: "#7c8cff", label: "conn" },
    { key: "rateIn", color: "#4fd1c5", label: "in/s" },
    { key: "rateOut", color: "#f5b94a", label: "out/s" },
  ];
  const maxConn = Math.max(1, ...samples.map((s) => s.connections));
  const maxRate = Math.max(1, ...samples.map((s) => Math.max(s.rateIn, s.rateOut)));
  const x = (i) => (samples.length <= 1 ? W : (W * i) / (MAX_SAMPLES - 1) + (W * (MAX_SAMPLES - samples.length)) / (MAX_SAMPLES - 1));
  for (const s of series) {
    const max = s.key === "connections" ? maxConn : maxRate;
    const points = samples.map((p, i) => `${x(i).toFixed(1)},${(H - pad - ((H - 2 * pad) * p[s.key]) / max).toFixed(1)}`);
    if (points.length === 1) points.unshift(`${(W - 4).toFixed(1)},${points[0].split(",")[1]}`);
    nodes.push(svg("polyline", { points: points.join(" "), fill: "none", stroke: s.color, "stroke-width": 2, "stroke-linejoin": "round", "vector-effect": "non-scaling-stroke" }));
  }
  const axisL = svg("text", { x: 4, y: pad - 5, class: "axis" });
  axisL.textContent = `${fmt(maxConn)} connections`;
  const axisR = svg("text", { x: W - 4, y: pad - 5, class: "axis", "text-anchor": "end" });
  axisR.textContent = `${fmt(maxRate, 1)} msg/s`;
  nodes.push(axisL, axisR);
  chart.replaceChildren(...nodes);
}

// ---------------------------------------------------------------- live server events

function connectEvents(token) {
  dash.devices?.stop();
  dash.devices = null;
  dash.client?.close();
  dash.client = null;
  dash.online.clear();
  $("online-feed").replaceChildren();
  if (!isJwt(token)) return;
  const client = new RevengeClient("/api/v1/ws", { token, reconnect: true });
  dash.client = client;
  const box = $("events");
  const add = (text) => {
    box.querySelector(".empty")?.remove();
    box.prepend(el("div", { textContent: `${new Date().toLocaleTimeString()} ${text}` }));
    while (box.childElementCount > 100) box.lastElementChild.remove();
  };
  client.on("*", (msg) => {
    if (msg.channel === "server") add(`${msg.type} ${JSON.stringify(msg.data)}`);
  });
  client.on("client.connected", (ev) => {
    if (!ev.data.subscriptions?.some((s) => s.channel === "server")) add("(not an admin: no server channel)");
  });
  client.on("client.closed", (ev) => add(`event stream closed (${ev.data.code ?? ""} ${ev.data.reason})`));
  client.on("activity.presence", (msg) => {
    const change = dash.online.apply(msg);
    if (!change) return;
    const feed = $("online-feed");
    const time = new Date().toLocaleTimeString();
    for (const [users, verb] of [[change.online, "online"], [change.offline, "offline"]]) {
      for (const u of users) feed.prepend(el("div", { textContent: `${time} ${u.name} ${verb}` }));
    }
    while (feed.childElementCount > FEED_LENGTH) feed.lastElementChild.remove();
    renderOnline();
  });
  client.on("client.connected", () => {
    // Once: after a reconnect the client re-subscribes with `since` by itself.
    if (!client.channels.includes("activity")) client.subscribe("activity").catch(() => {});
  });
  // Now playing: the list once (and after every reconnect), then sessions.updated.
  const devices = new DeviceList(client, { all: true });
  dash.devices = devices;
  devices.on("change", () => renderNowPlaying());
  devices.on("error", () => renderNowPlaying());
  client.once("client.connected", () => {
    if (dash.devices === devices) devices.start().catch(() => {});
  });
  renderOnline();
  renderNowPlaying();
  client.start();
}

function renderNowPlaying() {
  const tbody = $("now-playing");
  const devices = dash.devices;
  const note = (text) => tbody.replaceChildren(el("tr", {}, el("td", { colSpan: 6, class: "empty", textContent: text })));
  if (!devices) {
    $("np-count").textContent = "–";
    $("np-note").textContent = "";
    note("Needs an admin JWT.");
    return;
  }
  if (!devices.loaded) {
    const err = devices.error;
    $("np-count").textContent = "–";
    note(err ? `Unavailable: ${err.code ?? ""} ${err.message ?? err}` : "Loading…");
    return;
  }
  const list = devices.list();
  const playing = list.filter((d) => d.now_playing && d.now_playing.state !== "stopped");
  $("np-count").textContent = fmt(playing.length);
  $("np-note").textContent = `${fmt(list.length)} devices · ${fmt(new Set(list.map((d) => d.user_id)).size)} users`;
  if (!list.length) {
    note("No device is connected.");
    return;
  }
  const now = dash.client?.serverTime() ?? Date.now();
  // Playing first, then paused, then idle devices.
  const rank = (d) => ({ playing: 0, buffering: 1, paused: 2 })[d.now_playing?.state] ?? 3;
  const rows = [...list].sort((a, b) => rank(a) - rank(b));
  tbody.replaceChildren(
    ...rows.map((d) => {
      const np = d.now_playing;
      const at = np ? nowPlayingPosition(np, now) : 0;
      const fill = el("div");
      fill.style.width = np?.duration ? `${Math.min(100, (100 * at) / np.duration).toFixed(1)}%` : "0%";
      const st = np?.state ?? "idle";
      return el(
        "tr",
        { "data-device": `${d.user_id}/${d.device_id}`, "data-state": st },
        el("td", { class: "mono", textContent: d.user_id }),
        el("td", {}, d.name, " ", el("span", { class: `badge ${st === "playing" ? "ok" : st === "buffering" ? "warn" : st === "paused" ? "accent" : ""}`, textContent: st })),
        el("td", { class: "muted", textContent: `${d.client} ${d.version}` }),
        el("td", { title: np?.item_id ?? "", textContent: np ? np.title || np.item_id : "–" }),
        el(
          "td",
          { class: "progress" },
          np ? el("div", { class: "bar" }, fill) : null,
          np ? el("span", { class: "mono muted", textContent: `${fmtClock(at)}${np.duration ? ` / ${fmtClock(np.duration)}` : ""}` }) : null,
        ),
        el(
          "td",
          {},
          np?.play_method
            ? el("span", { class: `badge ${np.play_method === "transcode" ? "warn" : "ok"}`, textContent: np.play_method, title: np.transcode_job_id ? `job ${np.transcode_job_id}` : "" })
            : "–",
        ),
      );
    }),
  );
}

function fmtClock(s) {
  if (!Number.isFinite(s)) return "0:00";
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(Math.floor(s % 60)).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

// Positions move while playing: re-render every second.
setInterval(() => {
  if (dash.devices?.loaded) renderNowPlaying();
}, 1000);

function renderOnline() {
  const users = [...dash.online.users];
  $("online-count").textContent = dash.client ? fmt(users.length) : "–";
  $("online-users").replaceChildren(
    ...(users.length
      ? users.map(([id, name]) => el("li", { "data-user": id, title: id }, el("span", { class: "dot ok" }), name))
      : [el("li", { class: "empty", textContent: dash.client ? "Nobody came online since this page connected." : "Needs an admin JWT." })]),
  );
}

// ---------------------------------------------------------------- start

function start(token) {
  stop();
  dash.token = token;
  dash.samples = [];
  dash.prev = null;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("health-text").textContent = "loading…";
  const tick = async () => {
    try {
      await poll();
    } catch (err) {
      $("error").textContent = String(err?.message ?? err);
    }
    if (dash.token === token) dash.timer = setTimeout(tick, dash.interval);
  };
  tick();
  connectEvents(token);
}

function stop() {
  if (dash.timer) clearTimeout(dash.timer);
  dash.timer = null;
  dash.token = "";
  dash.devices?.stop();
  dash.devices = null;
  dash.client?.close();
  dash.client = null;
  dash.online.clear();
  renderOnline();
  renderNowPlaying();
}

$("interval").value = String(dash.interval);
if (!$("interval").value) {
  $("interval").append(el("option", { value: String(dash.interval), textContent: `every ${dash.interval} ms` }));
  $("interval").value = String(dash.interval);
}
$("interval").addEventListener("change", () => {
  dash.interval = Number($("interval").value);
});
$("signin").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = $("token").value.trim();
  if (token) start(token);
});
$("signout").addEventListener("click", () => {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  $("health-text").textContent = "not signed in";
  $("health-dot").className = "dot";
});
renderChart();
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) {
  $("token").value = saved;
  start(saved);
}
