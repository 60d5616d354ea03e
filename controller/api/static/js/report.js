// The session report: summary (therapist, times, state), zones with their deepest
// setting and peak measured depth against the limit, every pass with its peak measured
// depth, and every stop, fault, override and refusal; printable, and a CSV download.

import { $, api, cell, clock, mm, state } from "./api.js";

let current = null;

export async function loadReport(sessionId) {
  const report = await api("GET", `/api/sessions/${sessionId}/report`);
  current = report;
  renderReport(report);
  return report;
}

function summary(report) {
  const started = report.started_at ? new Date(report.started_at * 1000).toLocaleString() : "–";
  const ended = report.ended_at ? new Date(report.ended_at * 1000).toLocaleString() : "not ended";
  return [
    ["Session", report.session_id],
    ["Client", report.client_ref || "–"],
    ["Therapist", report.therapist_id],
    ["Plan", report.plan_id],
    ["Pen", report.pen_serial || "–"],
    ["State", report.state],
    ["Started", started],
    ["Ended", ended],
    ["Passes", report.passes],
    ["Stops", report.stops],
    ["Faults", report.faults],
    ["Overrides", report.overrides],
    ["Refusals", report.refusals],
    ["Cartridges", (report.cartridges || []).join(", ") || "–"],
  ];
}

function renderReport(report) {
  const dl = $("report-summary");
  dl.replaceChildren();
  for (const [term, value] of summary(report)) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value === null || value === undefined ? "–" : String(value);
    dd.dataset.field = term.toLowerCase();
    dl.append(dt, dd);
  }
  const zones = $("report-zones").querySelector("tbody");
  zones.replaceChildren();
  for (const z of report.zones) {
    const row = zones.insertRow();
    row.dataset.zone = z.zone_id;
    for (const text of [z.label, `${z.passes_done} / ${z.max_passes}`, mm(z.deepest_setpoint_um), mm(z.peak_depth_um), mm(z.max_depth_um), z.override ? `${mm(z.override.max_depth_um)}, ${z.override.max_passes} passes: ${z.override.reason}` : ""]) {
      cell(row, text);
    }
  }
  const passes = $("report-passes").querySelector("tbody");
  passes.replaceChildren();
  for (const p of report.pass_list || []) {
    const row = passes.insertRow();
    for (const text of [p.number, p.zone_label, clock(p.started_at), clock(p.ended_at), mm(p.depth_setpoint_um), mm(p.peak_depth_um), p.strokes, p.end_reason]) {
      cell(row, text);
    }
  }
  const events = $("report-events").querySelector("tbody");
  events.replaceChildren();
  for (const e of report.events || []) {
    const row = events.insertRow();
    row.dataset.kind = e.kind;
    for (const text of [e.at, e.kind, e.message]) cell(row, text);
  }
}

async function downloadCsv() {
  if (!current) return;
  const response = await fetch(`/api/sessions/${current.session_id}/report.csv`, {
    headers: { Authorization: "Bearer " + state.token },
    cache: "no-store",
  });
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = current.session_id + ".csv";
  document.body.appendChild(a);
  a.click();
  a.remove();
  URL.revokeObjectURL(url);
}

export function bindReport(back) {
  $("report-csv").addEventListener("click", downloadCsv);
  $("report-print").addEventListener("click", () => window.print());
  $("report-back").addEventListener("click", back);
}
