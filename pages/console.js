// The organiser console: events, their catalog, attendees and usage, over the manage API.
// Two ways in: the operator key, kept in sessionStorage only and sent as x-aiproxy-operator-key;
// or, behind App Service authentication, its session cookie (App Service turns it into the
// principal headers the app trusts), so the calls carry no key at all.

import {
  $, ApiError, badge, base, call, callJson, copyText, fill, h, number, session, showError,
  showNotice, statusOf, visitorZone, windowText,
} from "./common.js";
import { barList, columnChart } from "./charts.js";

const KEY_NAME = "aiproxy.operatorKey";
const TOP_ATTENDEES = 10;
// App Service authentication's providers when the app trusts it ("aad:Microsoft github:GitHub").
const PROVIDERS = (document.body.dataset.signIn || "").split(/\s+/).filter(Boolean).map((p) => p.split(":")[0]);
const BY_MICROSOFT = PROVIDERS.includes("aad");

const state = {
  mode: "", // "key": the operator key; "session": App Service sign-in; "": signed out
  key: "",
  events: [],
  counts: {}, // event id -> attendee count
  selected: null, // the selected event
  editing: null, // the event being edited, or "new"
  tab: "catalog",
  search: "", // the event list shows names containing this (any case)
  status: "", // and only events of this status ("": all)
};

// --- calls ------------------------------------------------------------------------------------

/** The credential of the calls: the operator key, or nothing (the session cookie goes anyway). */
const credential = () => (state.key ? { "x-aiproxy-operator-key": state.key } : {});

async function manage(path, options = {}) {
  try {
    return await callJson(`/manage${path}`, { ...options, headers: credential() });
  } catch (error) {
    if (error.status === 401 && state.mode) signOut(error);
    throw error;
  }
}

/** Run an action from a button: busy while it runs, its error shown on top. */
async function act(button, work, done = "") {
  if (button) button.disabled = true;
  showError($("#console-error"), null);
  $("#console-ok").hidden = true;
  try {
    await work();
    if (done) showNotice($("#console-ok"), "ok", done);
  } catch (error) {
    showError($("#console-error"), error);
  } finally {
    if (button) button.disabled = false;
  }
}

// --- signing in --------------------------------------------------------------------------------

const here = () => `${location.pathname}${location.search}`;

async function signIn(key) {
  state.key = key;
  try {
    await loadEvents();
  } catch (error) {
    state.key = "";
    throw error;
  }
  session.set(KEY_NAME, key);
  enter("key", "Operator");
}

/** Signed in with App Service authentication when a call without a key gets through. */
async function trySession() {
  try {
    await loadEvents();
  } catch (error) {
    if (error.status !== 401) showError($("#signin-error"), error);
    return;
  }
  enter("session", "Signed in");
  try {
    // Who: App Service's own record of the session, at the site's root (absent elsewhere).
    const response = await fetch("/.auth/me", { cache: "no-store" });
    const [me] = response.ok ? await response.json() : [];
    if (me && me.user_id) $("#signed-in-as").textContent = `Signed in as ${me.user_id}`;
  } catch {
    // the generic line stays
  }
}

function enter(mode, who) {
  state.mode = mode;
  $("#signed-in-as").textContent = who;
  $("#signed-in-as").hidden = false;
  $("#signin-view").hidden = true;
  $("#console-view").hidden = false;
  $("#sign-out").hidden = mode !== "key";
  $("#sign-out-session").hidden = mode !== "session";
}

function signOut(error = null) {
  session.remove(KEY_NAME);
  Object.assign(state, { mode: "", key: "", events: [], counts: {}, selected: null, editing: null });
  $("#console-view").hidden = true;
  $("#sign-out").hidden = true;
  $("#sign-out-session").hidden = true;
  $("#signed-in-as").hidden = true;
  $("#signin-view").hidden = false;
  $("#operator-key").value = "";
  showError($("#signin-error"), error);
}

// --- events list ---------------------------------------------------------------------------------

const ORDER = { live: 0, upcoming: 1, inactive: 2, ended: 3 };

