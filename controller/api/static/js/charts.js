// The manager's charts, drawn with uPlot (vendored in /static/vendor/uplot, MIT) from
// GET /api/charts, which the API answers from InfluxDB. The browser never talks to it.

import { $, api } from "./api.js";

const plots = [];
const SAFETY = [
  ["refused", "refusals", "#b26a00"],
  ["stop_sent", "stops", "#c62828"],
  ["fault", "faults", "#6a1b9a"],
  ["override_applied", "overrides", "#1565c0"],
];

function width(el) {
  return Math.max(280, Math.floor(el.getBoundingClientRect().width) || 480);
}

function bars(series) {
  return { ...series, paths: window.uPlot.paths.bars({ size: [0.6, 64] }), points: { show: false } };
}

// A chart over categories (zones): x is the index, the axis shows the names.
function categoryPlot(el, names, series, data) {
  const opts = {
    width: width(el),
    height: 220,
    scales: { x: { time: false, range: [-0.5, Math.max(0.5, names.length - 0.5)] } },
    axes: [
      { values: (u, ticks) => ticks.map((t) => (Number.isInteger(t) && names[t]) || ""), splits: () => names.map((_, i) => i) },
      {},
    ],
    series: [{}, ...series],
    legend: { show: series.length > 1 },
  };
  return new window.uPlot(opts, [names.map((_, i) => i), ...data], el);
}

function timePlot(el, series, data) {
  const opts = { width: width(el), height: 220, series: [{}, ...series], legend: { show: series.length > 1 } };
  return new window.uPlot(opts, data, el);
}

export async function loadCharts(days, zoneLabel) {
  const answer = await api("GET", `/api/charts?days=${days}`);
  for (const p of plots.splice(0)) p.destroy();
  $("charts-days").textContent = String(answer.days);
  const problem = answer.unavailable;
  $("charts-problem").hidden = !problem;
  $("charts-problem").textContent = problem ? `${problem.message} ${problem.remediation}` : "";
  if (!window.uPlot) return answer;
  const sessions = answer.sessions_per_day;
  plots.push(
    timePlot($("chart-sessions"), [{ label: "sessions", fill: "#1565c033", stroke: "#1565c0", width: 2, points: { size: 8 } }], [
      sessions.map((d) => d.t),
      sessions.map((d) => d.sessions),
    ]),
  );
  const passes = answer.passes_per_zone;
  plots.push(
    categoryPlot(
      $("chart-passes"),
      passes.map((d) => zoneLabel(d.zone)),
      [bars({ label: "passes", fill: "#1b7f3b88", stroke: "#1b7f3b" })],
      [passes.map((d) => d.passes)],
    ),
  );
  const depth = answer.depth_per_zone;
  const toMm = (v) => (v === null ? null : v / 1000);
  plots.push(
    categoryPlot(
      $("chart-depth"),
      depth.map((d) => zoneLabel(d.zone)),
      [
        { label: "deepest pass", stroke: "#c62828", width: 2, points: { size: 9 } },
        { label: "deepest setting", stroke: "#1565c0", width: 2, points: { size: 9 } },
        { label: "limit", stroke: "#444", width: 2, dash: [6, 4], points: { size: 7 } },
      ],
      [depth.map((d) => toMm(d.deepest_pass_um)), depth.map((d) => toMm(d.deepest_setting_um)), depth.map((d) => toMm(d.limit_um))],
    ),
  );
  const safety = answer.safety_events;
  plots.push(
    timePlot(
      $("chart-safety"),
      SAFETY.map(([, label, colour]) => ({ label, stroke: colour, width: 2 })),
      [safety.map((d) => d.t), ...SAFETY.map(([kind]) => safety.map((d) => d[kind]))],
    ),
  );
  return answer;
}
