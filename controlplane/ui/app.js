// meshproxy console: polls the control plane's JSON APIs (the ones meshctl uses) once a second
// and redraws the visible view.  No framework, no build step; every value is set as text.
"use strict";

const DELIVERY = "/apis/delivery.meshproxy.io/v1";
const POLL_MS = 1000;
let view = "canaries";
const openDiffs = new Set();

// ------------------------------------------------------------------ helpers

const TOKEN_KEY = "meshproxy-token";   // per browser tab, never in the URL

async function api(path, options = {}) {
  const headers = { "content-type": "application/json", "x-meshctl-user": "console" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) document.getElementById("login").hidden = false;
  if (!response.ok) throw new Error(body.message || `${response.status} ${path}`);
  return body;
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  document.getElementById("login").hidden = true;
  refresh();
});

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const clock = (at) => (at ? new Date(at * 1000).toLocaleTimeString() : "–");

function toast(message) {
  const t = document.getElementById("toast");
  t.textContent = message;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// ------------------------------------------------------------------ canaries

function weightChart(status) {
  const width = 720, height = 160, left = 34, right = 10, top = 10, bottom = 22;
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
  const weights = status.weights || [];
  const checks = status.checks || [];
  const times = weights.map((w) => w.at).concat(checks.map((c) => c.at));
  const t0 = Math.min(...times, Date.now() / 1000), t1 = Math.max(...times, t0 + 1);
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (width - left - right);
  const y = (w) => top + (1 - w / 100) * (height - top - bottom);
  for (const w of [0, 50, 100]) {
    chart.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: y(w), y2: y(w) }));
    const label = svg("text", { x: 4, y: y(w) + 3 });
    label.textContent = `${w}%`;
    chart.append(label);
  }
  if (weights.length) {
    let d = `M ${x(weights[0].at)} ${y(weights[0].weight)}`;
    for (let i = 1; i < weights.length; i++) d += ` H ${x(weights[i].at)} V ${y(weights[i].weight)}`;
    d += ` H ${x(t1)}`;
    chart.append(svg("path", { class: "step", d }));
  }
  for (const c of checks) {
    const dot = svg("circle", { class: `check ${c.verdict}`, cx: x(c.at), cy: y(c.weight), r: 4 });
    const title = svg("title");
    title.textContent = `${clock(c.at)} ${c.verdict} at ${c.weight}%: ${c.reason}`;
    dot.append(title);
    chart.append(dot);
  }
  chart.dataset.points = String(weights.length);
  chart.dataset.checks = String(checks.length);
  return chart;
}

function checkRows(status) {
  return (status.checks || []).slice(-8).reverse().map((c) => {
    const numbers = (c.metrics || []).map((m) =>
      `${m.name}: ${fmt(m.value, 2)} (stable ${fmt(m.stable, 2)}, ${m.threshold}${m.pValue !== null ? `, p=${Number(m.pValue).toPrecision(2)}` : ""})`).join("; ");
    const w = c.window ? `${c.window.canary.requests} canary / ${c.window.stable.requests} stable requests` : "";
    return el("tr", {}, el("td", { text: clock(c.at) }), el("td", { class: "num", text: `${c.weight}%` }),
      el("td", { class: `verdict-${c.verdict}`, text: c.verdict }), el("td", { text: w }),
      el("td", { text: numbers || c.reason }));
  });
}

async function act(ns, name, action) {
  if (!window.confirm(`${action} canary ${ns}/${name}?`)) return;
  try {
    const answer = await api(`${DELIVERY}/namespaces/${ns}/canaries/${name}/${action}`, { method: "POST", body: "{}" });
    toast(answer.message);
    refresh();
  } catch (err) {
    toast(`${action} failed: ${err.message}`);
  }
}

