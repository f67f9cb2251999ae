// The attendee playground: paste a key, see the event and what is left today, chat with
// streaming (Chat completions, or the Responses API with the conversation kept upstream),
// generate images, talk to a realtime model (voice.js). The models come from the event's model list. The key is kept in
// sessionStorage only.

import {
  $, ApiError, KEY_STORAGE, badge, base, call, callJson, duration, fill, h, number, session,
  showError, windowText,
} from "./common.js";
import { hangUp, showVoice, startCall } from "./voice.js";

const API_VERSION = "2024-10-21";
const DEFAULT_MAX_TOKENS = 1024;

const state = {
  key: "",
  info: null,
  messages: [], // the conversation without the system message
  previousId: null, // Responses: the last answer's id, which carries the conversation
  controller: null,
};

// --- connecting -------------------------------------------------------------------------

/** The chat models this key may use, from the event's model list (GET /openai/v1/models). */
async function chatModels(key, info) {
  try {
    const list = await callJson("/openai/v1/models", { headers: { "api-key": key } });
    return list.data.filter((m) => m.capabilities && m.capabilities.chat_completion).map((m) => m.id);
  } catch {
    return (info.deployments && info.deployments["openai-chat"]) || [];
  }
}

async function connect(key) {
  const info = await callJson("/eventinfo", { headers: { "api-key": key } });
  const models = await chatModels(key, info);
  state.key = key;
  state.info = info;
  session.set(KEY_STORAGE, key);
  showEvent(info, true, models);
  $("#connect-view").hidden = true;
  $("#play-view").hidden = false;
  $("#forget").hidden = false;
  $("#who").textContent = info.attendee ? info.attendee.user : "";
}

function forget() {
  if (state.controller) state.controller.abort();
  hangUp("");
  session.remove(KEY_STORAGE);
  Object.assign(state, { key: "", info: null, messages: [], previousId: null });
  clearConversation();
  $("#key").value = "";
  $("#who").textContent = "";
  $("#forget").hidden = true;
  $("#play-view").hidden = true;
  $("#connect-view").hidden = false;
  $("#key").focus();
}

async function refreshInfo() {
  try {
    state.info = await callJson("/eventinfo", { headers: { "api-key": state.key } });
    showEvent(state.info, false);
  } catch {
    // The request's own error is already on screen; the panel keeps its last numbers.
  }
}

// --- the event panel --------------------------------------------------------------------

function setMeter(el, left, cap) {
  const bar = el.firstElementChild;
  const share = cap ? Math.max(0, Math.min(1, left / cap)) : 1;
  bar.style.width = `${(share * 100).toFixed(1)}%`;
  el.classList.toggle("low", share < 0.15);
}

// The key's budget: what is left of the tighter of its budgets (also updated from the
// x-aiproxy-budget-remaining header of each answer).
function showBudget(budget, left) {
  if (!budget || budget.left === null || budget.left === undefined) {
    $("#budget-facts").hidden = true;
    $("#budget-meter").hidden = true;
    return;
  }
  if (left !== undefined && left !== null) budget.left = left;
  const { attendee_budget: whole, attendee_daily_budget: daily, currency } = budget;
  // With both, what is left is of whichever is tighter now, which the answer does not name.
  $("#budget-left").textContent = whole && daily
    ? `${budget.left} ${currency} (budgets: ${whole} for the event, ${daily} a day)`
    : `${budget.left} of ${whole || daily} ${currency}${daily ? " today" : ""}`;
  const total = Math.min(...[whole, daily].filter(Boolean).map(Number));
  setMeter($("#budget-meter"), Number(budget.left), total);
  $("#budget-facts").hidden = false;
  $("#budget-meter").hidden = false;
}

