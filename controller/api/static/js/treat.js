// The treatment view: a large armed/running indicator, the face map, depth entry within the
// zone's range, ARM, the session's actions (each disabled with the controller's reason when
// it would refuse), faults acknowledged with a confirmation, End confirmed while zones
// remain; live depth and speed over the session's WebSocket. STOP is the stop dock.

import { $, ApiProblem, api, attempt, ensureStopKey, mm, showProblem, state } from "./api.js";
import { renderFaceMap } from "./facemap.js";
import { WS_SILENCE_MS, goOffline } from "./health.js";
import { renderStop } from "./stop.js";

let ws = null;
let lastMessageAt = 0;
let sawHeartbeat = false;
let silenceTimer = null;
let refreshTimer = null;
let showReport = () => {};

const BUTTONS = {
  arm: "arm",
  disarm: "disarm",
  pause: "pause",
  resume: "resume",
  end: "end",
  ack: "acknowledge_fault",
  "depth-set": "set_depth",
  "depth-up": "set_depth",
  "depth-down": "set_depth",
};
const WHY = { arm: "arm-why", disarm: "disarm-why", pause: "pause-why", resume: "resume-why", end: "end-why", "depth-set": "depth-why" };

export function planZones(session) {
  const plan = state.plans.find((p) => p.plan_id === session.plan_id);
  const order = plan ? plan.zones.map((z) => z.zone_id) : Object.keys(session.zones);
  return order.filter((id) => id in session.zones).map((id) => session.zones[id]);
}

function limitsOf(zone) {
  const o = zone.override;
  return { depth: o ? o.max_depth_um : zone.policy_max_depth_um, passes: o ? o.max_passes : zone.policy_max_passes };
}

export function zonesLeft(session) {
  return planZones(session).filter((z) => z.passes_done < limitsOf(z).passes);
}

export async function openTreatment(session, reportView) {
  showReport = reportView;
  state.session = session;
  state.controls = null;
  await refreshSession();
  connectLive(session.session_id);
  ensureStopKey(session.session_id).catch(() => {}); // for STOP once signed out
}

export function closeTreatment() {
  const old = ws;
  ws = null;
  if (old) old.close();
  clearTimeout(silenceTimer);
  clearTimeout(refreshTimer);
}

// The session and its controls, as the server has them now.
export async function refreshSession() {
  if (!state.session) return;
  const sid = state.session.session_id;
  try {
    const [session, controls] = await Promise.all([
      api("GET", `/api/sessions/${sid}`),
      api("GET", `/api/sessions/${sid}/controls`),
    ]);
    if (!state.session || state.session.session_id !== sid) return;
    state.session = session;
    state.controls = controls;
  } catch (err) {
    if (!(err instanceof ApiProblem)) throw err;
  }
  renderTreatment();
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => refreshSession(), 60);
}

function penOf(session) {
  const pens = (state.overview && state.overview.pens) || [];
  return pens.find((p) => p.port === session.port) || null;
}

// Colour and words for the pen, from what the server said last; unknown while offline.
function indicator(session) {
  const pen = penOf(session);
  if (!state.online) return ["unknown", "UNKNOWN", "Connection lost: what the pen does now is not known here."];
  if (!state.token) return ["unknown", "UNKNOWN", "Signed out: sign in again to see the pen."];
  if (session.state === "faulted") return ["fault", "FAULT", "The needle was stopped. Check the pen and the client."];
  if (!pen) return ["unknown", "UNKNOWN", "No word from the controller yet."];
  if (pen.motor_running) return ["running", "NEEDLE RUNNING", `${pen.name}: the needle is moving.`];
  if (pen.armed === "armed") return ["armed", "ARMED", `${pen.name}: the needle runs when its button is pressed.`];
  if (pen.armed === "arming") return ["armed", "ARMING", `${pen.name}: waiting for the pen to confirm.`];
  if (pen.link !== "up") return ["down", "PEN NOT CONNECTED", `${pen.name}: ${pen.link}. It reconnects by itself.`];
  return ["disarmed", "DISARMED", `${pen.name}: the needle cannot run.`];
}

