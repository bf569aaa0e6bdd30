// raygate's status page: polls /ui/state every 2 s and draws it. No library, no network
// beyond raygate itself. Text from the server only ever goes into textContent (never HTML).
"use strict";

const POLL_MS = 2000;
const SERVICE = document.body.dataset.service || "";
const CSRF = (document.querySelector('meta[name="raygate-csrf"]') || {}).content || "";
const PALETTE = ["#2563eb", "#f59e0b", "#10b981", "#a855f7", "#0891b2", "#84cc16", "#64748b"];  // no red: red means errors
const colors = new Map();
const SVG = "http://www.w3.org/2000/svg";

// A cluster's colour comes from its id (the same on every page and after a reload); two
// clusters of one service that hash alike are told apart by the next free colour, the one
// whose id sorts first keeping its own.
function hashIndex(id) {
  let x = 0;
  for (let i = 0; i < id.length; i++) x = (x * 31 + id.charCodeAt(i)) >>> 0;
  return x % PALETTE.length;
}

function assignColors(ids) {
  const used = new Set();
  for (const id of [...new Set(ids)].sort()) {
    let i = hashIndex(id);
    for (let n = 0; n < PALETTE.length && used.has(i); n++) i = (i + 1) % PALETTE.length;
    used.add(i);
    colors.set(id, PALETTE[i]);
  }
}

function color(cluster) {
  if (!colors.has(cluster)) colors.set(cluster, PALETTE[hashIndex(cluster)]);
  return colors.get(cluster);
}

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = v;
    else if (k === "onclick") el.addEventListener("click", v);
    else if (k === "color") el.style.background = v;
    else if (k === "width") el.style.width = v;
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "string" || typeof c === "number" ? String(c) : c);
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c);
  return el;
}

function ago(t) {
  if (!t) return "";
  const d = Math.max(0, Date.now() / 1000 - t);
  if (d < 60) return `${Math.round(d)} s ago`;
  if (d < 3600) return `${Math.round(d / 60)} min ago`;
  if (d < 86400) return `${Math.round(d / 3600)} h ago`;
  return new Date(t * 1000).toLocaleDateString();
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString();
}

function badge(word, kind) {
  return h("span", { class: `badge ${kind || ""} b-${String(word).replace(/[^a-z_]/g, "")}`, text: word });
}

function clusterName(c) {
  return h("span", { class: "cluster" }, h("i", { class: "dot", color: color(c) }), h("code", { text: c }));
}

