// The wasmgate dashboard: reads /events (server-sent events, one snapshot of totals a
// second) with fetch, so the admin token goes in the Authorization header and never in a
// URL; turns totals into rates by comparing snapshots; draws the last minutes per server.
// No library, no build step.
"use strict";

const TOKEN_KEY = "wasmgate-admin-token";
const HISTORY_POINTS = 300; // 5 minutes at one snapshot a second
const WINDOW_MS = 60000; // plugin call-time percentiles over the last minute

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let snapshots = []; // recent snapshots, oldest first, for rates and windows
const history = new Map(); // "pool/server" -> [{conns, inRate, outRate}]
let clusterShown = false;

const $ = (id) => document.getElementById(id);

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function authHeaders() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status" + (kind ? " " + kind : "");
}

function askForToken(why) {
  $("login-why").textContent = why;
  $("login").hidden = false;
  $("main").hidden = true;
  $("token").focus();
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("login").hidden = true;
  connect();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  token = "";
  location.reload();
});

// Reads the event stream until it ends; each `data:` line is one JSON snapshot.
async function connect() {
  setStatus("connecting…");
  let response;
  try {
    response = await fetch("/events", { headers: authHeaders(), cache: "no-store" });
  } catch (err) {
    return retry("gateway unreachable");
  }
  if (response.status === 401) {
    return askForToken(token ? "The admin token was refused; enter it again." : "This dashboard's data needs the gateway's admin token.");
  }
  if (response.status === 403) {
    setStatus("locked", "error");
    return askForToken("The admin API is locked: set [gateway] admin_token in the gateway's config.");
  }
  if (!response.ok || !response.body) {
    return retry("HTTP " + response.status);
  }
  $("forget").hidden = !token;
  $("login").hidden = true;
  $("main").hidden = false;
  setStatus("live", "live");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
        if (data) onSnapshot(JSON.parse(data));
      }
    }
  } catch (err) {
    // The stream broke; reconnect below.
  }
  retry("stream ended");
}

function retry(why) {
  setStatus("reconnecting (" + why + ")", "error");
  setTimeout(connect, 2000);
}

function onSnapshot(snap) {
  snapshots.push(snap);
  while (snapshots.length > 2 && snap.time_ms - snapshots[1].time_ms > WINDOW_MS) snapshots.shift();
  const prev = snapshots.length > 1 ? snapshots[snapshots.length - 2] : null;
  const secs = prev ? Math.max((snap.time_ms - prev.time_ms) / 1000, 0.001) : 1;
  const rate = (now, before) => (prev ? Math.max(now - before, 0) / secs : 0);
  renderTotals(snap, prev, rate);
  renderPools(snap, prev, rate);
  renderPlugins(snap, prev, rate);
  renderRoutes(snap);
  pollCluster();
}

function fmtRate(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return n >= 10 || n === 0 ? Math.round(n).toString() : n.toFixed(1);
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? Math.round(n) : n.toFixed(1)) + " " + units[i];
}

function fmtSeconds(s) {
  if (s === null) return "–";
  if (s === Infinity) return "&gt; 50 ms";
  if (s < 0.001) return "≤ " + Math.round(s * 1e6) + " µs";
  return "≤ " + +(s * 1000).toFixed(2) + " ms";
}

function renderTotals(snap, prev, rate) {
  const g = snap.gateway;
  const p = prev ? prev.gateway : g;
  $("totals").textContent =
    g.connections_active + " live · " + fmtRate(rate(g.connections_total, p.connections_total)) + " conn/s · " +
    fmtRate(rate(g.messages_from_client, p.messages_from_client)) + " msg/s in · " +
    fmtRate(rate(g.messages_from_upstream, p.messages_from_upstream)) + " msg/s out · " +
    g.handshakes_refused + " refused";
}

function serverState(s) {
  if (s.draining) return "draining";
  if (!s.healthy) return "down";
  if (s.ejected_for_ms > 0) return "ejected";
  return "up";
}

function findServer(snap, pool, key) {
  if (!snap) return null;
  const p = snap.pools.find((x) => x.name === pool);
  return p ? p.servers.find((x) => x.key === key) : null;
}