async function loadEvents() {
  const events = await manage("/events");
  events.sort((a, b) => (ORDER[statusOf(a)] - ORDER[statusOf(b)])
    || (statusOf(a) === "ended" ? b.starts_at_utc.localeCompare(a.starts_at_utc)
      : a.starts_at_utc.localeCompare(b.starts_at_utc)));
  state.events = events;
  renderEvents();
  countAttendees(events.filter((e) => !(e.id in state.counts)));
}

const countText = (count) => (count === null || count === undefined ? "" : `${count} attendee${count === 1 ? "" : "s"}`);

/** Attendee counts for the list, a few calls at a time, filled in as they come. */
async function countAttendees(events, parallel = 4) {
  const queue = [...events];
  const worker = async () => {
    while (queue.length && state.mode) {
      const event = queue.shift();
      try {
        state.counts[event.id] = (await manage(`/events/${event.id}/attendees`)).length;
      } catch {
        continue; // the list works without a count
      }
      showCount(event.id);
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
}

function showCount(eventId) {
  const span = document.querySelector(`#event-list button[data-event-id="${CSS.escape(eventId)}"] .attendee-count`);
  if (span) span.textContent = countText(state.counts[eventId]);
}

/** The events the search and the status filter let through. */
function shownEvents() {
  const words = state.search.trim().toLowerCase();
  return state.events.filter((event) => (!words || event.name.toLowerCase().includes(words))
    && (!state.status || statusOf(event) === state.status));
}

function renderEvents() {
  const list = $("#event-list");
  const shown = shownEvents();
  fill(list, shown.map((event) => h("li", {}, h("button", {
    type: "button",
    "aria-current": String(Boolean(state.selected && state.selected.id === event.id)),
    dataset: { eventId: event.id },
    onclick: () => selectEvent(event.id),
  },
  h("span", { class: "name" }, event.name),
  h("span", { class: "meta" }, badge(statusOf(event)),
    h("span", { class: "attendee-count" }, countText(state.counts[event.id])),
    h("span", {}, new Date(event.starts_at_utc).toLocaleDateString(undefined, { day: "numeric", month: "short", year: "numeric" })))))));
  $("#no-events").hidden = state.events.length > 0;
  $("#no-match").hidden = !state.events.length || shown.length > 0;
}

function show(view) {
  $("#editor").hidden = view !== "editor";
  $("#event-view").hidden = view !== "event";
  $("#placeholder").hidden = view !== "placeholder";
}

async function selectEvent(id, tab = state.tab) {
  state.selected = state.events.find((e) => e.id === id) || null;
  state.editing = null;
  renderEvents();
  if (!state.selected) { show("placeholder"); return; }
  const event = state.selected;
  $("#event-title").textContent = event.name;
  $("#event-when").textContent = `${windowText(event.starts_at_utc, event.ends_at_utc)} · caps: `
    + `${number(event.max_token_cap)} tokens per request, ${number(event.daily_request_cap)} requests`
    + `${event.daily_token_cap ? ` and ${number(event.daily_token_cap)} tokens` : ""} per attendee per day`
    + perMinute(event);
  fill($("#event-badge"), badge(statusOf(event)));
  const link = `${location.origin}${base}/register/${event.id}`;
  $("#register-link").textContent = link;
  $("#open-register").href = link;
  $("#new-key").hidden = true;
  show("event");
  await selectTab(tab);
}

/** ", at most 30 requests and 9,000 tokens per attendee per minute", or nothing. */
function perMinute(event) {
  const parts = [];
  if (event.requests_per_minute) parts.push(`${number(event.requests_per_minute)} requests`);
  if (event.tokens_per_minute) parts.push(`${number(event.tokens_per_minute)} tokens`);
  return parts.length ? `, at most ${parts.join(" and ")} per attendee per minute` : "";
}

// --- editor -----------------------------------------------------------------------------------------

function zones(selected) {
  let names = [];
  try { names = Intl.supportedValuesOf("timeZone"); } catch { names = []; }
  names = [...new Set(["UTC", ...names, visitorZone, selected].filter(Boolean))];
  return names.map((zone) => h("option", { value: zone, selected: zone === selected }, zone.replaceAll("_", " ")));
}

/** "2026-05-04T09:00" for a datetime-local input, `days` from today at `hour`. */
function localInput(days, hour) {
  const d = new Date();
  d.setDate(d.getDate() + days);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(hour)}:00`;
}

function openEditor(event = null) {
  state.editing = event || "new";
  const e = event || {
    name: "", starts_at: localInput(1, 9), ends_at: localInput(1, 17), time_zone: visitorZone,
    max_token_cap: 1024, daily_request_cap: 200, daily_token_cap: 0, shared_code: "",
    requests_per_minute: 0, tokens_per_minute: 0, realtime_max_session_seconds: 600,
    realtime_client_secrets: false, currency: "USD", budget: "", attendee_budget: "",
    attendee_daily_budget: "", budget_alerts: "50,80,100", alert_webhook_url: "",
    organizer_name: "", organizer_email: "", image_url: "", description_markdown: "", active: true,
  };
  $("#editor-title").textContent = event ? `Edit ${event.name}` : "New event";
  $("#save-event").textContent = event ? "Save changes" : "Create event";
  $("#delete-event").hidden = !event;
  $("#ev-name").value = e.name;
  $("#ev-starts").value = e.starts_at.slice(0, 16);
  $("#ev-ends").value = e.ends_at.slice(0, 16);
  fill($("#ev-zone"), zones(e.time_zone));
  $("#ev-max-token-cap").value = e.max_token_cap;
  $("#ev-daily-request-cap").value = e.daily_request_cap;
  $("#ev-daily-token-cap").value = e.daily_token_cap || 0;
  $("#ev-requests-per-minute").value = e.requests_per_minute || 0;
  $("#ev-tokens-per-minute").value = e.tokens_per_minute || 0;
  $("#ev-currency").value = e.currency || "USD";
  $("#ev-budget").value = e.budget || "";
  $("#ev-attendee-budget").value = e.attendee_budget || "";
  $("#ev-attendee-daily-budget").value = e.attendee_daily_budget || "";
  $("#ev-budget-alerts").value = e.budget_alerts ?? "50,80,100";
  $("#ev-alert-webhook").value = e.alert_webhook_url || "";
  $("#ev-realtime-seconds").value = e.realtime_max_session_seconds || 600;
  $("#ev-realtime-secrets").checked = e.realtime_client_secrets === true;
  $("#ev-shared-code").value = e.shared_code || "";
  $("#ev-organizer-name").value = e.organizer_name || "";
  $("#ev-organizer-email").value = e.organizer_email || "";
  $("#ev-image-url").value = e.image_url || "";
  $("#ev-description").value = e.description_markdown || "";
  $("#ev-active").checked = e.active !== false;
  show("editor");
  $("#ev-name").focus();
}

function editorBody() {
  const whole = (id) => Number.parseInt($(id).value || "0", 10);
  return {
    name: $("#ev-name").value.trim(),
    starts_at: $("#ev-starts").value,
    ends_at: $("#ev-ends").value,
    time_zone: $("#ev-zone").value,
    max_token_cap: whole("#ev-max-token-cap"),
    daily_request_cap: whole("#ev-daily-request-cap"),
    daily_token_cap: whole("#ev-daily-token-cap"),
    requests_per_minute: whole("#ev-requests-per-minute"),
    tokens_per_minute: whole("#ev-tokens-per-minute"),
    currency: $("#ev-currency").value.trim().toUpperCase() || "USD",
    budget: $("#ev-budget").value.trim(),
    attendee_budget: $("#ev-attendee-budget").value.trim(),
    attendee_daily_budget: $("#ev-attendee-daily-budget").value.trim(),
    budget_alerts: $("#ev-budget-alerts").value.trim(),
    alert_webhook_url: $("#ev-alert-webhook").value.trim(),
    realtime_max_session_seconds: whole("#ev-realtime-seconds"),
    realtime_client_secrets: $("#ev-realtime-secrets").checked,
    shared_code: $("#ev-shared-code").value.trim(),
    organizer_name: $("#ev-organizer-name").value.trim(),
    organizer_email: $("#ev-organizer-email").value.trim(),
    image_url: $("#ev-image-url").value.trim(),
    description_markdown: $("#ev-description").value,
    active: $("#ev-active").checked,
  };
}

async function saveEvent() {
  const editing = state.editing;
  const saved = editing === "new"
    ? await manage("/events", { method: "POST", body: editorBody() })
    : await manage(`/events/${editing.id}`, { method: "PATCH", body: editorBody() });
  await loadEvents();
  await selectEvent(saved.id, editing === "new" ? "catalog" : state.tab);
}

async function deleteEvent() {
  const event = state.editing;
  if (!event || event === "new" || !confirm(`Delete the event “${event.name}”?`)) return;
  try {
    await manage(`/events/${event.id}`, { method: "DELETE" });
  } catch (error) {
    if (error.status !== 409) throw error;
    if (!confirm(`“${event.name}” has attendees. Delete it with its attendees and their keys?`)) return;
    await manage(`/events/${event.id}?force=true`, { method: "DELETE" });
  }
  state.selected = null;
  await loadEvents();
  show("placeholder");
}

// --- tabs -----------------------------------------------------------------------------------------------

async function selectTab(tab) {
  state.tab = tab;
  for (const name of ["catalog", "attendees", "usage"]) {
    $(`#tab-${name}`).setAttribute("aria-selected", String(name === tab));
    $(`#${name}-panel`).hidden = name !== tab;
  }
  try {
    await ({ catalog: loadCatalog, attendees: loadAttendees, usage: loadUsage })[tab]();
  } catch (error) {
    showError($("#console-error"), error);
  }
}