export function renderTreatment() {
  const s = state.session;
  if (!s) return;
  $("session-id").textContent = s.session_id;
  $("session-client").textContent = s.client_ref || "–";
  $("session-pen").textContent = s.port;
  $("session-state").textContent = s.state;
  const [cls, word, detail] = indicator(s);
  const box = $("pen-indicator");
  box.className = "indicator " + cls;
  $("pen-state").textContent = word;
  $("pen-state-detail").textContent = detail;
  if (!state.online) {
    $("live-depth").textContent = "–";
    $("live-speed").textContent = "–";
  }
  $("fault-panel").hidden = s.state !== "faulted";
  $("fault-detail").textContent = s.fault ? s.fault.detail : "";
  if (s.state !== "faulted") $("ack-confirm").hidden = true;
  renderButtons();
  renderDepth();
  const zoneRefusal = actionRefusal("select_zone");
  renderFaceMap($("face-map"), {
    zones: planZones(s),
    selected: s.current_zone,
    locked: zoneRefusal,
    onSelect: selectZone,
  });
  renderStop();
}

// Why an action cannot be done now (null: it can): offline, signed out, or the controller's.
function actionRefusal(action) {
  if (action === "stop") return null;
  if (!state.online) return { message: "Offline: this needs the controller.", remediation: "Wait for the connection to come back." };
  if (!state.token) return { message: "Signed out: sign in again to continue.", remediation: "Sign in again." };
  if (!state.controls) return { message: "Checking with the controller…", remediation: "Wait a moment." };
  return state.controls.actions[action] || null;
}

function renderButtons() {
  $("resume").hidden = state.session.state !== "paused" && state.session.state !== "interrupted";
  $("pause").hidden = !$("resume").hidden;
  for (const [id, action] of Object.entries(BUTTONS)) {
    const refusal = actionRefusal(action);
    $(id).disabled = refusal !== null;
    if (!WHY[id]) continue;
    const label = id === "depth-set" ? "Depth" : $(id).textContent;
    $(WHY[id]).textContent = refusal && !$(id).hidden ? `${label}: ${refusal.message}` : "";
  }
}

function currentZone() {
  const s = state.session;
  return s && s.current_zone ? s.zones[s.current_zone] : null;
}

// The range the gate allows for the selected zone, and what it would say of the value typed.
export function depthRefusal(um) {
  const zone = currentZone();
  const range = state.controls && state.controls.depth_range_um;
  if (!zone || !range) return "Choose a zone on the map first.";
  if (!Number.isFinite(um)) return "The depth is not a number: enter it in millimetres, e.g. 0.50.";
  if (um < range[0]) return `Depth ${mm(um)} is not a needle depth: choose between ${mm(range[0])} and ${mm(range[1])}.`;
  if (um > range[1]) return `Depth ${mm(um)} is deeper than the ${zone.label} allows (${mm(range[1])}). Choose ${mm(range[1])} or less, or ask a manager for an override.`;
  return null;
}

function typedUm() {
  return Math.round(parseFloat($("depth-mm").value) * 1000);
}

function renderDepth() {
  const zone = currentZone();
  const range = state.controls && state.controls.depth_range_um;
  $("depth-zone").textContent = zone ? zone.label : "no zone";
  $("depth-range").textContent = zone && range ? `Allowed: ${mm(range[0])} to ${mm(range[1])}` : "Choose a zone on the map.";
  if (range) $("depth-mm").max = (range[1] / 1000).toFixed(3);
  const s = state.session;
  if (document.activeElement !== $("depth-mm") && s.depth_setpoint_um !== null && s.depth_setpoint_um !== undefined) {
    $("depth-mm").value = (s.depth_setpoint_um / 1000).toFixed(2);
  }
  checkTypedDepth();
}

function checkTypedDepth() {
  const server = actionRefusal("set_depth");
  if (server) return; // renderButtons said why already
  const why = depthRefusal(typedUm());
  $("depth-set").disabled = why !== null;
  $("depth-why").textContent = why || "";
  $("depth-mm").setAttribute("aria-invalid", why ? "true" : "false");
}

async function sessionAction(path, body) {
  const sid = state.session.session_id;
  const answer = await attempt(() => api("POST", `/api/sessions/${sid}/${path}`, body, { timeoutMs: 6000 }));
  await refreshSession();
  return answer;
}

function selectZone(zoneId, locked) {
  if (locked) {
    showProblem(locked);
    return;
  }
  sessionAction("zone", { zone_id: zoneId });
}