function renderPools(snap, prev, rate) {
  const html = snap.pools.map((pool) => {
    const health = pool.health
      ? pool.health.kind + " checks every " + pool.health.interval_ms + " ms"
      : "no active health checks";
    const rows = pool.servers.map((s) => {
      const before = findServer(prev, pool.name, s.key) || s;
      const id = pool.name + "/" + s.key;
      const point = {
        conns: s.relayed_now,
        inRate: rate(s.messages_from_client, before.messages_from_client),
        outRate: rate(s.messages_from_upstream, before.messages_from_upstream),
      };
      const points = history.get(id) || [];
      points.push(point);
      if (points.length > HISTORY_POINTS) points.shift();
      history.set(id, points);
      const state = serverState(s);
      const action = s.draining ? "undrain" : "drain";
      return `<tr data-server="${escapeHtml(id)}" data-state="${state}">
        <td>${escapeHtml(s.key)}</td>
        <td><span class="badge ${state}">${state}</span></td>
        <td class="num live">${s.relayed_now}</td>
        <td class="num total">${s.total}</td>
        <td class="num">${fmtRate(rate(s.total, before.total))}</td>
        <td class="num msgs-in">${fmtRate(point.inRate)}</td>
        <td class="num msgs-out">${fmtRate(point.outRate)}</td>
        <td class="num">${fmtBytes(rate(s.bytes_from_client, before.bytes_from_client))}/s</td>
        <td class="num">${fmtBytes(rate(s.bytes_from_upstream, before.bytes_from_upstream))}/s</td>
        <td class="num">${s.ewma_connect_us ? (s.ewma_connect_us / 1000).toFixed(2) + " ms" : "–"}</td>
        <td>${chart(points)}</td>
        <td><button type="button" class="${action}" data-action="${action}" data-pool="${escapeHtml(pool.name)}" data-key="${escapeHtml(s.key)}">${action}</button></td>
      </tr>`;
    }).join("");
    return `<div class="pool" data-pool="${escapeHtml(pool.name)}">
      <h3>${escapeHtml(pool.name)}<span class="meta">${pool.available}/${pool.servers.length} available ·
        balancer ${escapeHtml(pool.balancer || "round robin")} · ${escapeHtml(health)}</span></h3>
      <table><thead><tr><th>server</th><th>state</th><th>live</th><th>total</th><th>conn/s</th>
        <th>msg/s in</th><th>msg/s out</th><th>bytes/s in</th><th>bytes/s out</th><th>EWMA connect</th>
        <th>last ${HISTORY_POINTS / 60} min <span class="legend">(live, <span class="in">in</span>, <span class="out">out</span>)</span></th><th></th></tr></thead>
      <tbody>${rows}</tbody></table></div>`;
  }).join("");
  $("pools").innerHTML = html;
}

// An inline SVG: live connections (scaled to their own maximum) and messages per second
// each way (scaled to theirs).
function chart(points) {
  const w = 180, h = 36;
  const n = HISTORY_POINTS;
  const maxConns = Math.max(1, ...points.map((p) => p.conns));
  const maxRate = Math.max(1, ...points.map((p) => Math.max(p.inRate, p.outRate)));
  const line = (f, max) => points.map((p, i) => {
    const x = (w * (n - points.length + i)) / (n - 1);
    const y = h - 2 - ((h - 4) * f(p)) / max;
    return x.toFixed(1) + "," + y.toFixed(1);
  }).join(" ");
  return `<svg class="chart" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}">
    <polyline class="in" points="${line((p) => p.inRate, maxRate)}"/>
    <polyline class="out" points="${line((p) => p.outRate, maxRate)}"/>
    <polyline class="conns" points="${line((p) => p.conns, maxConns)}"/>
    <title>max ${maxConns} live, ${fmtRate(maxRate)} msg/s</title></svg>`;
}

$("pools").addEventListener("click", async (e) => {
  const button = e.target.closest("button[data-action]");
  if (!button) return;
  if (!token) return askForToken("Draining needs the gateway's admin token.");
  const { action, pool, key } = button.dataset;
  const url = "/upstreams/" + encodeURIComponent(pool) + "/servers/" + encodeURIComponent(key) + "/" + action;
  button.disabled = true;
  const response = await fetch(url, { method: "POST", headers: authHeaders() });
  if (response.status === 401) return askForToken("The admin token was refused; enter it again.");
  if (!response.ok) {
    const body = await response.text();
    alert(action + " failed: " + body);
  }
});