// --- catalog -------------------------------------------------------------------------------------------

async function loadCatalog() {
  const eventId = state.selected.id;
  const [attached, all] = await Promise.all([manage(`/events/${eventId}/resources`), manage("/resources")]);
  fill($("#catalog-rows"), attached.map((r) => h("tr", { dataset: { resourceId: r.id } },
    h("td", {}, h("strong", {}, r.deployment)),
    h("td", {}, r.model_class),
    h("td", {}, r.name, h("div", { class: "faint small" }, r.endpoint),
      r.model_class === "mcp" ? mcpDetails(r) : null),
    h("td", {}, `${r.priority} / ${r.weight}`),
    h("td", {}, quotaText(r)),
    h("td", { class: "actions" }, h("button", {
      type: "button", class: "danger small",
      onclick: (e) => act(e.currentTarget, async () => {
        await manage(`/events/${eventId}/resources/${r.id}`, { method: "DELETE" });
        await loadCatalog();
      }, `Detached ${r.name}.`),
    }, "Detach")))));
  $("#catalog-empty").hidden = attached.length > 0;
  const attachedIds = new Set(attached.map((r) => r.id));
  const free = all.filter((r) => !attachedIds.has(r.id));
  fill($("#attach-resource"), free.length
    ? free.map((r) => h("option", { value: r.id }, `${r.deployment} · ${r.model_class} · ${r.name}`))
    : h("option", { value: "" }, "Every resource is attached; add a new one below"));
  $("#attach").disabled = free.length === 0;
}