function canaryCard(item) {
  const { namespace: ns, name } = item.metadata;
  const s = item.status || {};
  const spec = item.spec;
  const terminal = s.phase === "Succeeded" || s.phase === "Failed";
  const buttons = el("div", { class: "actions" },
    el("button", { class: "promote", onclick: () => act(ns, name, "promote"), disabled: terminal, text: "Promote" }),
    s.paused
      ? el("button", { class: "resume", onclick: () => act(ns, name, "resume"), disabled: terminal, text: "Resume" })
      : el("button", { class: "pause", onclick: () => act(ns, name, "pause"), disabled: terminal, text: "Pause" }),
    el("button", { class: "abort danger", onclick: () => act(ns, name, "abort"), disabled: terminal, text: "Abort" }));
  const decision = s.lastDecision;
  return el("div", { class: "card", "data-canary": `${ns}/${name}` },
    el("h3", {}, `${ns}/${name} `, el("span", { class: `phase ${s.phase}`, text: s.phase || "Pending" }), " ",
      s.paused ? el("span", { class: "paused", text: "paused" }) : null),
    el("div", { class: "facts" },
      el("span", {}, "service ", el("b", { text: spec.host })),
      el("span", {}, el("b", { text: spec.stable }), " → ", el("b", { text: spec.canary })),
      el("span", {}, "weight ", el("b", { class: "weight", text: `${s.canaryWeight ?? 0}%` })),
      el("span", {}, "checks ", el("b", { class: "passed", text: String(s.passedChecks ?? 0) }), " passed, ",
        el("b", { class: "failed", text: String(s.failedChecks ?? 0) }), ` failed of ${(spec.analysis || {}).threshold ?? 1}`)),
    el("div", { class: "message muted", text: s.message || "" }),
    s.paused ? el("div", { class: "paused-reason", text: `paused: ${s.paused.reason}` }) : null,
    buttons,
    weightChart(s),
    decision && decision.verdict === "no-data" ? el("div", { class: "muted", text: `now: ${decision.reason}` }) : null,
    el("table", { class: "checks" },
      el("thead", {}, el("tr", {}, ...["time", "weight", "verdict", "window", "numbers"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...checkRows(s))));
}

async function showCanaries() {
  const list = await api(`${DELIVERY}/canaries`);
  document.getElementById("no-canaries").hidden = list.items.length > 0;
  document.getElementById("canary-list").replaceChildren(...list.items.map(canaryCard));
}

// ------------------------------------------------------------------ traffic

async function showTraffic() {
  const traffic = await api("/delivery/v1/traffic");
  document.getElementById("traffic-window").textContent = traffic.seconds ? `(last ${fmt(traffic.seconds, 1)} s)` : "(measuring…)";
  fillRows(document.querySelector("#traffic tbody"), traffic.items.map((t) =>
    el("tr", { "data-key": `${t.service}|${t.version}` },
      el("td", { text: t.service }), el("td", { text: t.version }),
      el("td", { class: "num rps", text: fmt(t.requestsPerSecond, 1) }),
      el("td", { class: "num success", text: t.successRate === null ? "–" : `${fmt(t.successRate, 2)}%` }),
      el("td", { class: "num", text: fmt(t.p50, 1) }), el("td", { class: "num", text: fmt(t.p99, 1) }),
      el("td", { class: "num share", text: t.observedShare === null ? "–" : `${fmt(t.observedShare, 1)}%` }))));
  fillRows(document.querySelector("#splits tbody"), (traffic.configured || []).map((c) =>
    el("tr", { "data-key": c.service },
      el("td", { text: c.service }), el("td", { text: c.virtualService }), el("td", { text: c.route }),
      el("td", { class: "configured", text: Object.entries(c.weights).map(([sub, w]) => `${sub}=${c.versions[sub]}: ${w}%`).join(", ") }))));
}

// ------------------------------------------------------------------ mesh

// the certificate the proxy holds now (its metrics), else the one its push stream connected with
function expiry(p, live) {
  const expiresAt = live ? live.expiresAt : p.cert_expires_at;
  if (!expiresAt) return "–";
  const left = expiresAt - Date.now() / 1000;
  const h = Math.floor(Math.max(0, left) / 3600), m = Math.floor((Math.max(0, left) % 3600) / 60);
  const at = new Date(expiresAt * 1000), pad = (n) => String(n).padStart(2, "0");
  const when = `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())} ${pad(at.getHours())}:${pad(at.getMinutes())}`;
  const failing = live && live.renewalFailing ? ", renewal failing" : "";
  return `${when} (${left <= 0 ? "expired" : `in ${h}h ${m}m`}${failing})`;
}

function refusals(edge) {
  const parts = Object.entries(edge.refused).map(([reason, n]) => `${n} connection(s) refused: ${reason.replaceAll("_", " ")}`);
  if (edge.denied) parts.push(`${edge.denied} denied by AuthorizationPolicy`);
  return parts.join("; ");
}

async function showMesh() {
  const [drs, workloads, proxies, traffic] = await Promise.all([
    api("/apis/networking.istio.io/v1/destinationrules"), api("/registry/v1/workloads"), api("/push/v1/proxies"),
    api("/delivery/v1/traffic")]);
  const services = new Map();
  for (const w of workloads.items) {
    const key = `${w.service}.${w.namespace}`;
    if (!services.has(key)) services.set(key, { subsets: [], endpoints: [] });
    services.get(key).endpoints.push(`${w.address}:${Object.values(w.ports).join(",")} ${Object.entries(w.labels).map(([k, v]) => `${k}=${v}`).join(",")}`);
  }
  for (const dr of drs.items) {
    const short = dr.spec.host.split(".")[0];
    const key = `${short}.${dr.spec.host.split(".")[1] || dr.metadata.namespace}`;
    if (!services.has(key)) services.set(key, { subsets: [], endpoints: [] });
    for (const s of dr.spec.subsets || []) services.get(key).subsets.push(`${s.name} (${Object.entries(s.labels || {}).map(([k, v]) => `${k}=${v}`).join(",")})`);
  }
  fillRows(document.querySelector("#services tbody"), [...services.entries()].sort().map(([key, s]) =>
    el("tr", {}, el("td", { text: key }), el("td", { text: s.subsets.join(", ") || "–" }),
      el("td", { text: s.endpoints.join("; ") || "–" }))));
  fillRows(document.querySelector("#proxies tbody"), proxies.items.map((p) =>
    el("tr", { "data-node": p.node_id },
      el("td", { text: p.node_id }), el("td", { text: p.mode }),
      el("td", { text: Object.entries(p.labels).map(([k, v]) => `${k}=${v}`).join(",") || "–" }),
      el("td", { class: "identity", text: p.principal || "none (no workload certificate)" }),
      el("td", { class: "expires", text: expiry(p, (traffic.certificates || {})[p.node_id]) }),
      el("td", { class: "state", text: p.state }),
      el("td", { class: "version", title: p.acked_version || "", text: p.acked_version ? p.acked_version.slice(0, 8) : "–" }),
      el("td", { text: p.last_nack ? `${p.last_nack.version}: ${p.last_nack.errors.join(" | ")}` : "–" }))));
  const identities = new Map(proxies.items.map((p) => [p.node_id, p.principal]));
  fillRows(document.querySelector("#edges tbody"), (traffic.edges || []).map((e) => e.source === null
    ? el("tr", { class: "refused", "data-edge": `${e.destination}|refused` },
        el("td", { class: "muted", text: "plaintext or unauthorized callers" }), el("td", { text: "→" }),
        el("td", { text: e.destination }), el("td", { class: "bad", colspan: "3", text: refusals(e) }))
    : el("tr", { "data-edge": `${e.destination}|${e.source}` },
        el("td", { class: "source", text: e.source === "unknown" ? "unknown (no client certificate)" : e.source }),
        el("td", { text: "→" }),
        el("td", { text: `${e.destination} (${identities.get(e.destination) || "no identity"})` }),
        el("td", { class: e.mutualTls ? "mtls ok" : "mtls bad", text: e.mutualTls ? "mutual TLS" : "plaintext" }),
        el("td", { class: "num", text: fmt(e.requestsPerSecond, 1) }), el("td", { class: "num", text: String(e.requests) }))));
}

// ------------------------------------------------------------------ history

function lineDiff(before, after) {
  const a = before ? JSON.stringify(before.spec, null, 2).split("\n") : [];
  const b = after ? JSON.stringify(after.spec, null, 2).split("\n") : [];
  if (a.length * b.length > 250000) return [...a.map((l) => ["-", l]), ...b.map((l) => ["+", l])];
  const lcs = Array.from({ length: a.length + 1 }, () => new Array(b.length + 1).fill(0));
  for (let i = a.length - 1; i >= 0; i--)
    for (let j = b.length - 1; j >= 0; j--)
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < a.length || j < b.length) {
    if (i < a.length && j < b.length && a[i] === b[j]) { out.push([" ", a[i]]); i++; j++; }
    else if (j < b.length && (i === a.length || lcs[i][j + 1] >= lcs[i + 1][j])) { out.push(["+", b[j]]); j++; }
    else { out.push(["-", a[i]]); i++; }
  }
  return out;
}

async function rollback(revision) {
  if (!window.confirm(`Roll the mesh back to revision ${revision}?`)) return;
  try {
    const answer = await api(`/history/${revision}/rollback`, { method: "POST", body: "{}" });
    toast(`rolled back to ${answer.rolled_back_to}: now revision ${answer.revision}`);
    refresh();
  } catch (err) {
    toast(`rollback failed: ${err.message}`);
  }
}

async function showHistory() {
  const history = await api("/history?limit=100");
  const rows = [];
  for (const e of history.items) {
    const key = `${e.revision}/${e.kind}/${e.namespace}/${e.name}`;
    rows.push(el("tr", { "data-revision": String(e.revision) },
      el("td", { class: "num", text: String(e.revision) }), el("td", { text: clock(e.at) }), el("td", { text: e.op }),
      el("td", { text: `${e.kind} ${e.namespace}/${e.name}` }), el("td", { text: e.origin }),
      el("td", {},
        el("button", { class: "diff", text: openDiffs.has(key) ? "hide diff" : "diff",
          onclick: () => { openDiffs.has(key) ? openDiffs.delete(key) : openDiffs.add(key); refresh(); } }), " ",
        el("button", { class: "rollback danger", text: "rollback here", onclick: () => rollback(e.revision) }))));
    if (openDiffs.has(key)) {
      const pre = el("pre", { class: "diff" });
      for (const [mark, line] of lineDiff(e.before, e.after))
        pre.append(el("span", { class: mark === "+" ? "add" : mark === "-" ? "del" : "", text: `${mark} ${line}\n` }));
      rows.push(el("tr", { class: "diff-row" }, el("td", { colspan: "6" }, pre)));
    }
  }
  fillRows(document.querySelector("#history tbody"), rows);
}

// ------------------------------------------------------------------ the loop

const VIEWS = { canaries: showCanaries, traffic: showTraffic, mesh: showMesh, history: showHistory };

async function refresh() {
  try {
    await VIEWS[view]();
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("updated").textContent = `control plane unreachable: ${err.message}`;
  }
}

function select(name) {
  view = VIEWS[name] ? name : "canaries";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  refresh();
}

window.addEventListener("hashchange", () => select(location.hash.slice(1)));
select(location.hash.slice(1));
setInterval(refresh, POLL_MS);