function showEvent(info, first = true, models = []) {
  $("#event-name").textContent = info.name;
  fill($("#event-status"), badge(info.status));
  $("#event-window").textContent = windowText(info.starts_at_utc, info.ends_at_utc);
  $("#event-window").title = `Event time zone: ${info.time_zone}`;
  const today = info.today || {};
  $("#requests-left").textContent = `${number(today.requests_left)} of ${number(info.daily_request_cap)}`;
  setMeter($("#requests-meter"), today.requests_left, info.daily_request_cap);
  if (info.daily_token_cap) {
    $("#tokens-left").textContent = `${number(today.tokens_left)} of ${number(info.daily_token_cap)}`;
    setMeter($("#tokens-meter"), today.tokens_left, info.daily_token_cap);
    $("#tokens-meter").hidden = false;
  } else {
    $("#tokens-left").textContent = "no daily cap";
    $("#tokens-meter").hidden = true;
  }
  showBudget(info.budget);
  $("#max-cap").textContent = number(info.max_token_cap);
  const perMinute = [
    info.requests_per_minute && `${number(info.requests_per_minute)} requests`,
    info.tokens_per_minute && `${number(info.tokens_per_minute)} tokens`,
  ].filter(Boolean);
  $("#per-minute").textContent = perMinute.length ? perMinute.join(", ") : "no limit";
  $("#resets-in").textContent = today.resets_in_seconds ? duration(today.resets_in_seconds) : "—";
  if (!first) return;

  const chat = models;
  fill($("#model"), chat.map((name) => h("option", { value: name }, name)));
  $("#model").disabled = chat.length === 0;
  $("#send").disabled = chat.length === 0;
  if (chat.length === 0) {
    showError($("#chat-error"), new ApiError("", "This event has no chat models. Ask the organiser to add one."));
  }
  const maxTokens = $("#max-tokens");
  maxTokens.max = String(info.max_token_cap);
  maxTokens.value = String(Math.min(info.max_token_cap, DEFAULT_MAX_TOKENS));
  $("#max-tokens-hint").textContent = `(up to ${number(info.max_token_cap)})`;

  const images = (info.deployments && info.deployments["openai-images"]) || [];
  fill($("#image-model"), images.map((name) => h("option", { value: name }, name)));
  $("#tab-images").hidden = images.length === 0;
  showVoice(info);
  selectTab("chat");
  showTools((info.deployments && info.deployments.mcp) || []);
}

// --- MCP tools --------------------------------------------------------------------------

const MCP_PROTOCOL = "2025-06-18";

/** One JSON-RPC message to an MCP server of the event: its answer (JSON or the event stream's
 * answer to it) and the session id. */
async function mcpMessage(name, message, sessionId = "") {
  const headers = {
    authorization: `Bearer ${state.key}`, "content-type": "application/json",
    accept: "application/json, text/event-stream", "mcp-protocol-version": MCP_PROTOCOL,
  };
  if (sessionId) headers["mcp-session-id"] = sessionId;
  const response = await fetch(`${base}/mcp/${encodeURIComponent(name)}`,
    { method: "POST", headers, body: JSON.stringify(message) });
  const text = await response.text();
  let answer = null;
  if ((response.headers.get("content-type") || "").startsWith("text/event-stream")) {
    for (const event of text.split(/\r?\n\r?\n/)) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      const parsed = JSON.parse(data);
      if (parsed.id === message.id) answer = parsed;
    }
  } else if (text) {
    answer = JSON.parse(text);
  }
  if (answer && answer.error) throw new ApiError((answer.error.data || {}).code || "", answer.error.message);
  if (!response.ok) throw new ApiError("", `The MCP server answered ${response.status}.`);
  return { answer, sessionId: response.headers.get("mcp-session-id") || sessionId };
}

/** The tools of one MCP server, as tools/list shows them to this key. */
async function mcpTools(name) {
  const init = await mcpMessage(name, { jsonrpc: "2.0", id: 1, method: "initialize", params: {
    protocolVersion: MCP_PROTOCOL, capabilities: {}, clientInfo: { name: "playground", version: "1" } } });
  const sessionId = init.sessionId;
  await mcpMessage(name, { jsonrpc: "2.0", method: "notifications/initialized" }, sessionId);
  const listed = await mcpMessage(name, { jsonrpc: "2.0", id: 2, method: "tools/list", params: {} }, sessionId);
  if (sessionId) {
    fetch(`${base}/mcp/${encodeURIComponent(name)}`, { method: "DELETE", headers: {
      authorization: `Bearer ${state.key}`, "mcp-session-id": sessionId, "mcp-protocol-version": MCP_PROTOCOL } })
      .catch(() => {});
  }
  return (listed.answer && listed.answer.result && listed.answer.result.tools) || [];
}

async function showTools(servers) {
  $("#tools-card").hidden = servers.length === 0;
  fill($("#mcp-servers"), servers.map((name) => h("div", { class: "field", dataset: { server: name } },
    h("strong", {}, name),
    h("div", {}, h("code", { class: "small" }, `${location.origin}${base}/mcp/${name}`)),
    h("ul", { class: "small tools" }, h("li", { class: "muted" }, "Listing tools…")))));
  for (const name of servers) {
    const list = $(`#mcp-servers [data-server="${CSS.escape(name)}"] ul`);
    try {
      const tools = await mcpTools(name);
      fill(list, tools.length
        ? tools.map((t) => h("li", { dataset: { tool: t.name } }, h("code", {}, t.name), t.description ? ` — ${t.description}` : ""))
        : h("li", { class: "muted" }, "No tools."));
    } catch (error) {
      fill(list, h("li", { class: "muted" }, error.message || "The tools could not be listed."));
    }
  }
}