/** An MCP server's tools and the URL attendees give their MCP clients. */
function mcpDetails(resource) {
  const tools = resource.allowed_tools === null || resource.allowed_tools === undefined
    ? "every tool of the server"
    : (resource.allowed_tools.join(", ") || "no tool");
  return h("div", { class: "small", dataset: { tools: resource.deployment } },
    h("div", {}, `Tools: ${tools}`),
    h("div", { class: "faint" }, `Attendees' MCP URL: ${location.origin}${base}/mcp/${resource.deployment}`));
}

function quotaText(resource) {
  const parts = [];
  if (resource.quota_requests_per_minute) parts.push(`${number(resource.quota_requests_per_minute)} req/min`);
  if (resource.quota_tokens_per_minute) parts.push(`${number(resource.quota_tokens_per_minute)} tokens/min`);
  return parts.join(", ") || "—";
}

async function attach(resourceId) {
  await manage(`/events/${state.selected.id}/resources/${resourceId}`, { method: "PUT" });
  await loadCatalog();
}

async function addResource() {
  const value = (id) => $(id).value.trim();
  const body = {
    name: value("#res-name"),
    deployment: value("#res-deployment"),
    model_class: value("#res-class"),
    endpoint: value("#res-endpoint"),
    auth: value("#res-auth"),
    priority: Number.parseInt(value("#res-priority") || "1", 10),
    weight: Number.parseInt(value("#res-weight") || "1", 10),
    quota_requests_per_minute: Number.parseInt(value("#res-quota-requests") || "0", 10),
    quota_tokens_per_minute: Number.parseInt(value("#res-quota-tokens") || "0", 10),
  };
  if (value("#res-upstream")) body.upstream_deployment = value("#res-upstream");
  if (body.auth === "key" || body.auth === "bearer") body.api_key = $("#res-key").value;
  const tools = value("#res-tools").split(",").map((t) => t.trim()).filter(Boolean);
  if (body.model_class === "mcp" && tools.length) body.allowed_tools = tools;
  const created = await manage("/resources", { method: "POST", body });
  await attach(created.id);
  $("#resource-form").reset();
  $("#resource-details").open = false;
}

