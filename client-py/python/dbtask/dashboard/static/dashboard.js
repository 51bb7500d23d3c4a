// The dbtask dashboard's page: fetches /api/*, listens to /api/events (server-sent events)
// and draws the tables and the SVG charts. Every value from the server goes in as text
// (textContent), never as HTML: task names, arguments and errors come from task code.
"use strict";

const FINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
const MAX_ROWS = 200;
const KEEP_TASKS = 5000;
const SVG = "http://www.w3.org/2000/svg";

const model = {
  tasks: new Map(),      // id -> summary (from /api/tasks and the events)
  workers: new Map(),    // id -> summary
  overview: null,
  clockOffset: 0,        // server time - browser time, seconds
  filter: { q: "", state: "" },
  view: "main",
  taskId: null,
};

// --- small helpers -----------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c === undefined || c === null ? "" : c);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function now() { return Date.now() / 1000 + model.clockOffset; }

function clock(ts) {
  if (typeof ts !== "number") return "";
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

function when(ts) {
  if (typeof ts !== "number") return "";
  return new Date(ts * 1000).toLocaleString([], { hour12: false });
}

function seconds(s) {
  if (typeof s !== "number") return "";
  if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1000).toFixed(1) + " ms";
  if (s < 120) return s.toFixed(2) + " s";
  return (s / 60).toFixed(1) + " min";
}

function bytes(n) {
  if (typeof n !== "number") return "";
  return (n / 1048576).toFixed(0) + " MiB";
}

function ago(ts) {
  if (typeof ts !== "number") return "";
  const s = Math.max(0, now() - ts);
  return s < 60 ? `${s.toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`;
}

function badge(text, cls) { return el("span", { class: `badge ${cls}`, text }); }

function flash(message, error) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = error ? "error" : "";
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
  return body;
}

async function postJSON(path, data) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Dbtask-Dashboard": "1" },
    body: JSON.stringify(data || {}),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
  return body;
}

// --- rendering, once per frame at most -------------------------------------------------------------

let pending = false;
function render() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    if (model.view === "main") { renderWorkers(); renderTasks(); }
  });
}

function workerUp(w) {
  if (w.offline) return false;
  const interval = typeof w.heartbeat_interval === "number" ? w.heartbeat_interval : 5;
  return now() - (w.seen || 0) <= Math.max(3 * interval, 15);
}

function renderWorkers() {
  const body = document.querySelector("#workers tbody");
  const rows = [...model.workers.values()].sort((a, b) => a.id.localeCompare(b.id));
  body.replaceChildren(...rows.map((w) => {
    const up = workerUp(w);
    const p = w.processed || {};
    return el("tr", { "data-worker": w.id, class: up ? "up" : "down" },
      el("td", { class: "id", text: w.id }),
      el("td", { class: "status" }, badge(up ? "up" : "down", up ? "status-up" : "status-down")),
      el("td", { text: (w.queues || []).join(", ") }),
      el("td", { class: "num running", text: w.running ?? "" }),
      el("td", { class: "num", text: w.concurrency ?? "" }),
      el("td", { class: "num processed", text: p.total ?? "" }),
      el("td", { class: "num", text: (p.failed || 0) + (p.rejected || 0) + (p.dead_lettered || 0) }),
      el("td", { class: "num", text: Array.isArray(w.loadavg) ? w.loadavg.map((x) => x.toFixed(2)).join(" ") : "" }),
      el("td", { class: "num", text: bytes(w.rss_bytes) }),
      el("td", { text: ago(w.seen) }));
  }));
  document.getElementById("workers-empty").hidden = rows.length > 0;
  document.getElementById("events-off").hidden = !rows.some((w) => w.events === false);
}

function matches(t) {
  const q = model.filter.q.trim().toLowerCase();
  if (model.filter.state && t.state !== model.filter.state) return false;
  if (q && !t.id.toLowerCase().includes(q) && !String(t.task || "").toLowerCase().includes(q)) return false;
  return true;
}

function actionButtons(id, state) {
  if (FINAL.has(state)) return [];
  return [
    el("button", { class: "revoke", type: "button", "data-id": id, text: "Revoke", title: "it will not start (a running task goes on)", onclick: () => revoke(id, false) }),
    el("button", { class: "terminate", type: "button", "data-id": id, text: "Terminate", title: "revoke, and stop it if it runs", onclick: () => revoke(id, true) }),
  ];
}