// p-quantile of a histogram's bucket counts: the upper bound of the bucket it falls in.
function quantile(bounds, counts, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    seen += counts[i];
    if (seen >= q * total) return i < bounds.length ? bounds[i] : Infinity;
  }
  return Infinity;
}

function renderPlugins(snap, prev, rate) {
  const oldest = snapshots[0];
  const rows = snap.plugins.map((p) => {
    const before = (prev && prev.plugins.find((x) => x.name === p.name)) || p;
    const start = oldest.plugins.find((x) => x.name === p.name) || p;
    const sum = (o) => Object.values(o).reduce((a, b) => a + b, 0);
    const hooks = Object.entries(p.hooks).filter(([, on]) => on).map(([h]) => h).join(", ");
    const errors = Object.entries(p.errors).filter(([, n]) => n > 0).map(([kind, n]) => kind + " " + n).join(", ") || "none";
    // Bucket counts of the window, all hooks together.
    const windowCounts = p.call_time_bounds.concat([0]).map((_, i) =>
      Object.keys(p.call_time_counts).reduce((acc, hook) => acc + p.call_time_counts[hook][i] - (start.call_time_counts[hook] || [])[i], 0));
    return `<tr data-plugin="${escapeHtml(p.name)}">
      <td>${escapeHtml(p.name)}</td><td>${escapeHtml(hooks)}</td>
      <td class="num">${fmtRate(rate(sum(p.calls), sum(before.calls)))}</td>
      <td class="num">${sum(p.calls)}</td>
      <td class="${errors === "none" ? "" : "error-text"}">${escapeHtml(errors)}</td>
      <td class="num">${fmtSeconds(quantile(p.call_time_bounds, windowCounts, 0.5))}</td>
      <td class="num">${fmtSeconds(quantile(p.call_time_bounds, windowCounts, 0.99))}</td>
      <td class="num">${p.idle_instances} idle${p.instance_failures ? ", " + p.instance_failures + " failing" : ""}</td></tr>`;
  }).join("");
  document.querySelector("#plugins tbody").innerHTML = rows || '<tr><td colspan="8" class="note">no plugins</td></tr>';
}

function renderRoutes(snap) {
  const rows = snap.routes.map((r) => `<tr><td>${escapeHtml(r.host || "any")}</td><td>${escapeHtml(r.path)}</td>
    <td>${escapeHtml(r.upstream)}</td><td>${escapeHtml(r.plugins.join(" → ") || "–")}</td></tr>`).join("");
  document.querySelector("#routes tbody").innerHTML = rows;
}

// The cluster's instances, once the gateway has `GET /cluster`; hidden while it has not.
let clusterCheckedAt = 0;
async function pollCluster() {
  if (Date.now() - clusterCheckedAt < 5000) return;
  clusterCheckedAt = Date.now();
  let body = null;
  try {
    const response = await fetch("/cluster", { headers: authHeaders(), cache: "no-store" });
    if (response.ok) body = await response.json();
  } catch (err) {
    body = null;
  }
  clusterShown = body !== null;
  $("cluster-panel").hidden = !clusterShown;
  if (!clusterShown) return;
  const instances = Array.isArray(body) ? body : body.instances || [];
  if (instances.length === 0) {
    $("cluster").innerHTML = "<pre>" + escapeHtml(JSON.stringify(body, null, 2)) + "</pre>";
    return;
  }
  const keys = Array.from(new Set(instances.flatMap((i) => Object.keys(i))));
  $("cluster").innerHTML = `<table><thead><tr>${keys.map((k) => `<th>${escapeHtml(k)}</th>`).join("")}</tr></thead><tbody>` +
    instances.map((i) => `<tr>${keys.map((k) => `<td>${escapeHtml(typeof i[k] === "object" ? JSON.stringify(i[k]) : i[k] ?? "")}</td>`).join("")}</tr>`).join("") +
    "</tbody></table>";
}

connect();