// --- attendees ---------------------------------------------------------------------------------------------

function showNewKey(label, key) {
  $("#new-key-label").textContent = label;
  $("#new-key-value").textContent = key;
  $("#new-key").hidden = false;
}

async function loadAttendees() {
  const eventId = state.selected.id;
  const attendees = await manage(`/events/${eventId}/attendees`);
  attendees.sort((a, b) => (b.total_tokens || 0) - (a.total_tokens || 0) || a.user.localeCompare(b.user));
  state.counts[eventId] = attendees.length;
  showCount(eventId);
  fill($("#attendee-rows"), attendees.map((a) => h("tr", { dataset: { attendeeId: a.id } },
    h("td", {}, a.user),
    h("td", {}, badge(a.active ? "active" : "revoked")),
    h("td", { class: "num" }, number(a.requests)),
    h("td", { class: "num" }, number(a.total_tokens)),
    h("td", { class: "actions" },
      a.active && h("button", {
        type: "button", class: "secondary small",
        onclick: (e) => confirm(`Give ${a.user} a new key? The current one stops working at once.`)
          && act(e.currentTarget, async () => {
            const rotated = await manage(`/events/${eventId}/attendees/${a.id}/rotate`, { method: "POST" });
            showNewKey(`New key for ${a.user}`, rotated.api_key);
            await loadAttendees();
          }),
      }, "Rotate"),
      a.active && h("button", {
        type: "button", class: "danger small",
        onclick: (e) => confirm(`Revoke ${a.user}'s key? It stops working at once.`)
          && act(e.currentTarget, async () => {
            await manage(`/events/${eventId}/attendees/${a.id}`, { method: "DELETE" });
            await loadAttendees();
          }, `Revoked ${a.user}.`),
      }, "Revoke")))));
  $("#attendees-empty").hidden = attendees.length > 0;
}

async function addAttendee(user) {
  const added = await manage(`/events/${state.selected.id}/attendees`, { method: "POST", body: { user } });
  showNewKey(`Key for ${added.user}`, added.api_key);
  $("#attendee-user").value = "";
  await loadAttendees();
}

// --- usage ---------------------------------------------------------------------------------------------------

/** A chart's card; `draw(width)` makes its SVG once the card's width is known. */
function chartCard(id, title, draw, legendEl = null) {
  const card = h("div", { class: "chart", id }, h("h3", {}, title), legendEl);
  card.draw = draw;
  return card;
}

const legend = (...names) => h("div", { class: "legend" }, names.map(([cls, text]) => h("span", { class: cls }, text)));

// Why calls were refused, as the usage report names the reasons.
const REFUSALS = {
  requests_per_minute: "Requests per minute",
  tokens_per_minute: "Tokens per minute",
  fair_share: "Fair share of a deployment",
  deployment_quota: "Deployment quota",
  daily_request_cap: "Daily requests",
  daily_token_cap: "Daily tokens",
  event_daily_request_cap: "Event's daily requests",
  event_daily_token_cap: "Event's daily tokens",
  attendee_budget: "Attendee's budget",
  event_budget: "Event's budget",
  no_capacity: "No capacity",
};

const sum = (values) => values.reduce((total, value) => total + (value || 0), 0);

/** An amount ("12.5") in billionths, exactly; "" is 0. */
function nanoOf(text) {
  const [whole, fraction = ""] = String(text || "0").split(".");
  return Number(whole || 0) * 1e9 + Number(fraction.slice(0, 9).padEnd(9, "0"));
}