function selectTab(name) {
  for (const tab of ["chat", "images", "voice"]) {
    $(`#tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`#${tab}-panel`).hidden = tab !== name;
  }
}

// --- usage panel ---------------------------------------------------------------------------

const ms = (value) => (value === null || value === undefined ? "—"
  : value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(2)} s`);

function showUsage({ usage = null, ttft = null, latency = null }) {
  $("#usage-prompt").textContent = usage ? number(usage.prompt_tokens) : "—";
  $("#usage-completion").textContent = usage ? number(usage.completion_tokens) : "—";
  $("#usage-total").textContent = usage ? number(usage.total_tokens) : "—";
  $("#usage-ttft").textContent = ms(ttft);
  $("#usage-latency").textContent = ms(latency);
}

// --- chat ------------------------------------------------------------------------------------

function clearConversation() {
  state.messages = [];
  state.previousId = null;
  fill($("#conversation"), h("p", { class: "empty", id: "conversation-empty" },
    "Send a message to start. Answers stream in as the model writes them."));
  showError($("#chat-error"), null);
}

function bubble(role, text) {
  $("#conversation-empty")?.remove();
  const content = h("span", { class: "content" }, text);
  const el = h("div", { class: `message ${role}` },
    h("span", { class: "role" }, role === "user" ? "You" : "Assistant"), content);
  $("#conversation").append(el);
  el.scrollIntoView({ block: "end" });
  return { el, content };
}

function boundedMaxTokens() {
  const cap = state.info.max_token_cap;
  let value = Number.parseInt($("#max-tokens").value, 10);
  if (!Number.isFinite(value) || value < 1) value = Math.min(cap, DEFAULT_MAX_TOKENS);
  value = Math.min(value, cap);
  $("#max-tokens").value = String(value);
  return value;
}

function chatBody() {
  const system = $("#system").value.trim();
  return {
    messages: [...(system ? [{ role: "system", content: system }] : []), ...state.messages],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: boundedMaxTokens(),
    temperature: Number($("#temperature").value),
    top_p: Number($("#top-p").value),
  };
}

/** The server-sent events of a response, one parsed `data:` payload at a time. */
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
    if (done) return;
  }
}

/** The request of one turn: Chat completions, or the Responses API on its v1 path. */
function turnRequest(model, text) {
  const headers = { "api-key": state.key };
  if ($("#api").value !== "responses") {
    return [`/openai/deployments/${encodeURIComponent(model)}/chat/completions?api-version=${API_VERSION}`,
      { method: "POST", headers, body: chatBody() }];
  }
  const system = $("#system").value.trim();
  const body = {
    model,
    input: text,
    stream: true,
    max_output_tokens: boundedMaxTokens(),
    temperature: Number($("#temperature").value),
    top_p: Number($("#top-p").value),
    ...(system ? { instructions: system } : {}),
    ...(state.previousId ? { previous_response_id: state.previousId } : {}),
  };
  return ["/openai/v1/responses", { method: "POST", headers, body }];
}

/** What one event of either stream says: text, usage, an error, the response's id. */
function readEvent(chunk) {
  if (chunk.type === "error" || (chunk.error && !chunk.type)) {
    const error = chunk.error || chunk;
    return { error: new ApiError(error.code || "upstream_error", error.message || "", error.status || 0) };
  }
  if (chunk.type) { // the Responses API
    if (chunk.type === "response.output_text.delta") return { delta: chunk.delta };
    if (chunk.type === "response.completed" || chunk.type === "response.incomplete") {
      const u = chunk.response.usage;
      return {
        id: chunk.response.id,
        usage: u && { prompt_tokens: u.input_tokens, completion_tokens: u.output_tokens, total_tokens: u.total_tokens },
      };
    }
    return {};
  }
  const choice = chunk.choices && chunk.choices[0];
  return {
    usage: chunk.usage,
    delta: choice && choice.delta && choice.delta.content,
    filtered: choice && choice.finish_reason === "content_filter",
  };
}

async function send(text) {
  const model = $("#model").value;
  showError($("#chat-error"), null);
  state.messages.push({ role: "user", content: text });
  const asked = bubble("user", text);
  const answer = bubble("assistant", "");
  answer.el.classList.add("streaming");
  setBusy(true);
  state.controller = new AbortController();
  const started = performance.now();
  let ttft = null, usage = null, received = "";
  try {
    const [path, options] = turnRequest(model, text);
    const response = await call(path, { ...options, signal: state.controller.signal });
    const left = response.headers.get("x-aiproxy-budget-remaining");
    if (left !== null && state.info) showBudget(state.info.budget, left);
    let answerId = null;
    for await (const chunk of events(response)) {
      const { error, usage: used, delta, filtered, id } = readEvent(chunk);
      if (error) throw error;
      if (used) usage = used;
      if (id) answerId = id;
      if (delta) {
        if (ttft === null) ttft = performance.now() - started;
        received += delta;
        answer.content.textContent = received;
        answer.el.scrollIntoView({ block: "end" });
      }
      if (filtered) {
        showError($("#chat-error"), new ApiError("content_filter", "The answer was cut by the content filter."));
      }
    }
    if (answerId) state.previousId = answerId;
    state.messages.push({ role: "assistant", content: received });
    showUsage({ usage, ttft, latency: performance.now() - started });
  } catch (error) {
    if (error.name === "AbortError") {
      if (received) state.messages.push({ role: "assistant", content: received });
      else { state.messages.pop(); asked.el.remove(); answer.el.remove(); $("#prompt").value = text; }
    } else if (received) {
      // Cut mid-answer: keep what arrived, say why.
      state.messages.push({ role: "assistant", content: received });
      showError($("#chat-error"), error);
    } else {
      // Nothing arrived: take the question back so it can be sent again.
      state.messages.pop();
      asked.el.remove();
      answer.el.remove();
      $("#prompt").value = text;
      showError($("#chat-error"), error);
    }
  } finally {
    answer.el.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
    refreshInfo();
  }
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").hidden = !busy;
  $("#clear").disabled = busy;
}

// --- images -----------------------------------------------------------------------------------

async function generate() {
  const model = $("#image-model").value;
  const prompt = $("#image-prompt").value.trim();
  if (!prompt) return;
  showError($("#image-error"), null);
  $("#generate").disabled = true;
  $("#generate").textContent = "Generating…";
  const started = performance.now();
  try {
    const answer = await callJson(
      `/openai/deployments/${encodeURIComponent(model)}/images/generations?api-version=${API_VERSION}`,
      {
        method: "POST",
        headers: { "api-key": state.key },
        body: { prompt, n: 1, size: $("#image-size").value, response_format: "b64_json" },
      },
    );
    const picture = answer.data && answer.data[0];
    if (!picture || !picture.b64_json) throw new ApiError("upstream_error", "The answer held no picture.");
    $("#image").src = `data:image/png;base64,${picture.b64_json}`;
    $("#image-caption").textContent = picture.revised_prompt || prompt;
    $("#image-result").hidden = false;
    showUsage({ latency: performance.now() - started });
  } catch (error) {
    showError($("#image-error"), error);
  } finally {
    $("#generate").disabled = false;
    $("#generate").textContent = "Generate";
    refreshInfo();
  }
}

// --- wiring --------------------------------------------------------------------------------------

$("#connect-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("#key").value.trim();
  if (!key) return;
  $("#connect").disabled = true;
  showError($("#connect-error"), null);
  try {
    await connect(key);
  } catch (error) {
    showError($("#connect-error"), error);
  } finally {
    $("#connect").disabled = false;
  }
});
$("#forget").addEventListener("click", forget);
$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || state.controller) return;
  $("#prompt").value = "";
  send(text);
});
$("#prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("#composer").requestSubmit();
  }
});
$("#stop").addEventListener("click", () => state.controller && state.controller.abort());
$("#clear").addEventListener("click", clearConversation);
$("#api").addEventListener("change", clearConversation); // each API keeps its own conversation
$("#max-tokens").addEventListener("change", boundedMaxTokens);
for (const [input, output] of [["#temperature", "#temperature-value"], ["#top-p", "#top-p-value"]]) {
  $(input).addEventListener("input", () => { $(output).textContent = $(input).value; });
}
$("#tab-chat").addEventListener("click", () => selectTab("chat"));
$("#tab-images").addEventListener("click", () => selectTab("images"));
$("#tab-voice").addEventListener("click", () => selectTab("voice"));
$("#voice-start").addEventListener("click", () => startCall(state.key));
$("#voice-stop").addEventListener("click", () => hangUp());
document.addEventListener("voice-call-ended", () => { if (state.key) refreshInfo(); });
$("#image-form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });

const remembered = session.get(KEY_STORAGE);
if (remembered) {
  $("#key").value = remembered;
  connect(remembered).catch((error) => showError($("#connect-error"), error));
}
