// The therapist's tablet page: plain JavaScript, no external assets, works offline.
"use strict";

const state = { token: null, user: null, plans: [], session: null, ws: null };
const $ = (id) => document.getElementById(id);

function show(view) {
  for (const v of ["login-view", "setup-view", "treat-view", "report-view"]) {
    $(v).hidden = v !== view;
  }
}

function showProblem(problem) {
  $("problem-message").textContent = problem.message || "Something went wrong.";
  $("problem-remediation").textContent = problem.remediation || "Try again.";
  $("problem").dataset.code = problem.code || "";
  $("problem").hidden = false;
}

function clearProblem() {
  $("problem").hidden = true;
}

function mm(um) {
  return um === null || um === undefined ? "–" : (um / 1000).toFixed(2) + " mm";
}

// Every call: bearer token, JSON both ways; an error body is {code, message, remediation}.
async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    const problem = {
      code: "offline",
      message: "The controller cannot be reached.",
      remediation: "Check the tablet's network connection, then try again.",
    };
    showProblem(problem);
    throw problem;
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401 && path !== "/api/login") signOut();
    showProblem(data);
    throw data;
  }
  return data;
}

async function signIn(event) {
  event.preventDefault();
  clearProblem();
  const data = await api("POST", "/api/login", {
    username: $("username").value,
    password: $("password").value,
  }).catch(() => null);
  if (!data) return;
  state.token = data.token;
  state.user = data;
  sessionStorage.setItem("pen-token", data.token);
  $("password").value = "";
  await afterSignIn();
}

async function afterSignIn() {
  const me = await api("GET", "/api/me").catch(() => null);
  if (!me) return;
  $("who").textContent = me.username + " (" + me.role + ")";
  $("signout").hidden = false;
  await loadSetup();
}

function signOut() {
  if (state.ws) state.ws.close();
  state.token = null;
  state.session = null;
  sessionStorage.removeItem("pen-token");
  $("who").textContent = "";
  $("signout").hidden = true;
  show("login-view");
}

async function loadSetup() {
  const [devices, plans] = await Promise.all([api("GET", "/api/devices"), api("GET", "/api/plans")]);
  state.plans = plans;
  const pen = $("pen");
  pen.replaceChildren();
  for (const d of devices) {
    const label = `${d.name || d.port} — ${d.serial || "no pen"} (${d.link}${d.session_id ? ", in use" : ""})`;
    pen.add(new Option(label, d.port));
  }
  const plan = $("plan");
  plan.replaceChildren();
  for (const p of plans) plan.add(new Option(p.label, p.plan_id));
  show("setup-view");
}

async function createSession(event) {
  event.preventDefault();
  clearProblem();
  try {
    const created = await api("POST", "/api/sessions", {
      port: $("pen").value,
      client_ref: $("client-ref").value,
      plan_id: $("plan").value,
    });
    const started = await api("POST", `/api/sessions/${created.session_id}/start`);
    openTreatment(started);
  } catch (problem) {
    /* shown already */
  }
}

function openTreatment(session) {
  state.session = session;
  render();
  show("treat-view");
  connectLive(session.session_id);
}

function planZones(session) {
  const plan = state.plans.find((p) => p.plan_id === session.plan_id);
  const order = plan ? plan.zones.map((z) => z.zone_id) : Object.keys(session.zones);
  return order.filter((id) => id in session.zones).map((id) => session.zones[id]);
}

function limits(zone) {
  const o = zone.override;
  return {
    depth: o ? o.max_depth_um : zone.policy_max_depth_um,
    passes: o ? o.max_passes : zone.policy_max_passes,
  };
}

function render() {
  const s = state.session;
  if (!s) return;
  $("session-id").textContent = s.session_id;
  $("session-client").textContent = s.client_ref;
  $("session-state").textContent = s.state;
  const zones = $("zones");
  zones.replaceChildren();
  for (const zone of planZones(s)) {
    const lim = limits(zone);
    const tile = document.createElement("button");
    tile.className = "zone";
    tile.dataset.zone = zone.zone_id;
    if (zone.zone_id === s.current_zone) tile.classList.add("selected");
    if (zone.passes_done >= lim.passes) tile.classList.add("done");
    tile.innerHTML =
      '<span class="name"></span><span class="limits"></span><span class="passes"></span>';
    tile.querySelector(".name").textContent = zone.label;
    tile.querySelector(".limits").textContent = "max " + mm(lim.depth);
    tile.querySelector(".passes").textContent = `passes ${zone.passes_done} / ${lim.passes}`;
    tile.addEventListener("click", () => selectZone(zone.zone_id));
    zones.appendChild(tile);
  }
  const current = s.current_zone ? s.zones[s.current_zone] : null;
  $("depth-zone").textContent = current
    ? `${current.label} (max ${mm(limits(current).depth)})`
    : "no zone";
  if (s.depth_setpoint_um !== null && s.depth_setpoint_um !== undefined) {
    $("depth-mm").value = (s.depth_setpoint_um / 1000).toFixed(2);
  }
}

async function refresh() {
  if (!state.session) return;
  state.session = await api("GET", `/api/sessions/${state.session.session_id}`);
  render();
}

