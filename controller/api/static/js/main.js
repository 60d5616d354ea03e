// The page: sign-in, the token's renewal, the views and where a user lands.
// After a reload, a new sign-in or a renewal the therapist lands back in the running
// session of their pen, rebuilt from the server's overview.

import { $, ApiProblem, api, attempt, clearProblem, dropToken, keepLifetime, keepToken, on, renewToken, restoreToken, state } from "./api.js";
import { startHeartbeat, stopHeartbeat } from "./health.js";
import { bindManager, loadAdmin, loadManager, renderAdminPens, renderManagerPens } from "./manager.js";
import { bindReport, loadReport } from "./report.js";
import { loadSetup, bindSetup } from "./setup.js";
import { bindStop, renderStop, unwatchStopKeys, watchStopKeys } from "./stop.js";
import { bindTreatment, closeTreatment, openTreatment, reconnectLive, refreshSession, renderTreatment } from "./treat.js";

const VIEWS = ["login", "setup", "treat", "report", "manager", "admin"];
const LIVE = new Set(["created", "active", "paused", "interrupted", "faulted"]);
let renewing = false;
let lastControls = 0;
let previousView = null;

function show(view) {
  if (state.view !== view && state.view !== "report") previousView = state.view;
  state.view = view;
  for (const v of VIEWS) $(`${v}-view`).hidden = v !== view;
  if (view !== "treat") closeTreatment();
  renderNav();
  renderStop();
}

function renderNav() {
  const role = state.user && state.token ? state.user.role : null;
  $("nav").hidden = !role;
  const mine = myLiveSession();
  $("nav-treat").hidden = !(role && mine) || state.view === "treat";
  $("nav-setup").hidden = !(role === "therapist" || role === "manager") || state.view === "setup";
  $("nav-manager").hidden = role !== "manager" || state.view === "manager";
  $("nav-admin").hidden = role !== "admin" || state.view === "admin";
}

function myLiveSession() {
  const pens = (state.overview && state.overview.pens) || [];
  const pen = pens.find((p) => p.session && p.session.mine && LIVE.has(p.session.state));
  return pen ? pen.session : null;
}

export function showLogin(reason) {
  stopHeartbeat();
  $("login-reason").hidden = !reason;
  $("login-reason").textContent = reason || "";
  $("who").textContent = "";
  $("signout").hidden = true;
  show("login");
  watchStopKeys(); // a pen of ours may still be armed: STOP stays on this screen
}

async function signIn(event) {
  event.preventDefault();
  clearProblem();
  const data = await attempt(() =>
    api("POST", "/api/login", { username: $("username").value, password: $("password").value }, { auth: false }),
  );
  if (!data) return;
  keepLifetime(data.expires_in);
  keepToken(data.token, data.expires_in);
  $("password").value = "";
  await afterSignIn();
}

async function afterSignIn() {
  try {
    state.user = await api("GET", "/api/me");
    const [plans, zones, overview] = await Promise.all([api("GET", "/api/plans"), api("GET", "/api/zones"), api("GET", "/api/overview")]);
    state.plans = plans;
    state.zones = Object.fromEntries(zones.map((z) => [z.zone_id, z]));
    state.overview = overview;
  } catch (err) {
    if (err instanceof ApiProblem && err.status === 401) return; // "unauthorized" shows sign-in
    if (err instanceof ApiProblem) {
      showLogin(err.problem.message);
      return;
    }
    throw err;
  }
  state.signedOut = false;
  unwatchStopKeys();
  $("who").textContent = `${state.user.username} (${state.user.role})`;
  $("signout").hidden = false;
  startHeartbeat(onSnapshot, onBack);
  await land();
}

// Where a user lands: their running session first, else their role's home view.
async function land() {
  const mine = myLiveSession();
  if (mine && state.user.role !== "admin") {
    await goTreat(mine.session_id);
  } else if (state.user.role === "manager") {
    show("manager");
    loadManager().catch(() => {});
  } else if (state.user.role === "admin") {
    show("admin");
    loadAdmin().catch(() => {});
  } else {
    await goSetup();
  }
}

async function goTreat(sessionId) {
  const session = await attempt(() => api("GET", `/api/sessions/${sessionId}`));
  if (!session) return;
  show("treat");
  await openTreatment(session, goReport);
}

