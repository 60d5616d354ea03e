// STOP: one button, fixed in one place (the stop dock), on every view where a pen of
// the user's is in a session, and on the sign-in screen when a pen of theirs is still
// armed. Signed in, it stops through the session API (anyone may stop any pen); signed
// out, through the tablet's stop keys (controller/api/stopkeys.py).

import { $, ApiProblem, api, showProblem, state, stopByKey, stopKeys, stopKeysStatus } from "./api.js";

let keyPens = []; // signed out: what the tablet's stop keys can stop
let keyTimer = null;

const LIVE = new Set(["created", "active", "paused", "interrupted", "faulted"]);

// The pens the STOP button acts on: the treatment view's pen, else every pen of ours
// with a live session; signed out, the pens of our stop keys.
export function stopTargets() {
  if (!state.token) {
    return keyPens.map((p) => ({ port: p.port, name: p.name, sessionId: p.session_id, key: p.key, armed: p.armed, running: p.motor_running }));
  }
  const pens = (state.overview && state.overview.pens) || [];
  if (state.view === "treat" && state.session) {
    const pen = pens.find((p) => p.port === state.session.port);
    return [{
      port: state.session.port,
      name: pen ? pen.name : state.session.port,
      sessionId: state.session.session_id,
      key: stopKeys()[state.session.session_id],
      armed: pen ? pen.armed : null,
      running: pen ? pen.motor_running : null,
    }];
  }
  return pens
    .filter((p) => p.session && p.session.mine && LIVE.has(p.session.state))
    .map((p) => ({ port: p.port, name: p.name, sessionId: p.session.session_id, key: stopKeys()[p.session.session_id], armed: p.armed, running: p.motor_running }));
}

function describe(t) {
  if (!state.token && !t.armed) return `${t.name}`;
  if (!state.online) return `${t.name}: state unknown (offline)`;
  if (t.running) return `${t.name}: needle running`;
  if (t.armed === "armed" || t.armed === "arming") return `${t.name}: armed`;
  if (t.armed === null || !state.online) return `${t.name}: state unknown`;
  return `${t.name}: disarmed`;
}

export function renderStop() {
  const targets = stopTargets();
  const dock = $("stop-dock");
  dock.hidden = targets.length === 0;
  if (!targets.length) return;
  const armed = targets.some((t) => t.running || t.armed === "armed" || t.armed === "arming");
  dock.classList.toggle("hot", armed);
  const prefix = state.token ? "" : "A pen of yours is in a session. ";
  $("stop-target").textContent = prefix + targets.map(describe).join(", ");
  $("stop").setAttribute("aria-label", "STOP " + targets.map((t) => t.name).join(", "));
}

async function stopOne(t) {
  if (state.token && state.online) {
    try {
      await api("POST", `/api/sessions/${t.sessionId}/stop`, undefined, { timeoutMs: 2500 });
      return true;
    } catch (err) {
      if (!(err instanceof ApiProblem) || !t.key) throw err;
      // Signed out meanwhile, or the controller did not answer in time: the key still works.
    }
  }
  if (!t.key) {
    throw new ApiProblem({ code: "no_stop_key", message: `This tablet cannot stop ${t.name} without signing in.`, remediation: "Release the pen's button and lift it off the skin; then sign in." }, 0);
  }
  await stopByKey(t.key);
  return true;
}

export async function pressStop() {
  const targets = stopTargets();
  const failed = [];
  for (const t of targets) {
    try {
      await stopOne(t);
    } catch (err) {
      failed.push([t, err]);
    }
  }
  if (failed.length) {
    const [t, err] = failed[0];
    const problem = err instanceof ApiProblem ? err.problem : {};
    showProblem({
      code: "stop_not_delivered",
      message: `STOP did not reach the controller for ${t.name}: ${problem.message || "no answer"}`,
      remediation: "Release the pen's button and lift it off the skin: the needle stops at once. Then check the connection.",
    });
  } else {
    $("stop-target").textContent = targets.map((t) => `${t.name}: stop sent`).join(", ");
  }
  document.dispatchEvent(new CustomEvent("pen-stopped"));
}

// Signed out: ask every second what our keys can stop.
export function watchStopKeys() {
  unwatchStopKeys();
  const tick = async () => {
    try {
      keyPens = await stopKeysStatus();
    } catch {
      /* offline: keep what we knew, the banner says so */
    }
    renderStop();
    keyTimer = setTimeout(tick, 1000);
  };
  tick();
}

export function unwatchStopKeys() {
  if (keyTimer) clearTimeout(keyTimer);
  keyTimer = null;
  keyPens = [];
}

export function bindStop() {
  $("stop").addEventListener("click", () => pressStop());
}
