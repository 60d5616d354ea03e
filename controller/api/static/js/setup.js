// A new session: pen, pseudonymous client code and plan.

import { $, api, attempt, state } from "./api.js";

export async function loadSetup() {
  const pens = (state.overview && state.overview.pens) || [];
  const pen = $("pen");
  const chosen = pen.value;
  pen.replaceChildren();
  for (const d of pens) {
    const busy = d.session ? `, in use by ${d.session.mine ? "you" : d.session.therapist_id}` : "";
    const option = new Option(`${d.name} — ${d.serial || "no pen"} (${d.link}${busy})`, d.port);
    option.disabled = Boolean(d.session);
    pen.add(option);
  }
  if (chosen) pen.value = chosen;
  const plan = $("plan");
  if (!plan.options.length) for (const p of state.plans) plan.add(new Option(p.label, p.plan_id));
}

export function bindSetup(opened) {
  $("setup-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const started = await attempt(async () => {
      const created = await api("POST", "/api/sessions", {
        port: $("pen").value,
        client_ref: $("client-ref").value,
        plan_id: $("plan").value,
      });
      return api("POST", `/api/sessions/${created.session_id}/start`);
    });
    if (started) opened(started);
  });
}