function renderTasks() {
  const body = document.querySelector("#tasks tbody");
  const rows = [...model.tasks.values()].filter(matches)
    .sort((a, b) => (b.updated || 0) - (a.updated || 0)).slice(0, MAX_ROWS);
  body.replaceChildren(...rows.map((t) => el("tr", { "data-task-id": t.id, "data-state": t.state || "" },
    el("td", { class: "state" }, badge(t.state || "?", `state-${t.state}`)),
    el("td", { class: "name" }, el("a", { href: `#/task/${encodeURIComponent(t.id)}`, text: t.task || "?" })),
    el("td", { class: "id" }, el("a", { href: `#/task/${encodeURIComponent(t.id)}`, text: t.id })),
    el("td", { text: t.queue || "" }),
    el("td", { text: t.worker || "" }),
    el("td", { text: clock(t.received) }),
    el("td", { class: "num runtime", text: seconds(t.runtime) }),
    el("td", { class: "error", text: t.error_type ? `${t.error_type}: ${t.error || ""}` : "", title: t.error || "" }),
    el("td", { class: "actions" }, ...actionButtons(t.id, t.state)))));
  document.getElementById("tasks-empty").hidden = rows.length > 0;
  const q = model.filter.q.trim();
  const lookup = document.getElementById("lookup");
  lookup.hidden = !(q.length >= 8 && rows.length === 0);
  document.getElementById("lookup-link").href = `#/task/${encodeURIComponent(q)}`;
}

function renderQueues(queues) {
  const body = document.querySelector("#queues tbody");
  body.replaceChildren(...queues.map((q) => el("tr", { "data-queue": q.queue },
    el("td", { text: q.queue }),
    el("td", { class: "num pending", text: q.pending ?? "?" }),
    el("td", { text: (q.levels || []).filter((l) => l.pending).map((l) => `p${l.priority}: ${l.pending}`).join("  ") }),
    el("td", { class: "num", text: `${q.rate.toFixed(2)}/s` }))));
  document.getElementById("queues-empty").hidden = queues.length > 0;
}

// --- charts (plain SVG) ------------------------------------------------------------------------------

function niceMax(n) {
  if (n <= 5) return 5;
  const p = Math.pow(10, Math.floor(Math.log10(n)));
  for (const m of [1, 2, 5, 10]) if (m * p >= n) return m * p;
  return 10 * p;
}

function axes(chart, max, left, top, height, width) {
  for (const f of [0, 0.5, 1]) {
    const y = top + height - f * height;
    chart.append(svg("line", { x1: left, x2: left + width, y1: y, y2: y }));
    chart.append(svg("text", { x: left - 4, y: y + 4, "text-anchor": "end" }, String(Math.round(f * max))));
  }
}

function drawThroughput(series) {
  const chart = document.getElementById("chart-throughput");
  chart.replaceChildren();
  const left = 40, top = 10, width = 550, height = 140;
  const max = niceMax(Math.max(0, ...series.map((m) => m.succeeded + m.failed)));
  axes(chart, max, left, top, height, width);
  const step = width / series.length;
  series.forEach((m, i) => {
    const x = left + i * step + 1;
    const hOk = (m.succeeded / max) * height, hBad = (m.failed / max) * height;
    const label = `${clock(m.minute)}: ${m.succeeded} succeeded, ${m.failed} failed`;
    if (m.succeeded) {
      const r = svg("rect", { class: "ok", x, y: top + height - hOk, width: step - 2, height: hOk });
      r.append(svg("title", {}, label));
      chart.append(r);
    }
    if (m.failed) {
      const r = svg("rect", { class: "bad", x, y: top + height - hOk - hBad, width: step - 2, height: hBad });
      r.append(svg("title", {}, label));
      chart.append(r);
    }
  });
  chart.append(svg("text", { x: left, y: top + height + 16 }, "-60 min"));
  chart.append(svg("text", { x: left + width / 2, y: top + height + 16, "text-anchor": "middle" }, "-30 min"));
  chart.append(svg("text", { x: left + width, y: top + height + 16, "text-anchor": "end" }, "now"));
}

function drawRuntime(runtime) {
  const chart = document.getElementById("chart-runtime");
  chart.replaceChildren();
  const left = 40, top = 10, width = 550, height = 140;
  const b = runtime.bounds;
  const short = (s) => (s < 1 ? `${+(s * 1000).toPrecision(3)}ms` : s < 60 ? `${s}s` : `${s / 60}m`);
  const names = [`<${short(b[0])}`];
  for (let i = 1; i < b.length; i++) names.push(`${short(b[i - 1])}-${short(b[i])}`);
  names.push(`>${short(b[b.length - 1])}`);
  const max = niceMax(Math.max(0, ...runtime.counts));
  axes(chart, max, left, top, height, width);
  const step = width / runtime.counts.length;
  runtime.counts.forEach((n, i) => {
    const h = (n / max) * height;
    const x = left + i * step + 4;
    const r = svg("rect", { class: "bar", x, y: top + height - h, width: step - 8, height: h });
    r.append(svg("title", {}, `${names[i]}: ${n} runs`));
    chart.append(r);
    chart.append(svg("text", { x: x + (step - 8) / 2, y: top + height + 16, "text-anchor": "middle" }, names[i]));
  });
}

