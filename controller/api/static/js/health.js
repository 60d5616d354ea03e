// Connection health: a heartbeat to the controller, the offline banner within a second
// of a stall or a drop, and a rebuild of every view from the server's snapshot on return.
//
// The heartbeat is GET /api/overview every HEARTBEAT_MS with a limit of TIMEOUT_MS: a
// stalled network (no answer) or a dropped one (an error) turns the page offline at most
// HEARTBEAT_MS + TIMEOUT_MS after the last good answer. The live WebSocket of the
// treatment view also carries the server's heartbeat (treat.js): silence there past
// WS_SILENCE_MS turns the page offline too.

import { $, api, emit, on, state } from "./api.js";

export const HEARTBEAT_MS = 400;
export const TIMEOUT_MS = 550;
export const WS_SILENCE_MS = 900;

let timer = null;
let onSnapshot = () => {};
let onBack = () => {};
let offlineSince = null;

export function startHeartbeat(snapshot, back) {
  onSnapshot = snapshot;
  onBack = back;
  stopHeartbeat();
  beat();
}

export function stopHeartbeat() {
  if (timer) clearTimeout(timer);
  timer = null;
}

async function beat() {
  timer = null;
  if (!state.token) return;
  try {
    state.overview = await api("GET", "/api/overview", undefined, { timeoutMs: TIMEOUT_MS });
    onSnapshot(state.overview);
  } catch {
    /* offline (handled by the listeners below) or signed out */
  }
  if (state.token && timer === null) timer = setTimeout(beat, HEARTBEAT_MS);
}

// Offline: every value on screen may be stale, so the views show "unknown" and only
// what can work without the controller stays enabled.
export function goOffline(why) {
  if (!state.online) return;
  state.online = false;
  offlineSince = Date.now();
  $("offline-why").textContent = `the controller cannot be reached (${why}).`;
  $("offline").hidden = false;
  document.body.classList.add("is-offline");
  emit("render");
}

function goOnline() {
  if (state.online) return;
  state.online = true;
  offlineSince = null;
  $("offline").hidden = true;
  document.body.classList.remove("is-offline");
  onBack(); // rebuild from the server's snapshot, never from what was shown
}

export function offlineFor() {
  return offlineSince === null ? 0 : Date.now() - offlineSince;
}

on("offline", (why) => goOffline(why));
on("online", () => goOnline());
window.addEventListener("offline", () => goOffline("the tablet lost its network"));