async function sessionAction(path, body) {
  clearProblem();
  try {
    state.session = await api("POST", `/api/sessions/${state.session.session_id}/${path}`, body);
    render();
    return true;
  } catch (problem) {
    return false;
  }
}

const selectZone = (zoneId) => sessionAction("zone", { zone_id: zoneId });

function nudgeDepth(stepMm) {
  const input = $("depth-mm");
  const value = Math.max(0, Math.min(2.5, (parseFloat(input.value) || 0) + stepMm));
  input.value = value.toFixed(2);
}

function setDepth() {
  const mmValue = parseFloat($("depth-mm").value);
  if (Number.isNaN(mmValue)) {
    showProblem({ message: "The depth is not a number.", remediation: "Enter the depth in millimetres, e.g. 0.50." });
    return;
  }
  sessionAction("depth", { depth_um: Math.round(mmValue * 1000) });
}

function setPenState(text) {
  $("pen-state").textContent = text;
}

async function arm() {
  if (await sessionAction("arm")) setPenState("armed");
}

async function stop() {
  if (await sessionAction("stop")) setPenState("stopped");
}

async function endSession() {
  if (!(await sessionAction("end"))) return;
  const sid = state.session.session_id;
  if (state.ws) state.ws.close();
  const report = await api("GET", `/api/sessions/${sid}/report`);
  showReport(report);
}

function showReport(report) {
  $("report-summary").textContent =
    `Session ${report.session_id}, client ${report.client_ref}: ${report.passes} passes, ` +
    `${report.refusals} refusals, state ${report.state}.`;
  const body = $("report-table").querySelector("tbody");
  body.replaceChildren();
  for (const z of report.zones) {
    const row = body.insertRow();
    for (const text of [z.label, `${z.passes_done} / ${z.max_passes}`, mm(z.deepest_setpoint_um), mm(z.max_depth_um)]) {
      row.insertCell().textContent = text;
    }
  }
  $("report-csv").onclick = async (event) => {
    event.preventDefault();
    const response = await fetch(`/api/sessions/${report.session_id}/report.csv`, {
      headers: { Authorization: "Bearer " + state.token },
    });
    const url = URL.createObjectURL(await response.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = report.session_id + ".csv";
    a.click();
    URL.revokeObjectURL(url);
  };
  show("report-view");
}

// Live view: the token goes in the first message (a browser cannot set WebSocket headers).
function connectLive(sid) {
  if (state.ws) state.ws.close();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/api/sessions/${sid}/live`);
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ token: state.token }));
  ws.onmessage = (message) => {
    const item = JSON.parse(message.data);
    if (item.type === "telemetry") {
      $("live-depth").textContent = mm(item.depth_um);
      $("live-speed").textContent = item.speed_hz + " Hz";
    } else if (item.type === "error") {
      showProblem(item);
    } else if (item.type === "event") {
      onEvent(item);
    }
  };
  ws.onclose = () => {
    // Reconnect while this session is still on screen (the controller restarted, Wi-Fi blipped).
    if (state.ws === ws && state.session && state.session.session_id === sid && !$("treat-view").hidden) {
      setTimeout(() => state.ws === ws && connectLive(sid), 1000);
    }
  };
}

const REFRESH_ON = new Set([
  "state_changed", "zone_selected", "depth_set", "pass_ended", "zone_completed",
  "override_applied", "fault",
]);

function onEvent(event) {
  if (event.kind === "refused") {
    showProblem({
      code: event.detail.code,
      message: event.detail.message,
      remediation: event.detail.remediation || "Check the pen, then try again.",
    });
  } else if (event.kind === "fault" || event.kind === "stop_sent") {
    showProblem({
      code: event.kind,
      message: event.detail.message || "The needle was stopped.",
      remediation: event.detail.remediation || "Check the pen and the client, then continue.",
    });
  }
  if (event.kind === "armed") setPenState("armed");
  if (event.kind === "disarmed") setPenState("disarmed");
  if (event.kind === "pass_started") setPenState("running");
  if (event.kind === "pass_ended") setPenState("armed");
  if (REFRESH_ON.has(event.kind)) refresh().catch(() => {});
}

function bind() {
  $("login-form").addEventListener("submit", signIn);
  $("setup-form").addEventListener("submit", createSession);
  $("signout").addEventListener("click", async () => {
    await api("POST", "/api/logout").catch(() => {});
    signOut();
  });
  $("problem-close").addEventListener("click", clearProblem);
  $("depth-down").addEventListener("click", () => nudgeDepth(-0.05));
  $("depth-up").addEventListener("click", () => nudgeDepth(0.05));
  $("depth-set").addEventListener("click", setDepth);
  $("arm").addEventListener("click", arm);
  $("stop").addEventListener("click", stop);
  $("pause").addEventListener("click", () => sessionAction("pause"));
  $("resume").addEventListener("click", () => sessionAction("resume"));
  $("ack").addEventListener("click", () => sessionAction("acknowledge-fault"));
  $("end").addEventListener("click", endSession);
  $("new-session").addEventListener("click", () => {
    state.session = null;
    loadSetup().catch(() => {});
  });
}

bind();
state.token = sessionStorage.getItem("pen-token");
if (state.token) afterSignIn().catch(() => signOut());
else show("login-view");
