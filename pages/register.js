// The registration page: the event's public info, then a key by sign-in or by shared code.

import {
  $, ApiError, KEY_STORAGE, badge, callJson, copyText, fill, h, masked, session, showError,
  statusOf, visitorZone, windowText,
} from "./common.js";

const eventId = document.body.dataset.eventId;
const signIn = (document.body.dataset.signIn || "").split(" ").filter(Boolean)
  .map((entry) => { const [provider, ...label] = entry.split(":"); return { provider, label: label.join(":") }; });
const storageName = `aiproxy.registration.${eventId}`;
const API_VERSION = "2024-10-21";

let registration = null; // {api_key, endpoint, user, deployment}
let revealed = false;

// --- the event ------------------------------------------------------------------------------

const escapeHtml = (text) => text.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");

/**
 * Markdown to HTML, then sanitized. Raw HTML in the markdown is shown as text, never parsed,
 * and DOMPurify removes whatever else could run (javascript: links) or load (non-https pictures).
 */
function renderMarkdown(markdown) {
  const purify = window.DOMPurify;
  if (!window.marked || !purify || !purify.isSupported) {
    return [h("p", {}, markdown)]; // without the libraries, the text as text
  }
  const parser = new window.marked.Marked({
    gfm: true,
    async: false,
    renderer: { html: ({ text, block }) => (block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text)) },
  });
  purify.removeAllHooks();
  purify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.getAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
    if (node.tagName === "IMG" && !/^https:\/\//i.test(node.getAttribute("src") || "")) {
      node.removeAttribute("src");
    }
  });
  return purify.sanitize(parser.parse(markdown), {
    RETURN_DOM_FRAGMENT: true,
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
    FORBID_ATTR: ["style", "class", "id"],
  });
}

function showEvent(event) {
  document.title = `${event.name} · Register · AI Proxy`;
  $("#event-name").textContent = event.name;
  $("#event-window").textContent = windowText(event.starts_at_utc, event.ends_at_utc);
  $("#event-zone").textContent = event.time_zone === visitorZone
    ? `Times in ${visitorZone}, the event's time zone.`
    : `Times in your time zone (${visitorZone}). In the event's time zone (${event.time_zone}): `
      + windowText(event.starts_at_utc, event.ends_at_utc, event.time_zone);
  $("#event-organizer").textContent = event.organizer_name ? `Organised by ${event.organizer_name}` : "";
  const status = statusOf(event);
  fill($("#event-status"), badge(status));
  if (event.image_url && /^https:\/\//i.test(event.image_url)) {
    $("#event-image").src = event.image_url;
    $("#event-image").hidden = false;
  }
  fill($("#description"), event.description_markdown ? renderMarkdown(event.description_markdown) : []);
  $("#event-card").hidden = false;

  // How this event takes registrations; an older server says nothing, so offer the code form.
  const how = event.registration || {};
  const open = how.open !== undefined ? how.open : status !== "ended" && status !== "inactive";
  const byCode = how.shared_code !== false;
  const bySignIn = signIn.length > 0 && how.sign_in !== false;
  if (!open) {
    showError($("#page-error"), new ApiError(status === "ended" ? "event_ended" : "event_inactive",
      status === "ended" ? "Registration is closed." : "Registration is paused."));
  }
  $("#register-card").hidden = !open;
  $("#code-form").hidden = !byCode;
  $("#code-divider").hidden = !byCode;
  if (bySignIn) {
    const back = `${location.pathname}?signed_in=1`;
    fill($("#sign-in-links"), signIn.map(({ provider, label }) => h("a", {
      class: "button secondary",
      href: `/.auth/login/${encodeURIComponent(provider)}?post_login_redirect_uri=${encodeURIComponent(back)}`,
    }, `Sign in with ${label}`)));
  }
  $("#sign-in").hidden = !bySignIn;
  $("#no-way").hidden = byCode || bySignIn;
  return bySignIn;
}

// --- registering --------------------------------------------------------------------------------

async function register(body) {
  const answer = await callJson(`/events/${encodeURIComponent(eventId)}/register`, { method: "POST", body });
  let deployment = "";
  try {
    const info = await callJson("/eventinfo", { headers: { "api-key": answer.api_key } });
    deployment = ((info.deployments || {})["openai-chat"] || [])[0] || "";
  } catch {
    // Before the event or without chat models the snippet names a placeholder.
  }
  registration = { api_key: answer.api_key, endpoint: answer.endpoint, user: answer.user || "", deployment };
  session.set(storageName, JSON.stringify(registration));
  session.set(KEY_STORAGE, answer.api_key);
  showKey();
}

function snippet(reveal) {
  const key = reveal ? registration.api_key : masked(registration.api_key);
  const model = registration.deployment || "YOUR-DEPLOYMENT";
  return [
    "from openai import AzureOpenAI",
    "",
    "client = AzureOpenAI(",
    `    azure_endpoint=${JSON.stringify(registration.endpoint)},`,
    `    api_key=${JSON.stringify(key)},`,
    `    api_version=${JSON.stringify(API_VERSION)},`,
    ")",
    "response = client.chat.completions.create(",
    `    model=${JSON.stringify(model)},`,
    '    messages=[{"role": "user", "content": "Say hello"}],',
    ")",
    "print(response.choices[0].message.content)",
  ].join("\n");
}

function showKey() {
  $("#api-key").textContent = revealed ? registration.api_key : masked(registration.api_key);
  $("#api-key").dataset.masked = String(!revealed);
  $("#reveal").textContent = revealed ? "Hide" : "Reveal";
  $("#endpoint").textContent = registration.endpoint;
  $("#snippet").textContent = snippet(revealed);
  $("#key-user").textContent = registration.user ? `for ${registration.user}` : "";
  $("#key-card").hidden = false;
  $("#register-card").hidden = true;
}

async function withButton(button, work) {
  button.disabled = true;
  showError($("#register-error"), null);
  try {
    await work();
  } catch (error) {
    showError($("#register-error"), error);
  } finally {
    button.disabled = false;
  }
}

// --- wiring -----------------------------------------------------------------------------------------

$("#code-form").addEventListener("submit", (event) => {
  event.preventDefault();
  withButton($("#register"), () => register({ email: $("#email").value.trim(), shared_code: $("#code").value.trim() }));
});
$("#reveal").addEventListener("click", () => { revealed = !revealed; showKey(); });
$("#copy-key").addEventListener("click", (event) => copyText(registration.api_key, event.currentTarget));
$("#copy-endpoint").addEventListener("click", (event) => copyText(registration.endpoint, event.currentTarget));
$("#copy-snippet").addEventListener("click", (event) => copyText(snippet(true), event.currentTarget));

async function start() {
  let event;
  try {
    event = await callJson(`/events/${encodeURIComponent(eventId)}`);
  } catch (error) {
    if (error.code === "not_found") error.message = "There is no event at this address. Check the link you were given.";
    showError($("#page-error"), error);
    return;
  }
  const bySignIn = showEvent(event);
  const saved = session.get(storageName);
  if (saved) {
    try {
      registration = JSON.parse(saved);
      showKey();
      return;
    } catch {
      session.remove(storageName);
    }
  }
  // Back from signing in: the platform now sends who the visitor is with the request.
  if (bySignIn && new URLSearchParams(location.search).get("signed_in") === "1") {
    history.replaceState(null, "", location.pathname);
    await withButton($("#register"), () => register({}));
  }
}

start();