// --- loading ---------------------------------------------------------------------------------------------

async function loadOverview() {
  try {
    const o = await getJSON("/api/overview");
    model.overview = o;
    model.clockOffset = o.now - Date.now() / 1000;
    for (const w of o.workers) model.workers.set(w.id, w);
    renderQueues(o.queues);
    drawThroughput(o.charts.throughput);
    drawRuntime(o.charts.runtime);
    document.getElementById("chart-since").textContent = `(counted since ${when(o.charts.since)})`;
    render();
  } catch (e) {
    flash(`cannot load the cluster's figures: ${e.message}`, true);
  }
}

async function loadTasks() {
  const params = new URLSearchParams({ q: model.filter.q, state: model.filter.state, limit: String(MAX_ROWS) });
  try {
    const got = await getJSON(`/api/tasks?${params}`);
    for (const t of got.tasks) model.tasks.set(t.id, t);
    render();
  } catch (e) {
    flash(`cannot load the tasks: ${e.message}`, true);
  }
}

function upsertTask(t) {
  model.tasks.set(t.id, t);
  if (model.tasks.size > KEEP_TASKS) {
    const oldest = [...model.tasks.values()].sort((a, b) => (a.updated || 0) - (b.updated || 0));
    for (const x of oldest.slice(0, model.tasks.size - KEEP_TASKS)) model.tasks.delete(x.id);
  }
  render();
  if (model.view === "task" && model.taskId === t.id) showTaskSoon();
}

async function revoke(id, terminate) {
  try {
    const got = await postJSON(`/api/tasks/${encodeURIComponent(id)}/revoke`, { terminate });
    flash(terminate ? `task ${id} terminated: it is stopped if it runs` : `task ${id} revoked: it will not start`);
    if (model.view === "task") showTaskSoon();
    return got;
  } catch (e) {
    flash(e.message, true);
  }
}

// --- the task page ---------------------------------------------------------------------------------------

let taskTimer = null;
function showTaskSoon() {
  clearTimeout(taskTimer);
  taskTimer = setTimeout(() => showTask(model.taskId), 150);
}

function field(list, name, value, cls) {
  if (value === undefined || value === null || value === "") return;
  list.append(el("dt", { text: name }), el("dd", { class: cls, text: String(value) }));
}

async function showTask(id) {
  let got;
  try {
    got = await getJSON(`/api/tasks/${encodeURIComponent(id)}`);
  } catch (e) {
    flash(e.message, true);
    return;
  }
  if (model.taskId !== id) return;
  const r = got.record || {};
  const s = got.summary || {};
  // A final record wins; before it the events know more (STARTED is stored only with
  // track_started, RECEIVED only after 100 ms in the prefetch).
  const state = FINAL.has(r.state) ? r.state : (s.state || r.state || "PENDING");
  document.getElementById("task-title").replaceChildren(el("code", { text: id }), " ", badge(state, `state-${state}`));
  document.getElementById("task-title").dataset.state = state;
  document.getElementById("task-actions").replaceChildren(...actionButtons(id, state));
  const fields = document.getElementById("task-fields");
  fields.replaceChildren();
  field(fields, "State", state, "task-state");
  field(fields, "Task", r.task || s.task);
  field(fields, "Queue", r.queue || s.queue);
  field(fields, "Worker", r.worker || s.worker);
  field(fields, "Attempts", r.attempts);
  field(fields, "Retries", r.retries ?? 0);
  field(fields, "Received", when(r.date_received ?? s.received));
  field(fields, "Started", when(r.date_started ?? s.started));
  field(fields, "Done", when(r.date_done));
  field(fields, "Runtime", seconds(s.runtime ?? (r.date_done && r.date_started ? r.date_done - r.date_started : undefined)));
  field(fields, "Next attempt at", when(r.eta));
  for (const [name, key] of [["Workflow parent", "parent_id"], ["Workflow root", "root_id"]]) {
    const other = r[key] || s[key];
    if (other && other !== id) fields.append(el("dt", { text: name }), el("dd", { id: `task-${key}` }, el("a", { href: `#/task/${encodeURIComponent(other)}`, text: other })));
  }
  if (state === "PENDING" && !got.timeline.length) field(fields, "Note", "no record in Redis: not received yet, expired, or an unknown id");
  const args = document.getElementById("task-args");
  if (r.args !== undefined || r.kwargs !== undefined) {
    args.replaceChildren(el("pre", { id: "task-args-value", text: `args: ${JSON.stringify(r.args ?? [], null, 2)}\nkwargs: ${JSON.stringify(r.kwargs ?? {}, null, 2)}` }));
  } else {
    args.replaceChildren(el("p", { class: "note", text: "Not kept: a worker keeps a task's arguments in its record only with --result-extended." }));
  }
  document.getElementById("task-result-block").hidden = !("result" in r);
  document.getElementById("task-result").textContent = "result" in r ? JSON.stringify(r.result, null, 2) : "";
  const error = r.error || (s.error_type ? { type: s.error_type, message: s.error } : null);
  document.getElementById("task-error-block").hidden = !error;
  if (error) {
    document.getElementById("task-error").textContent = `${error.type || "?"}: ${error.message || ""}`;
    document.getElementById("task-traceback").textContent = error.traceback || "";
  }
  document.querySelector("#task-timeline tbody").replaceChildren(...got.timeline.map((e) => el("tr", {},
    el("td", { text: clock(e.timestamp) }),
    el("td", { text: e.event }),
    el("td", { class: "num", text: e.attempt }),
    el("td", { text: e.worker || "" }),
    el("td", { text: [e.runtime !== undefined ? `runtime ${seconds(e.runtime)}` : "", e.error_type ? `${e.error_type}: ${e.error || ""}` : "", e.retry_in !== undefined ? `retry in ${seconds(e.retry_in)}` : "", e.reason || ""].filter(Boolean).join("; ") }))));
}