function nudgeDepth(stepMm) {
  const input = $("depth-mm");
  const value = Math.max(0, Math.min(2.5, (parseFloat(input.value) || 0) + stepMm));
  input.value = value.toFixed(2);
  checkTypedDepth();
}

function setDepth() {
  const why = depthRefusal(typedUm());
  if (why) {
    showProblem({ code: "depth_refused", message: why, remediation: "Correct the depth, then tap Set depth." });
    return;
  }
  sessionAction("depth", { depth_um: typedUm() });
}

function endSession() {
  const left = zonesLeft(state.session);
  if (left.length) {
    $("end-confirm-text").textContent = `${left.length} zone${left.length > 1 ? "s" : ""} still ha${left.length > 1 ? "ve" : "s"} passes left: ${left.map((z) => z.label).join(", ")}. End the session anyway?`;
    $("end-confirm").hidden = false;
    $("end-yes").focus();
    return;
  }
  reallyEnd();
}

async function reallyEnd() {
  $("end-confirm").hidden = true;
  const sid = state.session.session_id;
  if (!(await sessionAction("end"))) return;
  closeTreatment();
  showReport(sid);
}

function onLiveMessage(item) {
  lastMessageAt = Date.now();
  if (item.type === "heartbeat") {
    sawHeartbeat = true;
  } else if (item.type === "telemetry") {
    if (state.online) {
      $("live-depth").textContent = mm(item.depth_um);
      $("live-speed").textContent = item.speed_hz + " Hz";
    }
  } else if (item.type === "hello") {
    state.session = item.session; // the server's snapshot, whatever was on screen
    scheduleRefresh();
  } else if (item.type === "error") {
    showProblem(item);
  } else if (item.type === "event") {
    if (item.kind === "refused" && item.detail && item.detail.message) {
      showProblem({ code: item.detail.code, message: item.detail.message, remediation: item.detail.remediation || "Check the pen, then try again." });
    }
    scheduleRefresh();
  }
}

// The live stream; the token goes in the first message (a browser cannot set headers).
function connectLive(sid) {
  closeTreatment();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/api/sessions/${sid}/live`);
  ws = socket;
  sawHeartbeat = false;
  lastMessageAt = Date.now();
  socket.onopen = () => socket.send(JSON.stringify({ token: state.token }));
  socket.onmessage = (message) => {
    if (ws === socket) onLiveMessage(JSON.parse(message.data));
  };
  socket.onclose = () => {
    if (ws !== socket) return;
    ws = null;
    setTimeout(() => {
      if (ws === null && state.view === "treat" && state.session && state.session.session_id === sid && state.token) connectLive(sid);
    }, 1000);
  };
  const watch = () => {
    if (ws !== socket) return;
    if (sawHeartbeat && Date.now() - lastMessageAt > WS_SILENCE_MS) goOffline("the live stream went silent");
    silenceTimer = setTimeout(watch, 200);
  };
  watch();
}

// Back online or signed in again: the stream starts over, with the server's hello.
export function reconnectLive() {
  if (state.view === "treat" && state.session) connectLive(state.session.session_id);
}

export function bindTreatment() {
  $("depth-down").addEventListener("click", () => nudgeDepth(-0.05));
  $("depth-up").addEventListener("click", () => nudgeDepth(0.05));
  $("depth-mm").addEventListener("input", checkTypedDepth);
  $("depth-set").addEventListener("click", setDepth);
  $("arm").addEventListener("click", () => sessionAction("arm"));
  $("disarm").addEventListener("click", () => sessionAction("disarm"));
  $("pause").addEventListener("click", () => sessionAction("pause"));
  $("resume").addEventListener("click", () => sessionAction("resume"));
  $("end").addEventListener("click", endSession);
  $("end-yes").addEventListener("click", reallyEnd);
  $("end-no").addEventListener("click", () => ($("end-confirm").hidden = true));
  $("ack").addEventListener("click", () => {
    $("ack-checked").checked = false;
    $("ack-yes").disabled = true;
    $("ack-confirm").hidden = false;
  });
  $("ack-checked").addEventListener("change", () => ($("ack-yes").disabled = !$("ack-checked").checked));
  $("ack-no").addEventListener("click", () => ($("ack-confirm").hidden = true));
  $("ack-yes").addEventListener("click", async () => {
    $("ack-confirm").hidden = true;
    await sessionAction("acknowledge-fault");
  });
  document.addEventListener("pen-stopped", () => refreshSession());
}