/** Billionths as the API writes amounts: 1234500 -> "0.0012345". */
function amountOf(nano) {
  const sign = nano < 0 ? "-" : "";
  const n = Math.abs(Math.round(nano));
  const fraction = String(n % 1e9).padStart(9, "0").replace(/0+$/, "");
  return `${sign}${Math.floor(n / 1e9)}${fraction ? `.${fraction}` : ""}`;
}

/** The budget alerts that fired, as a banner; the forecast of the event budget (exact
 * amounts: the spend of a few calls is a few millionths). */
function renderBudget(event, alerts, spentNano, byHour) {
  const currency = event.currency || "USD";
  const banner = $("#budget-banner");
  const last = alerts[alerts.length - 1];
  banner.hidden = !last;
  if (last) {
    banner.textContent = `Budget alert: ${last.threshold_percent}% of the event budget reached `
      + `(${last.spent} of ${last.budget} ${currency} spent at ${new Date(last.fired_at).toLocaleString()}).`;
  }
  const forecast = $("#budget-forecast");
  const budget = nanoOf(event.budget);
  forecast.hidden = !budget;
  if (!budget) return;
  const left = budget - spentNano;
  const dayAgo = Date.now() - 24 * 3600 * 1000;
  const lastDay = sum(byHour.rows.filter((r) => new Date(r.hour).getTime() >= dayAgo).map((r) => r.cost_nano));
  const of = `${amountOf(Math.max(0, left))} of ${amountOf(budget)} ${currency} left`;
  if (left <= 0) {
    forecast.textContent = `The event budget of ${amountOf(budget)} ${currency} is spent.`;
  } else if (lastDay <= 0) {
    forecast.textContent = `${of}; nothing spent in the last 24 hours.`;
  } else {
    const until = new Date(Date.now() + (left / lastDay) * 24 * 3600 * 1000);
    forecast.textContent = `${of}. At the last 24 hours' rate `
      + `(${amountOf(lastDay)} ${currency} a day) the budget lasts until ${until.toLocaleString()}.`;
  }
}

