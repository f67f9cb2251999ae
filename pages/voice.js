// The playground's voice tab: a realtime call over WebRTC. The offer goes to the proxy with the
// event key (POST /openai/v1/realtime/calls), which admits and caps it and answers the
// deployment's SDP answer; the audio then flows between this browser and the deployment. The
// call's events arrive on the "oai-events" data channel: each finished answer's usage is shown,
// and the proxy's own last message ("aiproxy: call ended. …") when it ends the call.

import { $, ApiError, base, errorOf, fill, h, number, showError, showNotice } from "./common.js";

const voice = { peer: null, channel: null, stream: null, responses: 0, tokens: 0 };

function setState(text) {
  $("#voice-state").textContent = text;
}

function log(text) {
  const list = $("#voice-log");
  list.append(h("li", {}, text));
  while (list.children.length > 50) list.firstElementChild.remove();
}

/** Show the realtime deployments this key may call (from /eventinfo). */
export function showVoice(info) {
  const models = (info.deployments && info.deployments["openai-realtime"]) || [];
  fill($("#voice-model"), models.map((name) => h("option", { value: name }, name)));
  $("#tab-voice").hidden = models.length === 0;
}

function onEvent(message) {
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    return;
  }
  if (event.type === "response.done" && event.response) {
    const usage = event.response.usage || {};
    voice.responses += 1;
    voice.tokens += usage.total_tokens || 0;
    $("#voice-responses").textContent = number(voice.responses);
    $("#voice-tokens").textContent = number(voice.tokens);
    log(`answer ${voice.responses}: ${number(usage.total_tokens || 0)} tokens`);
  } else if (event.type === "conversation.item.created" && event.item) {
    const text = (event.item.content || []).map((c) => c.text || c.transcript || "").join(" ");
    if (text.startsWith("aiproxy: call ended.")) {
      showNotice($("#voice-ended"), "info", text.replace("aiproxy: ", ""));
      hangUp("ended by the proxy");
    }
  } else if (event.type === "session.created") {
    log("session started");
  } else if (event.type === "error" && event.error) {
    log(`error: ${event.error.message || event.error.code}`);
  }
}

export async function startCall(key) {
  if (voice.peer) return;
  showError($("#voice-error"), null);
  $("#voice-ended").hidden = true;
  Object.assign(voice, { responses: 0, tokens: 0 });
  $("#voice-responses").textContent = "0";
  $("#voice-tokens").textContent = "0";
  $("#voice-start").disabled = true;
  setState("connecting");
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const peer = new RTCPeerConnection();
    Object.assign(voice, { peer, stream });
    peer.ontrack = (event) => { $("#voice-audio").srcObject = event.streams[0]; };
    peer.onconnectionstatechange = () => {
      if (peer.connectionState === "connected") setState("in call");
      if (peer.connectionState === "failed") hangUp("connection failed");
    };
    for (const track of stream.getTracks()) peer.addTrack(track, stream);
    voice.channel = peer.createDataChannel("oai-events");
    voice.channel.onmessage = onEvent;
    await peer.setLocalDescription(await peer.createOffer());
    const session = { type: "realtime", model: $("#voice-model").value };
    const instructions = $("#voice-instructions").value.trim();
    if (instructions) session.instructions = instructions;
    const form = new FormData();
    form.set("sdp", peer.localDescription.sdp);
    form.set("session", JSON.stringify(session));
    let response;
    try {
      response = await fetch(`${base}/openai/v1/realtime/calls`, {
        method: "POST", body: form, headers: { "api-key": key }, cache: "no-store",
      });
    } catch (exc) {
      throw new ApiError("network", String(exc.message || exc));
    }
    if (!response.ok) throw await errorOf(response);
    const callId = (response.headers.get("location") || "").split("/").pop();
    await peer.setRemoteDescription({ type: "answer", sdp: await response.text() });
    $("#voice-stop").hidden = false;
    $("#voice-start").hidden = true;
    log(`call ${callId} set up`);
  } catch (error) {
    hangUp("");
    showError($("#voice-error"), error);
  } finally {
    $("#voice-start").disabled = false;
  }
}

export function hangUp(why = "hung up") {
  if (voice.channel) voice.channel.close();
  if (voice.peer) voice.peer.close();
  if (voice.stream) for (const track of voice.stream.getTracks()) track.stop();
  Object.assign(voice, { peer: null, channel: null, stream: null });
  $("#voice-stop").hidden = true;
  $("#voice-start").hidden = false;
  setState("idle");
  if (why) log(why);
  document.dispatchEvent(new CustomEvent("voice-call-ended")); // the event panel's numbers
}