async function goSetup() {
  show("setup");
  await loadSetup();
}

async function goReport(sessionId) {
  const report = await attempt(() => loadReport(sessionId));
  if (report) show("report");
}

async function back() {
  state.overview = await api("GET", "/api/overview").catch(() => state.overview);
  if (previousView === "manager") {
    show("manager");
    loadManager().catch(() => {});
  } else if (myLiveSession()) {
    goTreat(myLiveSession().session_id);
  } else if (state.user && state.user.role === "manager") {
    show("manager");
  } else {
    goSetup();
  }
}

// Every heartbeat: the overview, rendered where it shows.
function onSnapshot() {
  renderNav();
  if (state.view === "treat") {
    renderTreatment();
    if (Date.now() - lastControls > 1000) {
      lastControls = Date.now();
      refreshSession();
    }
  } else if (state.view === "manager") renderManagerPens();
  else if (state.view === "admin") renderAdminPens();
  else if (state.view === "setup" && document.activeElement !== $("pen")) loadSetup();
  renderStop();
  checkToken();
}

// Back from offline: rebuild every view from the server, never from what was shown.
async function onBack() {
  if (!state.token) return;
  if (state.view === "treat") {
    await refreshSession();
    reconnectLive();
  } else if (state.view === "manager") loadManager().catch(() => {});
  else if (state.view === "admin") loadAdmin().catch(() => {});
  else if (state.view === "setup") loadSetup();
}

// Renew the token well before it ends; warn when it cannot be renewed any more.
async function checkToken() {
  if (!state.token || renewing || !state.lifetime) return;
  const left = (state.expiresAt - Date.now()) / 1000;
  if (left > state.lifetime / 3) return;
  renewing = true;
  let renewed = null;
  try {
    renewed = await renewToken();
  } catch {
    renewed = null;
  } finally {
    renewing = false;
  }
  const now = (state.expiresAt - Date.now()) / 1000;
  if (renewed === null || renewed <= left + 1) {
    const minutes = Math.max(0, Math.round(now / 60));
    $("token-warning-text").textContent =
      `Your sign-in ends in ${minutes >= 1 ? minutes + " min" : Math.max(0, Math.round(now)) + " s"} and cannot be renewed. Sign in again to keep working; STOP keeps working.`;
    $("token-warning").hidden = false;
  } else {
    $("token-warning").hidden = true;
  }
}

function signedOut(reason) {
  dropToken();
  state.signedOut = true;
  $("token-warning").hidden = true;
  showLogin(reason);
}

function bind() {
  $("login-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", async () => {
    await api("POST", "/api/logout").catch(() => {});
    signedOut("You signed out. A pen of yours that is still in a session can be stopped here.");
  });
  $("token-resign").addEventListener("click", () => {
    $("token-warning").hidden = true;
    showLogin("Sign in again to keep working.");
  });
  $("problem-close").addEventListener("click", clearProblem);
  $("nav-treat").addEventListener("click", () => myLiveSession() && goTreat(myLiveSession().session_id));
  $("nav-setup").addEventListener("click", goSetup);
  $("nav-manager").addEventListener("click", () => {
    show("manager");
    loadManager().catch(() => {});
  });
  $("nav-admin").addEventListener("click", () => {
    show("admin");
    loadAdmin().catch(() => {});
  });
  bindStop();
  bindTreatment();
  bindSetup((session) => {
    show("treat");
    openTreatment(session, goReport);
  });
  bindReport(back);
  bindManager(goReport);
  on("unauthorized", () => {
    if (state.token) signedOut("Your sign-in ended. Sign in again to continue: you will be back in your session. STOP still works.");
  });
  on("render", () => {
    if (state.view === "treat") renderTreatment();
    else if (state.view === "manager") renderManagerPens();
    renderStop();
  });
  setInterval(() => {
    if (state.token && state.expiresAt && Date.now() >= state.expiresAt) {
      signedOut("Your sign-in ended. Sign in again to continue: you will be back in your session. STOP still works.");
    }
  }, 500);
}

bind();
if (restoreToken()) {
  afterSignIn().catch(() => showLogin());
} else {
  showLogin();
}