// ---- actions: the admin API's own routes, with the session's CSRF header
async function act(name, kind, body) {
  const what = kind === "delete" ? `Delete service ${name}? Its clusters are stopped.`
    : kind === "rollback" ? `Roll ${name} back to the previous revision?`
    : `${kind[0].toUpperCase() + kind.slice(1)} the rollout of ${name}?`;
  if (!window.confirm(what)) return;
  const url = kind === "delete" ? `/v1/services/${encodeURIComponent(name)}`
    : `/v1/services/${encodeURIComponent(name)}/${kind}`;
  try {
    const r = await fetch(url, {
      method: kind === "delete" ? "DELETE" : "POST",
      headers: { "Content-Type": "application/json", "X-Raygate-CSRF": CSRF },
      body: kind === "delete" ? undefined : JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    const out = await r.json().catch(() => ({}));
    toast(r.ok ? `${kind}: accepted` : `${kind} refused: ${out.detail || r.status}`, !r.ok);
  } catch (e) {
    toast(`${kind} failed: ${e}`, true);
  }
  poll();
}

function toast(text, bad) {
  const t = h("div", { class: `toast ${bad ? "bad" : ""}`, role: "status", text });
  document.body.append(t);
  setTimeout(() => t.remove(), 6000);
}

function actions(svc) {
  const b = (kind, label, danger) => h("button", {
    class: danger ? "danger" : "", "data-action": kind, text: label,
    onclick: () => act(svc.name, kind),
  });
  const out = [];
  // A service being deleted takes no command (the API's 409): no button that cannot work
  if (svc.phase === "deleting") return h("div", { class: "actions" }, out);
  if (svc.pending) {
    // promote/pause/resume apply once the canary walks its steps (before: the API's 409)
    if (svc.pending.strategy === "canary" && svc.pending.step === "canary") {
      out.push(b("promote", "Promote"));
      // Held by `pause` or for lack of data: resume goes on (a no-data hold waits for it)
      if (svc.pending.hold) out.push(b("resume", "Resume"));
      if (svc.pending.hold !== "user") out.push(b("pause", "Pause"));
    }
    out.push(b("abort", "Abort", true));
  }
  if (svc.active) out.push(b("rollback", "Roll back"));
  out.push(b("delete", "Delete", true));
  return h("div", { class: "actions" }, out);
}

// ---- traffic share per cluster, as one bar
function traffic(svc) {
  const entries = Object.entries(svc.traffic || {}).filter(([, w]) => w > 0);
  const clusters = new Set([...Object.keys(svc.traffic || {}), ...Object.keys(svc.in_flight || {})]);
  const total = entries.reduce((a, [, w]) => a + w, 0) || 1;
  const bar = h("div", { class: "bar", role: "img", "aria-label": "traffic share" },
    entries.length ? entries.map(([c, w]) => h("div", {
      class: "seg", color: color(c), width: `${(100 * w) / total}%`, title: `${c}: ${Math.round((100 * w) / total)}%`,
    }, (100 * w) / total >= 12 ? `${Math.round((100 * w) / total)}%` : "")) : h("div", { class: "seg none", width: "100%", text: "no traffic routed" }));
  const legend = h("div", { class: "legend" }, [...clusters].map((c) => h("span", { class: "leg" },
    clusterName(c),
    h("b", { text: ` ${Math.round((100 * ((svc.traffic || {})[c] || 0)) / total)}%` }),
    h("span", { class: "muted", text: ` · ${(svc.in_flight || {})[c] || 0} in flight` }))));
  return h("div", { class: "traffic" }, h("h3", { text: "Traffic" }), bar, legend);
}

// ---- small line chart from the sampled counters
function chart(title, rates, key, fmt, minTop) {
  const W = 480, H = 110, L = 4, B = 14, T = 12;
  // The window grows with the samples, up to the 10 minutes kept: a young service's
  // points spread over the whole chart instead of crowding its right edge.
  const now = Date.now() / 1000;
  let first = now;
  for (const pts of Object.values(rates)) if (pts.length) first = Math.min(first, pts[0].at);
  const span = Math.min(600, Math.max(60, now - first + 5));
  let top = minTop;
  for (const pts of Object.values(rates)) for (const p of pts) if (p[key] != null) top = Math.max(top, p[key]);
  top *= 1.15;
  const x = (t) => L + ((W - L) * (t - (now - span))) / span;
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  for (const f of [0, 0.5, 1]) svg.append(s("line", { x1: L, x2: W, y1: y(top * f / 1.15), y2: y(top * f / 1.15), class: "grid" }));
  svg.append(s("text", { x: L, y: 9, class: "axis" }, fmt(top / 1.15)));
  svg.append(s("text", { x: L, y: H - 2, class: "axis" }, span >= 120 ? `${Math.round(span / 60)} min ago` : `${Math.round(span)} s ago`));
  svg.append(s("text", { x: W, y: H - 2, class: "axis", "text-anchor": "end" }, "now"));
  let any = false;
  for (const [c, pts] of Object.entries(rates)) {
    const seen = pts.filter((p) => p[key] != null && p.at > now - span);
    if (!seen.length) continue;
    any = true;
    const d = seen.map((p) => `${x(p.at).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
    svg.append(s("polyline", { points: d, fill: "none", stroke: color(c), "stroke-width": 2, "stroke-linejoin": "round" }));
    const last = seen[seen.length - 1];
    svg.append(s("circle", { cx: x(last.at), cy: y(last[key]), r: 2.5, fill: color(c) }));
  }
  if (!any) svg.append(s("text", { x: W / 2, y: H / 2, class: "axis", "text-anchor": "middle" }, "no requests yet"));
  const latest = Object.entries(rates).map(([c, pts]) => {
    const p = pts[pts.length - 1];
    return p ? h("span", { class: "leg" }, clusterName(c), h("b", { text: ` ${p[key] == null ? "–" : fmt(p[key])}` })) : null;
  });
  return h("div", { class: "chartbox" }, h("h3", { text: title }), svg, h("div", { class: "legend small" }, latest));
}

// ---- the rollout under way: its steps and where it stands
function rollout(svc) {
  const p = svc.pending, plan = svc.plan || {};
  if (!p) {
    const lr = svc.last_rollout;
    const box = h("div", { class: "rollout" }, h("h3", { text: "Rollout" }));
    if (lr) {
      box.append(h("p", {}, `Last: revision ${lr.revision} `, badge(lr.result, "result")));
      // A failed service shows the message once, above everything
      if (lr.message && svc.phase !== "failed") box.append(message(lr.message, lr.result === "aborted"));
    } else box.append(h("p", { class: "muted", text: "no rollout yet" }));
    if (svc.analysis) box.append(analysis(svc.analysis));
    return box;
  }
  const steps = [];
  const order = p.kind === "new_cluster" ? ["create_cluster", "deploy", "health"] : ["deploy", "health"];
  const at = order.indexOf(p.step);
  const labels = { create_cluster: "create cluster", deploy: "deploy Serve config", health: "health gates" };
  order.forEach((name, i) => {
    let extra = "";
    if (name === "health" && p.step === "health") extra = ` · healthy ${p.healthy_streak}/${plan.healthy_needed || "?"} in a row`;
    steps.push([labels[name] + extra, p.step === "canary" || i < at ? "done" : i === at ? "now" : "todo"]);
  });
  const canarySteps = plan.canary_steps || [];
  canarySteps.forEach((st, i) => {
    const idx = p.canary_step ? p.canary_step.index - 1 : (p.step === "canary" ? canarySteps.length : -1);
    const what = st.weight !== undefined ? `weight ${st.weight}%`
      : st.pause ? (st.pause.duration_s ? `pause ${st.pause.duration_s}s` : "pause until promoted") : JSON.stringify(st);
    steps.push([`canary ${i + 1}: ${what}`, i < idx ? "done" : i === idx ? "now" : "todo"]);
  });
  steps.push([p.strategy === "canary" ? "all traffic" : p.kind === "new_cluster" ? "switch traffic" : "live", "todo"]);
  const box = h("div", { class: "rollout" },
    // An in-place update is neither blue-green nor canary (the API's strategy says bluegreen)
    h("h3", {}, `Rollout to revision ${p.revision} `, p.kind === "in_place" ? null : [badge(p.strategy || "bluegreen", "kind"), " "],
      badge(p.kind.replace("_", " "), "kind")),
    h("ol", { class: "steps" }, steps.map(([t, st]) => h("li", { class: st, text: t }))),
  );
  if (p.strategy === "canary") box.append(h("p", {}, `Canary weight now `, h("b", { text: `${p.weight}%` }),
    p.paused ? h("span", { class: "warn", text: p.hold === "user" ? " · paused by the operator" : p.hold === "no_data" ? " · paused: no data" : " · waiting for promote" }) : ""));
  if (p.message) box.append(h("pre", { class: "msg", text: p.message }));
  if (p.analysis) box.append(analysis(p.analysis));
  return box;
}

// Serve's error, whole (scrollable), with a traceback's last line (the exception) on top
function message(text, bad) {
  const lines = text.split("\n").map((l) => l.trim()).filter(Boolean);
  const last = text.includes("Traceback") && lines.length > 1 ? lines[lines.length - 1] : "";
  return h("div", { class: "message" }, last ? h("p", { class: "exc", text: last }) : null,
    h("pre", { class: `msg ${bad ? "error" : ""}`, text }));
}

function analysis(a) {
  return h("div", { class: "analysis" }, h("span", { class: "muted", text: "analysis " }),
    a.result ? badge(a.result, "result") : badge("waiting", "result"), " ", h("span", { text: a.message || "" }),
    h("span", { class: "muted", text: ` (failed ${a.failures}, no data ${a.inconclusive} in a row)` }));
}

function events(list, n) {
  const shown = n ? list.slice(-n) : list;
  return h("div", { class: "events" }, h("h3", { text: n ? "Last events" : "Event log" }),
    shown.length ? h("ul", {}, shown.slice().reverse().map((e) => h("li", {},
      h("time", { title: new Date(e.at * 1000).toISOString(), text: clock(e.at) }), h("span", { text: e.text }))))
      : h("p", { class: "muted", text: "none" }));
}

function history(list) {
  return h("div", { class: "history" }, h("h3", { text: "Revisions" }),
    h("table", {}, h("thead", {}, h("tr", {}, ["rev", "result", "pushed", "message"].map((t) => h("th", { text: t })))),
      h("tbody", {}, list.slice().reverse().slice(0, 12).map((r) => h("tr", {},
        h("td", { text: `r${r.revision}${r.rollback_of ? ` (rollback to r${r.rollback_of})` : ""}` }),
        h("td", {}, r.result ? badge(r.result, "result") : h("span", { class: "muted", text: "queued" })),
        h("td", { title: new Date(r.pushed_at * 1000).toISOString(), text: ago(r.pushed_at) }),
        h("td", { class: "clip", title: r.message || "", text: r.message || "" }))))));
}

function role(label, where, extra) {
  return h("div", { class: "role", "data-role": label.toLowerCase(), "data-revision": where ? where.revision : "",
    "data-cluster": where ? where.cluster : "" }, h("span", { class: "rl", text: label }),
    where ? h("span", {}, h("b", { text: `r${where.revision}` }), " on ", clusterName(where.cluster), extra || "")
      : h("span", { class: "muted", text: "none" }));
}

function card(svc, detail) {
  assignColors([...Object.keys(svc.traffic || {}), ...Object.keys(svc.rates || {}),
    ...[svc.active, svc.pending, ...(svc.retiring || [])].filter(Boolean).map((r) => r.cluster)]);
  const name = detail ? h("h2", { text: svc.name }) : h("h2", {}, h("a", { href: `/services/${encodeURIComponent(svc.name)}`, text: svc.name }));
  const warnings = [];
  if (svc.waiting) warnings.push(h("p", { class: "warn", text: `waiting: ${svc.waiting}` }));
  for (const d of svc.degraded || []) warnings.push(h("p", { class: "warn", text: `${d.cluster}: ${d.message}` }));
  if (svc.phase === "failed" && svc.last_rollout && svc.last_rollout.message) {
    warnings.push(h("div", { class: "failure" }, h("b", { text: `Revision ${svc.last_rollout.revision} failed` }),
      message(svc.last_rollout.message, true)));
  }
  // A baking cluster is kept (weight 0, not drained) for a rollback: say so, and until when
  const retiring = (svc.retiring || []).map((r) => r.bake_until
    ? role("Baking", r, ` · baking until ${clock(r.bake_until)}, ready to take traffic back · ${r.in_flight} in flight`)
    : role("Retiring", r, ` · ${r.in_flight} in flight`));
  const el = h("section", { class: `card phase-${svc.phase}`, "data-name": svc.name, "data-phase": svc.phase },
    h("div", { class: "head" }, name, badge(svc.phase, "phase"),
      h("span", { class: "muted", text: `desired r${svc.desired_revision}` }), actions(svc)),
    warnings,
    h("div", { class: "grid" },
      h("div", {},
        h("div", { class: "roles" }, role("Active", svc.active), role("Pending", svc.pending,
          svc.pending ? ` · ${svc.pending.step.replace("_", " ")}` : ""), retiring),
        traffic(svc), rollout(svc)),
      h("div", {},
        chart("Requests / s", svc.rates || {}, "rps", (v) => (v >= 10 ? v.toFixed(0) : v.toFixed(1)), 1),
        chart("Error rate", svc.rates || {}, "error_rate", (v) => `${(100 * v).toFixed(v < 0.1 ? 1 : 0)}%`, 0.01))),
    h("div", { class: "grid" }, events(svc.events || [], detail ? 0 : 6), history(svc.history || [])));
  if (detail) {
    el.append(h("div", { class: "configs" }, h("h3", { text: "Live Serve config" }),
      (svc.serve_configs || []).length ? svc.serve_configs.map((c) => h("details", { open: c.role === "active" },
        h("summary", { text: `${c.role}: revision ${c.revision} on ${c.cluster}` }),
        h("pre", { class: "json", text: JSON.stringify(c.config, null, 2) })))
        : h("p", { class: "muted", text: "no cluster deployed" })));
  }
  return el;
}

function render(state) {
  const main = document.getElementById("main");
  const list = state.services || [];
  if (!list.length) {
    main.replaceChildren(SERVICE
      ? h("p", { class: "empty" }, `No service ${SERVICE}: deleted, or never pushed. `, h("a", { href: "/", text: "← all services" }))
      : h("p", { class: "empty" }, "No services yet: push a spec with ", h("code", { text: "raygate push SPEC" }), "."));
    return;
  }
  const open = new Set([...main.querySelectorAll("details[open] summary")].map((e) => e.textContent));
  main.replaceChildren(...(SERVICE ? [h("p", {}, h("a", { href: "/", text: "← all services" }))] : []),
    ...list.map((svc) => card(svc, !!SERVICE)));
  for (const d of main.querySelectorAll("details")) if (open.has(d.querySelector("summary").textContent)) d.open = true;
}

let timer = null;
let asked = 0;  // polls overlap (an action polls at once): only the newest answer is drawn

async function poll() {
  const conn = document.getElementById("conn");
  const mine = ++asked;
  try {
    const r = await fetch(SERVICE ? `/ui/state/${encodeURIComponent(SERVICE)}` : "/ui/state",
      { credentials: "same-origin", cache: "no-store" });
    if (mine !== asked) return;  // a newer poll is under way, and it keeps the timer
    if (r.status === 401) {
      conn.textContent = "session ended: log in again";
      conn.className = "conn bad";
      window.location.assign("/");
      return;
    }
    // A service's page of a service that is gone: raygate answered, so say that (not
    // "unreachable" over the last state drawn, with its buttons), and keep asking.
    if (r.status === 404 && SERVICE) render({ services: [] });
    else if (!r.ok) throw new Error(`HTTP ${r.status}`);
    else {
      const state = await r.json();
      if (mine !== asked) return;
      render(state);
    }
    conn.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    conn.className = "conn ok";
    document.body.classList.remove("stale");
  } catch (e) {
    if (mine !== asked) return;
    conn.textContent = `raygate unreachable, retrying… (${e.message || e})`;
    conn.className = "conn bad";
    document.body.classList.add("stale");  // what is shown is the last thing raygate said
  }
  // One timer, whoever called: an action's immediate poll replaces the scheduled one
  clearTimeout(timer);
  timer = setTimeout(poll, POLL_MS);
}
poll();
