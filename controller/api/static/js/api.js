// The page's one state object, the calls to the API, the token and the stop keys.
// Everything on screen is rebuilt from what the server last answered (state.overview,
// state.session, state.controls), never from what the page showed before.

export const state = {
  token: null,
  user: null, // {username, role, actor_id}
  expiresAt: 0, // Date.now() ms when the token ends
  lifetime: 0, // seconds a fresh token lives (from sign-in)
  plans: [],
  zones: {},
  overview: null, // GET /api/overview: every pen now
  session: null, // the session on the treatment view (server's record)
  device: null, // its pen, from the overview
  controls: null, // GET /api/sessions/{id}/controls
  online: true,
  signedOut: false, // the token ended while a view was open
  view: null,
};

export const $ = (id) => document.getElementById(id);

export class ApiProblem extends Error {
  constructor(problem, status) {
    super(problem.message || "Something went wrong.");
    this.problem = problem;
    this.status = status;
  }
}

export const OFFLINE = {
  code: "offline",
  message: "The controller cannot be reached.",
  remediation: "Check the tablet's network connection; the page reconnects by itself.",
};

const listeners = { unauthorized: [], offline: [], online: [], render: [] };
export function on(name, fn) {
  listeners[name].push(fn);
}
export function emit(name, arg) {
  for (const fn of listeners[name]) fn(arg);
}

// Every call: bearer token, JSON both ways, a time limit; an error body is a Problem.
export async function api(method, path, body, { timeoutMs = 4000, auth = true } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (auth && state.token) headers.Authorization = "Bearer " + state.token;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: abort.signal,
      cache: "no-store",
    });
  } catch (err) {
    emit("offline", err && err.name === "AbortError" ? "no answer in time" : "no connection");
    throw new ApiProblem(OFFLINE, 0);
  } finally {
    clearTimeout(timer);
  }
  emit("online");
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401 && auth && path !== "/api/login") emit("unauthorized");
    throw new ApiProblem(data, response.status);
  }
  return data;
}

// --- the token: kept for this tab (a reload keeps it), renewed before it ends ------------

export function keepToken(token, expiresIn) {
  state.token = token;
  state.expiresAt = Date.now() + expiresIn * 1000;
  sessionStorage.setItem("pen-token", token);
  sessionStorage.setItem("pen-token-expires", String(state.expiresAt));
}

export function keepLifetime(seconds) {
  state.lifetime = seconds;
  sessionStorage.setItem("pen-token-lifetime", String(seconds));
}

export function restoreToken() {
  state.token = sessionStorage.getItem("pen-token");
  state.expiresAt = Number(sessionStorage.getItem("pen-token-expires") || 0);
  state.lifetime = Number(sessionStorage.getItem("pen-token-lifetime") || 0);
  return state.token;
}

export function dropToken() {
  state.token = null;
  state.expiresAt = 0;
  sessionStorage.removeItem("pen-token");
  sessionStorage.removeItem("pen-token-expires");
}

// Renew the token; answers the seconds it now has left, or null if it cannot renew.
export async function renewToken() {
  const answer = await api("POST", "/api/token/renew");
  keepToken(state.token, answer.expires_in);
  return answer.expires_in;
}

// --- stop keys: what lets a signed-out tablet stop its pens (controller/api/stopkeys.py) ---

const KEYS = "pen-stop-keys";

export function stopKeys() {
  try {
    const keys = JSON.parse(localStorage.getItem(KEYS) || "{}");
    return typeof keys === "object" && keys ? keys : {};
  } catch {
    return {};
  }
}

function saveKeys(keys) {
  localStorage.setItem(KEYS, JSON.stringify(keys));
}

// One key per session of ours (session id -> key), asked for once.
export async function ensureStopKey(sessionId) {
  const keys = stopKeys();
  if (keys[sessionId]) return keys[sessionId];
  const issued = await api("POST", "/api/stop-keys", { session_id: sessionId });
  keys[sessionId] = issued.key;
  saveKeys(keys);
  return issued.key;
}

export function forgetStopKeys(invalid) {
  const keys = stopKeys();
  for (const [sid, key] of Object.entries(keys)) if (invalid.includes(key)) delete keys[sid];
  saveKeys(keys);
}

// What the tablet's keys can stop, asked without a token.
export async function stopKeysStatus() {
  const keys = Object.values(stopKeys()).slice(-8);
  if (!keys.length) return [];
  const answer = await api("POST", "/api/stop-keys/status", { keys }, { auth: false, timeoutMs: 2500 });
  if (answer.invalid.length) forgetStopKeys(answer.invalid);
  return answer.pens;
}

export function stopByKey(key) {
  return api("POST", "/api/stop-keys/stop", { key }, { auth: false });
}

// --- small helpers ------------------------------------------------------------------------

export function mm(um) {
  return um === null || um === undefined ? "–" : (um / 1000).toFixed(2) + " mm";
}

export function clock(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function cell(row, text) {
  row.insertCell().textContent = text === null || text === undefined ? "–" : String(text);
}

export function showProblem(problem) {
  $("problem-message").textContent = problem.message || "Something went wrong.";
  $("problem-remediation").textContent = problem.remediation || "Try again.";
  $("problem").dataset.code = problem.code || "";
  $("problem").hidden = false;
}

export function clearProblem() {
  $("problem").hidden = true;
}

// Run an API call for a button: a refusal is shown in plain words; answers null then.
export async function attempt(call) {
  clearProblem();
  try {
    return await call();
  } catch (err) {
    if (err instanceof ApiProblem) {
      if (err.status !== 401) showProblem(err.problem);
      return null;
    }
    throw err;
  }
}