async function loadUsage() {
  const eventId = state.selected.id;
  const [byDay, byDeployment, byAttendee, byHour] = await Promise.all(["day", "deployment", "attendee", "hour"]
    .map((group) => manage(`/events/${eventId}/usage?group_by=${group}`)));
  const alerts = await manage(`/events/${eventId}/alerts`);
  const t = byDay.totals;
  const currency = state.selected.currency || "USD";
  renderBudget(state.selected, alerts, t.cost_nano, byHour);
  const refusedTotal = sum(Object.values(byAttendee.totals.refused || {}));
  fill($("#usage-totals"), [
    ["Requests", t.requests], ["Prompt tokens", t.prompt_tokens],
    ["Completion tokens", t.completion_tokens], ["Total tokens", t.total_tokens],
    ["Cached prompt tokens", t.cached_tokens], ["Reasoning tokens", t.reasoning_tokens],
    ["Attendees active", byHour.totals.active_attendees], ["Calls refused", refusedTotal],
    [`Spend (${currency})`, t.cost], ["Unpriced calls", t.unpriced],
  ].map(([label, value]) => h("div", { class: "tile" }, h("span", { class: "label" }, label),
    h("span", { class: "value" }, typeof value === "string" ? value : number(value)))));
  renderRefusals(byAttendee);
  renderToolCalls(await manage(`/events/${eventId}/toolcalls`));

  const days = byDay.rows;
  const dayLabels = days.map((r) => new Date(`${r.day}T12:00:00Z`).toLocaleDateString(undefined, { day: "numeric", month: "short", timeZone: "UTC" }));
  const hours = byHour.rows;
  const hourLabels = hours.map((r) => new Date(r.hour).toLocaleString(undefined, { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" }));
  const deployments = [...byDeployment.rows].sort((a, b) => b.total_tokens - a.total_tokens);
  const costly = [...byDeployment.rows].sort((a, b) => b.cost_nano - a.cost_nano);
  const top = [...byAttendee.rows].sort((a, b) => b.total_tokens - a.total_tokens).slice(0, TOP_ATTENDEES);
  const spenders = [...byAttendee.rows].filter((r) => Number(r.cost) > 0)
    .sort((a, b) => Number(b.cost) - Number(a.cost)).slice(0, TOP_ATTENDEES);
  const cards = [
    chartCard("chart-requests-per-day", "Requests per day", (width) => days.length && columnChart({
      width, labels: dayLabels, series: [{ name: "requests", className: "bar-requests", values: days.map((r) => r.requests) }],
    })),
    chartCard("chart-tokens-per-day", "Tokens per day", (width) => days.length && columnChart({
      width,
      labels: dayLabels,
      series: [
        { name: "prompt", className: "bar-prompt", values: days.map((r) => r.prompt_tokens) },
        { name: "completion", className: "bar-completion", values: days.map((r) => r.completion_tokens) },
      ],
    }), days.length ? legend(["prompt", "prompt"], ["completion", "completion"]) : null),
    chartCard("chart-spend-per-day", `Spend per day (${currency})`, (width) => days.length && columnChart({
      width, labels: dayLabels, whole: false,
      series: [{ name: "spend", className: "bar-tokens", values: days.map((r) => Number(r.cost)), texts: days.map((r) => r.cost) }],
    })),
    chartCard("chart-spend-deployments", `Spend per deployment (${currency})`, (width) => costly.length && barList({
      width, labels: costly.map((r) => r.deployment), values: costly.map((r) => Number(r.cost)), texts: costly.map((r) => r.cost), className: "bar-tokens", unit: ` ${currency}`,
    })),
    chartCard("chart-spend-attendees", `Top ${TOP_ATTENDEES} attendees by spend (${currency})`, (width) => spenders.length && barList({
      width, labels: spenders.map((r) => r.user || r.attendee_id), values: spenders.map((r) => Number(r.cost)), texts: spenders.map((r) => r.cost), className: "bar-requests", unit: ` ${currency}`,
    })),
    chartCard("chart-active", "Active attendees per hour", (width) => hours.length && columnChart({
      width,
      labels: hourLabels,
      series: [
        { name: "new", className: "bar-new", values: hours.map((r) => r.new_attendees) },
        { name: "returning", className: "bar-returning", values: hours.map((r) => r.active_attendees - r.new_attendees) },
      ],
    }), hours.length ? legend(["new", "new"], ["returning", "returning"]) : null),
    chartCard("chart-deployments", "Tokens per deployment", (width) => deployments.length && barList({
      width, labels: deployments.map((r) => r.deployment), values: deployments.map((r) => r.total_tokens), className: "bar-tokens", unit: " tokens",
    })),
    chartCard("chart-attendees", `Top ${TOP_ATTENDEES} attendees by tokens`, (width) => top.length && barList({
      width, labels: top.map((r) => r.user || r.attendee_id), values: top.map((r) => r.total_tokens), className: "bar-requests", unit: " tokens",
    })),
  ];
  fill($("#charts"), cards);
  for (const card of cards) {
    card.append(card.draw(Math.max(240, card.clientWidth)) || h("p", { class: "empty" }, "No traffic yet."));
  }
}

/** Refused calls per attendee, one column per reason that occurred, most refused first. */
function renderRefusals(byAttendee) {
  const totals = byAttendee.totals.refused || {};
  const reasons = Object.keys(REFUSALS).filter((reason) => totals[reason]);
  const rows = byAttendee.rows.filter((r) => r.refused && sum(Object.values(r.refused)) > 0)
    .sort((a, b) => sum(Object.values(b.refused)) - sum(Object.values(a.refused)));
  fill($("#refusals-head"), h("tr", {}, h("th", {}, "Attendee"),
    reasons.map((reason) => h("th", { class: "num", dataset: { reason } }, REFUSALS[reason]))));
  fill($("#refusal-rows"), rows.map((r) => h("tr", { dataset: { attendeeId: r.attendee_id } },
    h("td", {}, r.user || r.attendee_id),
    reasons.map((reason) => h("td", { class: "num", dataset: { reason } }, number(r.refused[reason]))))));
  $("#refusals-wrap").hidden = rows.length === 0;
  $("#refusals-empty").hidden = rows.length > 0;
}

/** MCP tool calls by attendee, server and tool, busiest first (as the API sorts them). */
function renderToolCalls(rows) {
  fill($("#toolcall-rows"), rows.map((r) => h("tr", { dataset: { attendeeId: r.attendee_id, tool: r.tool } },
    h("td", {}, r.user || r.attendee_id), h("td", {}, r.deployment), h("td", {}, r.tool),
    h("td", { class: "num" }, number(r.calls)), h("td", { class: "num" }, number(r.ok)),
    h("td", { class: "num" }, number(r.failed)), h("td", { class: "num" }, number(r.unfinished)),
    h("td", { class: "num" }, number(r.average_ms)))));
  $("#toolcalls-wrap").hidden = rows.length === 0;
  $("#toolcalls-empty").hidden = rows.length > 0;
}

async function downloadCsv() {
  const group = $("#csv-group").value;
  const event = state.selected;
  const response = await call(`/manage/events/${event.id}/usage?group_by=${group}&format=csv`,
    { headers: credential() });
  const url = URL.createObjectURL(await response.blob());
  const slug = event.name.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "") || event.id;
  const link = h("a", { href: url, download: `usage-${slug}-by-${group}.csv`, class: "offscreen" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30_000);
}

// --- wiring ------------------------------------------------------------------------------------------------------

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("#operator-key").value.trim();
  if (!key) return;
  $("#sign-in").disabled = true;
  showError($("#signin-error"), null);
  try {
    await signIn(key);
  } catch (error) {
    showError($("#signin-error"), error);
  } finally {
    $("#sign-in").disabled = false;
  }
});
$("#sign-out").addEventListener("click", () => signOut());
$("#event-search").addEventListener("input", (event) => { state.search = event.target.value; renderEvents(); });
$("#event-status").addEventListener("change", (event) => { state.status = event.target.value; renderEvents(); });
$("#clear-filters").addEventListener("click", () => {
  state.search = state.status = "";
  $("#event-search").value = $("#event-status").value = "";
  renderEvents();
});
$("#new-event").addEventListener("click", () => { state.selected = null; renderEvents(); openEditor(); });
$("#edit-event").addEventListener("click", () => openEditor(state.selected));
// "generate" asks the proxy for a random code; the saved event shows it.
$("#generate-code").addEventListener("click", () => { $("#ev-shared-code").value = "generate"; });
$("#cancel-edit").addEventListener("click", () => (state.selected ? selectEvent(state.selected.id) : show("placeholder")));
$("#event-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act($("#save-event"), saveEvent, state.editing === "new" ? "Event created. Now attach its deployments." : "Saved.");
});
$("#delete-event").addEventListener("click", (event) => act(event.currentTarget, deleteEvent));
$("#copy-register").addEventListener("click", (event) => copyText($("#register-link").textContent, event.currentTarget));
for (const tab of ["catalog", "attendees", "usage"]) {
  $(`#tab-${tab}`).addEventListener("click", () => selectTab(tab));
}
$("#attach-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = $("#attach-resource").value;
  if (id) act($("#attach"), () => attach(id), "Attached.");
});
$("#resource-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act($("#add-resource"), addResource, "Resource added and attached.");
});
$("#attendee-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const user = $("#attendee-user").value.trim();
  if (user) act($("#add-attendee"), () => addAttendee(user));
});
$("#copy-new-key").addEventListener("click", (event) => copyText($("#new-key-value").textContent, event.currentTarget));
$("#refresh-usage").addEventListener("click", (event) => act(event.currentTarget, loadUsage));
$("#download-csv").addEventListener("click", (event) => act(event.currentTarget, downloadCsv));

$("#sign-in-microsoft").href = `/.auth/login/aad?post_login_redirect_uri=${encodeURIComponent(here())}`;
$("#sign-out-session").href = `/.auth/logout?post_logout_redirect_uri=${encodeURIComponent(here())}`;
$("#organiser-sign-in").hidden = !BY_MICROSOFT;
session.remove("aiproxy.functionKey"); // what an earlier console kept; it opens nothing now

const remembered = session.get(KEY_NAME);
if (remembered) {
  signIn(remembered).catch((error) => signOut(error instanceof ApiError ? error : null));
} else if (PROVIDERS.length) {
  trySession();
}
