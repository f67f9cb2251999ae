// What the three pages share: DOM building, API calls, error sentences, formatting.
// Text goes into the page with textContent only; the one exception is the sanitized
// markdown on the registration page.

export const base = document.body.dataset.base || "";

/** An element with attributes (on* names become listeners) and children (strings or nodes). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2).toLowerCase(), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const $ = (selector, root = document) => root.querySelector(selector);

// --- errors --------------------------------------------------------------------------

/** An error answered by the proxy (docs/api.md#errors) or by the network. */
export class ApiError extends Error {
  constructor(code, message, status = 0, retryAfter = null, details = []) {
    super(message);
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
    this.details = details; // every bad field of a form: [{field, problem, fix}]
  }
}

/** The ApiError of a failed response: its JSON error body, else its status line. */
export async function errorOf(response) {
  let code = "", message = "", details = [];
  try {
    const body = await response.json();
    const error = body && body.error ? body.error : body;
    code = (error && (error.code || error.type)) || "";
    message = (error && error.message) || "";
    details = (error && Array.isArray(error.details) && error.details) || [];
  } catch {
    message = `The server answered ${response.status} ${response.statusText}.`;
    // The Functions host answers these itself, with no body: a refused function key, no route.
    if (response.status === 401) code = "unauthorized";
    if (response.status === 404) code = "not_found";
  }
  const retry = Number.parseInt(response.headers.get("retry-after") || "", 10);
  return new ApiError(code || `http_${response.status}`, message, response.status,
    Number.isFinite(retry) ? retry : null, details);
}

function retryText(seconds, fallback) {
  if (!seconds) return fallback;
  return `Try again in ${duration(seconds)}.`;
}

// Each proxy error as a plain sentence and what to do about it; the server's own message
// is shown beneath, since it names the specifics (the window, the deployments, the field).
const ERROR_HELP = {
  invalid_request: () => ["The request was not accepted.", "Check what the server says below and correct it."],
  max_tokens_exceeds_cap: () => ["Max tokens is above this event's cap.", "Lower Max tokens to the cap shown under Settings and send again."],
  invalid_api_key: () => ["This key is not recognised.", "Copy the whole key again from your registration page or from the organiser. A rotated key stops working."],
  key_revoked: () => ["Your key was revoked by the organiser.", "Ask the organiser for a new key."],
  event_not_started: () => ["The event has not started yet.", "Come back when it starts; the window is shown with the event."],
  event_ended: () => ["The event has ended.", "Keys only work during the event. Ask the organiser if you need more time."],
  event_inactive: () => ["The organiser has switched this event off.", "Ask the organiser to switch it on again."],
  deployment_not_found: () => ["That model is not available in this event.", "Pick one of the event's models from the list."],
  payload_too_large: () => ["The request is too large.", "Clear the conversation or send a shorter prompt."],
  daily_request_cap_exceeded: (e) => ["You have used all of today's requests.", `Your allowance resets at midnight in the event's time zone. ${retryText(e.retryAfter, "")}`],
  daily_token_cap_exceeded: (e) => ["You have used all of today's tokens.", `Your allowance resets at midnight in the event's time zone. ${retryText(e.retryAfter, "")}`],
  event_daily_request_cap_exceeded: (e) => ["The event has used all of today's requests.", `This is the total for all attendees together. It resets at midnight in the event's time zone. ${retryText(e.retryAfter, "")}`],
  event_daily_token_cap_exceeded: (e) => ["The event has used all of today's tokens.", `This is the total for all attendees together. It resets at midnight in the event's time zone. ${retryText(e.retryAfter, "")}`],
  attendee_budget_exhausted: () => ["You have used your budget for this event.", "Lower Max tokens and send again, or wait for a daily budget to reset; the organiser can raise the budget."],
  event_budget_exhausted: () => ["The event has used its budget.", "This is the budget of all attendees together. Ask the organiser to raise it."],
  no_capacity: (e) => ["The models are busy right now.", retryText(e.retryAfter, "Wait a few seconds and try again.")],
  rate_limit_exceeded: (e) => ["You are sending faster than this event allows.", retryText(e.retryAfter, "Wait a few seconds and try again.")],
  upstream_error: () => ["The model service did not answer properly.", "Try again in a moment. If it keeps failing, tell the organiser."],
  upstream_timeout: () => ["The model service took too long to answer.", "Try again, perhaps with a shorter prompt or fewer max tokens."],
  content_filter: () => ["The content filter blocked this prompt or its answer.", "Rephrase the prompt and try again."],
  registration_refused: () => ["Registration was refused.", "See the reason below, then try again or ask the organiser."],
  too_many_failed_keys: (e) => ["Too many wrong attempts from your address.", retryText(e.retryAfter, "Wait a minute and try again.")],
  storage_unavailable: () => ["The service cannot reach its storage right now.", "Try again in a few seconds."],
  plugin_failed: () => ["A check the organiser added to this proxy could not finish.", "Try again in a moment. If it keeps failing, tell the organiser."],
  unauthorized: () => ["You are not signed in, or that operator key was not accepted.", "Sign in again, or copy the operator key again from the app setting AIPROXY_OPERATOR_KEY (make run prints it)."],
  forbidden: () => ["Your account may not do that.", "The reason is below; the operator can do it, or give you the role it names."],
  not_found: () => ["Not found.", "It may have been deleted, or the link is incomplete."],
  conflict: () => ["That conflicts with what is stored.", "See the reason below."],
  internal_error: () => ["Something went wrong on the server.", "Try again; if it keeps failing, tell the organiser."],
  network: () => ["The service could not be reached.", "Check your connection and try again."],
};

