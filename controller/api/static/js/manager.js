// The manager's view: every pen live (state, therapist, session, zone, depth) with a STOP
// each, today's sessions with their reports, overrides with a reason, the charts (from
// InfluxDB through the API) and the audit log. The admin's view: pens with STOP, users.

import { $, api, attempt, cell, clock, mm, state } from "./api.js";
import { loadCharts } from "./charts.js";

const LIVE = new Set(["created", "active", "paused", "interrupted", "faulted"]);
let openReport = () => {};

function penState(p) {
  if (!state.online) return "unknown (offline)";
  if (p.motor_running) return "NEEDLE RUNNING";
  if (p.armed !== "disarmed") return p.armed.toUpperCase();
  if (p.link !== "up") return `not connected (${p.link})`;
  return p.session ? `disarmed, session ${p.session.state}` : "free";
}

function stopButton(p) {
  const button = document.createElement("button");
  button.className = "stop-small";
  button.textContent = `STOP ${p.name}`;
  button.disabled = !p.session;
  button.addEventListener("click", () => attempt(() => api("POST", `/api/sessions/${p.session.session_id}/stop`)));
  return button;
}

function renderPens(tbodyId, columns) {
  const body = $(tbodyId).querySelector("tbody");
  body.replaceChildren();
  for (const p of (state.overview && state.overview.pens) || []) {
    const row = body.insertRow();
    row.dataset.port = p.port;
    row.classList.toggle("hot", p.motor_running || p.armed !== "disarmed");
    for (const text of columns(p)) cell(row, text);
    row.insertCell().appendChild(stopButton(p));
  }
}

let knownSessions = "";
let auditAt = 0;

export function renderManagerPens() {
  // A session opened or closed on a pen: the day's list and the override form follow.
  const live = ((state.overview && state.overview.pens) || []).map((p) => (p.session ? p.session.session_id + p.session.state : "")).join(",");
  if (live !== knownSessions) {
    knownSessions = live;
    loadSessions().catch(() => {});
  }
  // The audit log follows too (its records land a moment after the action they record).
  if (state.view === "manager" && Date.now() - auditAt > 2000) {
    auditAt = Date.now();
    loadAudit().catch(() => {});
  }
  renderPens("pens-table", (p) => {
    const s = p.session;
    return [p.name, penState(p), s ? s.therapist_id : "", s ? s.session_id : "", s && s.zone_label ? `${s.zone_label} (${s.passes_done}/${s.max_passes})` : "", s ? mm(s.depth_setpoint_um) : ""];
  });
}

export function renderAdminPens() {
  renderPens("admin-pens", (p) => [p.name, p.serial, p.link, penState(p), p.session ? p.session.session_id : ""]);
}

async function loadSessions() {
  const sessions = await api("GET", "/api/sessions");
  const midnight = new Date();
  midnight.setHours(0, 0, 0, 0);
  const today = sessions.filter((s) => s.created_at * 1000 >= midnight.getTime() || LIVE.has(s.state));
  const body = $("sessions-table").querySelector("tbody");
  body.replaceChildren();
  for (const s of today.sort((a, b) => b.created_at - a.created_at)) {
    const row = body.insertRow();
    row.dataset.session = s.session_id;
    for (const text of [s.session_id, s.port, s.therapist_id || "", s.plan_id, s.state, clock(s.created_at)]) cell(row, text);
    const button = document.createElement("button");
    button.className = "small";
    button.textContent = "Report";
    button.addEventListener("click", () => openReport(s.session_id));
    row.insertCell().appendChild(button);
  }
  const select = $("override-session");
  const chosen = select.value;
  select.replaceChildren();
  for (const s of today.filter((x) => LIVE.has(x.state))) select.add(new Option(`${s.session_id} (${s.port})`, s.session_id));
  if (chosen) select.value = chosen;
  await fillOverrideZones();
}

async function fillOverrideZones() {
  const sid = $("override-session").value;
  const select = $("override-zone");
  const chosen = select.value;
  select.replaceChildren();
  if (!sid) return;
  const session = await api("GET", `/api/sessions/${sid}`);
  for (const z of Object.values(session.zones)) select.add(new Option(z.label, z.zone_id));
  if (chosen) select.value = chosen;
}

async function loadAudit() {
  const records = await api("GET", "/api/audit?limit=100");
  const body = $("audit-table").querySelector("tbody");
  body.replaceChildren();
  for (const r of records) {
    const row = body.insertRow();
    row.dataset.kind = r.kind;
    for (const text of [r.seq, r.at, r.kind, r.session_id || "", r.message]) cell(row, text);
  }
}

export async function loadManager() {
  renderManagerPens();
  const label = (zone) => (state.zones[zone] ? state.zones[zone].label : zone);
  await Promise.all([loadSessions(), loadAudit(), loadCharts(7, label).catch(() => null)]);
}

export async function loadAdmin() {
  renderAdminPens();
  const users = await api("GET", "/api/users");
  const body = $("users-table").querySelector("tbody");
  body.replaceChildren();
  for (const u of users) {
    const row = body.insertRow();
    for (const text of [u.username, u.role, u.actor_id]) cell(row, text);
  }
}

async function applyOverride(event) {
  event.preventDefault();
  const body = { zone_id: $("override-zone").value, reason: $("override-reason").value };
  const depth = parseFloat($("override-depth").value);
  const passes = parseInt($("override-passes").value, 10);
  if (Number.isFinite(depth)) body.max_depth_um = Math.round(depth * 1000);
  if (Number.isFinite(passes)) body.max_passes = passes;
  const sid = $("override-session").value;
  const session = await attempt(() => api("POST", `/api/sessions/${sid}/overrides`, body));
  if (!session) return;
  const zone = session.zones[body.zone_id];
  $("override-result").textContent = `Override applied: ${zone.label} now allows ${mm(zone.override.max_depth_um)} and ${zone.override.max_passes} passes in ${sid}.`;
  $("override-reason").value = "";
  await loadAudit();
}

export function bindManager(report) {
  openReport = report;
  $("override-form").addEventListener("submit", applyOverride);
  $("override-session").addEventListener("change", () => fillOverrideZones());
}