// --- dead letters -----------------------------------------------------------------------------------------

async function showDead() {
  let got;
  try {
    got = await getJSON("/api/dead");
  } catch (e) {
    flash(e.message, true);
    return;
  }
  const body = document.querySelector("#dead tbody");
  body.replaceChildren(...got.letters.map((d) => el("tr", { "data-seq": d.sequence },
    el("td", { class: "num", text: d.sequence }),
    el("td", { text: d.queue }),
    el("td", { text: d.task || "?" }),
    el("td", { class: "id" }, d.task_id ? el("a", { href: `#/task/${encodeURIComponent(d.task_id)}`, text: d.task_id }) : "?"),
    el("td", { class: "num", text: d.deliveries ?? "?" }),
    el("td", { text: when(d.dead_at) }),
    el("td", { class: "error", text: d.reason || "", title: d.reason || "" }),
    el("td", {}, el("button", { class: "replay", type: "button", text: "Replay", onclick: (ev) => replay(d.sequence, ev.target) })))));
  document.getElementById("dead-empty").hidden = got.letters.length > 0;
}

async function replay(seq, button) {
  button.disabled = true;
  try {
    const got = await postJSON(`/api/dead/${seq}/replay`, {});
    flash(got.message);
  } catch (e) {
    flash(e.message, true);
    button.disabled = false;
  }
  showDead();
}

// --- views and the live stream -----------------------------------------------------------------------------

function route() {
  const hash = location.hash || "#/";
  let view = "main";
  if (hash.startsWith("#/task/")) {
    view = "task";
    model.taskId = decodeURIComponent(hash.slice("#/task/".length));
  } else if (hash === "#/dead") {
    view = "dead";
  }
  model.view = view;
  for (const v of ["main", "task", "dead"]) document.getElementById(`view-${v}`).hidden = v !== view;
  document.getElementById("nav-main").classList.toggle("current", view === "main");
  document.getElementById("nav-dead").classList.toggle("current", view === "dead");
  if (view === "task") showTask(model.taskId);
  else if (view === "dead") showDead();
  else render();
}

function connect() {
  const live = document.getElementById("live");
  const stream = new EventSource("/api/events");
  stream.addEventListener("hello", () => {
    // Connected (again): whatever happened meanwhile is fetched, the events do the rest.
    live.textContent = "live";
    live.className = "on";
    document.body.dataset.live = "1";
    loadOverview();
    loadTasks();
    if (model.view === "dead") showDead();
    if (model.view === "task") showTaskSoon();
  });
  stream.addEventListener("task", (ev) => upsertTask(JSON.parse(ev.data)));
  stream.addEventListener("worker", (ev) => {
    const w = JSON.parse(ev.data);
    model.workers.set(w.id, w);
    render();
  });
  stream.addEventListener("dead", () => { if (model.view === "dead") showDead(); });
  stream.onerror = () => {
    live.textContent = "reconnecting";
    live.className = "off";
    delete document.body.dataset.live;
  };
}

function start() {
  const text = document.getElementById("search-text");
  const state = document.getElementById("search-state");
  let typing = null;
  const changed = () => {
    model.filter = { q: text.value, state: state.value };
    render();
    clearTimeout(typing);
    typing = setTimeout(loadTasks, 250);
  };
  text.addEventListener("input", changed);
  state.addEventListener("change", changed);
  document.getElementById("search").addEventListener("submit", (ev) => ev.preventDefault());
  window.addEventListener("hashchange", route);
  route();
  connect();
  setInterval(loadOverview, 5000);
  setInterval(render, 1000);  // "last seen" and up/down move with the clock
}

document.addEventListener("DOMContentLoaded", start);