/** {title, action, detail} for an error: a sentence from the table, else the server's. */
export function explain(error) {
  const help = ERROR_HELP[error.code];
  // One bad field: its fix after the message, which names only the problem.
  const [only] = (error.details || []).length === 1 ? error.details : [];
  const message = only && only.fix && !String(error.message).includes(only.fix) ? `${error.message} ${only.fix}` : error.message;
  const detail = message ? `${message}${error.code ? ` (${error.code})` : ""}` : error.code || "";
  if (help) {
    const [title, action] = help(error);
    return { title, action: action.trim(), detail };
  }
  return { title: error.message || "The request failed.", action: "", detail: error.code || "" };
}

/** Show an error (or nothing) in a .notice element. */
export function showError(el, error) {
  if (!error) {
    el.hidden = true;
    el.replaceChildren();
    return;
  }
  const { title, action, detail } = explain(error);
  el.className = "notice error";
  el.dataset.code = error.code || "";
  const fields = (error.details || []).length > 1 && h("ul", { class: "fields-to-fix" },
    error.details.map((d) => h("li", { dataset: { field: d.field } }, h("code", {}, d.field), ` ${d.problem}. ${d.fix}`)));
  fill(el, h("span", { class: "title" }, title), action && h("span", { class: "action" }, action),
    fields || (detail && h("span", { class: "detail" }, detail)));
  el.hidden = false;
}

export function showNotice(el, kind, text) {
  el.className = `notice ${kind}`;
  el.dataset.code = "";
  fill(el, text);
  el.hidden = false;
}

// --- calls -----------------------------------------------------------------------------

/** fetch() under the app's base path; throws ApiError unless the answer is 2xx. */
export async function call(path, { method = "GET", headers = {}, body, signal } = {}) {
  let response;
  try {
    response = await fetch(base + path, {
      method,
      headers: body === undefined ? headers : { "content-type": "application/json", ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError("network", String(exc.message || exc));
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function callJson(path, options) {
  const response = await call(path, options);
  return response.status === 204 ? null : response.json();
}

// --- formatting -------------------------------------------------------------------------

const numbers = new Intl.NumberFormat();
export const number = (n) => (n === null || n === undefined ? "—" : numbers.format(n));

export function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 90) return `${seconds} s`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 90) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  return `${hours} h ${minutes % 60} min`;
}

export const visitorZone = Intl.DateTimeFormat().resolvedOptions().timeZone;

/** "Mon, 4 May 2026, 09:00 – 18:00 CEST" in the visitor's zone (or `zone`). */
export function windowText(startUtc, endUtc, zone = visitorZone) {
  const start = new Date(startUtc), end = new Date(endUtc);
  const full = new Intl.DateTimeFormat(undefined, {
    weekday: "short", day: "numeric", month: "short", year: "numeric",
    hour: "2-digit", minute: "2-digit", timeZone: zone,
  });
  const dayOf = (d) => new Intl.DateTimeFormat("en-CA", { timeZone: zone, dateStyle: "short" }).format(d);
  const endFormat = dayOf(start) === dayOf(end)
    ? new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", timeZone: zone, timeZoneName: "short" })
    : new Intl.DateTimeFormat(undefined, {
      weekday: "short", day: "numeric", month: "short", year: "numeric",
      hour: "2-digit", minute: "2-digit", timeZone: zone, timeZoneName: "short",
    });
  return `${full.format(start)} – ${endFormat.format(end)}`;
}

/** upcoming, live, ended or inactive, from the UTC instants and the active flag. */
export function statusOf(event, now = Date.now()) {
  if (event.active === false) return "inactive";
  if (now < Date.parse(event.starts_at_utc)) return "upcoming";
  if (now >= Date.parse(event.ends_at_utc)) return "ended";
  return "live";
}

export const badge = (status) => h("span", { class: `badge ${status}` }, status);

// --- clipboard and storage ---------------------------------------------------------------

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = h("textarea", { readonly: true, "aria-hidden": "true" });
    area.value = text;
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1500);
  }
}

/** Keys live in sessionStorage only: gone when the tab closes. */
export const session = {
  get: (name) => { try { return sessionStorage.getItem(name) || ""; } catch { return ""; } },
  set: (name, value) => { try { sessionStorage.setItem(name, value); } catch { /* private mode */ } },
  remove: (name) => { try { sessionStorage.removeItem(name); } catch { /* private mode */ } },
};

export const KEY_STORAGE = "aiproxy.key";

/** "aip-abcd…wxyz" style, the key's ends kept so people can tell keys apart. */
export function masked(key) {
  if (!key) return "";
  return `${key.slice(0, 4)}${"•".repeat(Math.max(8, key.length - 8))}${key.slice(-4)}`;
}
