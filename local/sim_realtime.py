"""The simulator's realtime voice: WebRTC calls answered by a real peer (aiortc), their sideband.

Routes (added to the simulator's app by `add_routes`):

* ``POST /openai/v1/realtime/calls``: an SDP offer (multipart ``sdp`` + ``session`` with the
  resource's key, or ``application/sdp`` with an ephemeral key) answered 201 with the peer's
  SDP answer and ``Location: /v1/realtime/calls/{call_id}``. The peer receives the caller's
  audio, sends silence back, and talks events on the caller's ``oai-events`` data channel.
* ``POST /openai/v1/realtime/client_secrets``: an ephemeral key (``ek_…``) for one session.
* ``GET /openai/v1/realtime?call_id=…``: the call's sideband WebSocket (resource key). It gets
  ``session.created`` and every server event of the call; it may send ``session.update``,
  ``response.create`` and ``response.cancel``.
* ``POST /openai/v1/realtime/calls/{call_id}/hangup``: ends the call.
* ``GET /_sim/realtime``: every call (its session, audio received, responses and their usage);
  ``POST /_sim/realtime/{call_id}/drop``: closes the call's sideband sockets (not the call).

A response is made for each `turn_seconds` of audio received (server VAD's turn, by default
1 s; ``realtime_turn_seconds`` in /_sim/config), or on ``response.create``. Its usage is
Azure's shape: input tokens (text: the instructions; audio: 10 per second heard), of which the
earlier turns (input and output) are cached; output tokens (text and audio) up to max_output_tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

AUDIO_TOKENS_PER_SECOND = 10  # heard
OUTPUT_TEXT_TOKENS = 12
OUTPUT_AUDIO_TOKENS = 48
SECRET_SECONDS_DEFAULT = 600
KEEP_ENDED = 200  # ended calls whose stats /_sim/realtime still shows


@dataclass
class Call:
    id: str
    session: dict[str, Any]
    peer: Any  # RTCPeerConnection
    created: float = field(default_factory=time.time)
    channel: Any = None  # the caller's data channel
    sidebands: list[web.WebSocketResponse] = field(default_factory=list)
    audio_seconds: float = 0.0  # heard, in all
    unanswered_seconds: float = 0.0  # heard since the last response
    responses: list[dict[str, Any]] = field(default_factory=list)
    input_so_far: int = 0  # what later turns find cached
    audio_so_far: int = 0  # of which audio
    ended: str = ""  # why, once ended
    tasks: set[asyncio.Task] = field(default_factory=set)
    events: int = 0

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session": self.session,
            "audio_seconds": round(self.audio_seconds, 3),
            "responses": [
                {"id": r["id"], "status": r["status"], "usage": r["usage"]} for r in self.responses
            ],
            "sidebands": len(self.sidebands),
            "ended": self.ended,
            "data_channel": self.channel is not None,
        }


class Realtime:
    """The simulated resource's realtime calls and ephemeral keys."""

    def __init__(self, api_key: str, config: Any) -> None:
        self.api_key = api_key
        self.config = config  # () -> the simulator's /_sim/config
        self.calls: dict[str, Call] = {}
        self.secrets: dict[str, tuple[float, dict[str, Any]]] = {}

    # --- auth ---------------------------------------------------------------------------------

    def key_ok(self, request: web.Request) -> bool:
        key = request.headers.get("api-key")
        bearer = request.headers.get("authorization", "").partition(" ")[2].strip()
        return key == self.api_key or bearer == self.api_key or bearer.startswith("sim-token-")

    def secret_session(self, request: web.Request) -> dict[str, Any] | None:
        bearer = request.headers.get("authorization", "").partition(" ")[2].strip()
        found = self.secrets.get(bearer)
        if found is None or found[0] < time.time():
            return None
        return found[1]

    # --- routes -------------------------------------------------------------------------------

    async def create_call(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        session: dict[str, Any] | None
        if content_type == "multipart/form-data":
            if not self.key_ok(request):
                return _error(401, "invalid_api_key", "Access denied due to invalid key.")
            form = await request.post()
            sdp = _text(form.get("sdp"))
            try:
                session = json.loads(_text(form.get("session")) or "{}")
            except ValueError:
                return _error(400, "invalid_request_error", "session is not JSON")
        elif content_type == "application/sdp":
            session = self.secret_session(request)
            if session is None:
                return _error(401, "invalid_api_key", "An ephemeral key is required.")
            sdp = await request.text()
        else:
            return _error(400, "invalid_request_error", "Send application/sdp or a form.")
        if not isinstance(session, dict) or not session.get("model"):
            return _error(400, "invalid_request_error", "session.model is required")
        if not sdp.startswith("v=0"):
            return _error(400, "invalid_offer", "The SDP offer is not valid.")
        try:
            call = await self.answer(sdp, session)
        except Exception as error:  # aiortc refuses offers it cannot answer
            return _error(400, "invalid_offer", f"The SDP offer cannot be answered: {error}")
        return web.Response(
            status=201,
            text=call.peer.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/v1/realtime/calls/{call.id}"},
        )

    async def answer(self, sdp: str, session: dict[str, Any]) -> Call:
        from aiortc import RTCPeerConnection, RTCSessionDescription
        from aiortc.mediastreams import AudioStreamTrack

        peer = RTCPeerConnection()
        call = Call(id=f"rtc_{secrets.token_hex(16)}", session=_session(session), peer=peer)
        ended = [c for c in self.calls if self.calls[c].ended]
        for old in ended[: max(0, len(ended) - KEEP_ENDED)]:
            del self.calls[old]  # the oldest ended calls' stats
        self.calls[call.id] = call

        @peer.on("datachannel")
        def _channel(channel: Any) -> None:
            call.channel = channel

            @channel.on("open")
            def _open() -> None:
                self.emit(call, {"type": "session.created", "session": call.session})

            @channel.on("message")
            def _message(message: Any) -> None:
                self.client_event(call, message)

            if channel.readyState == "open":
                _open()

        @peer.on("track")
        def _track(track: Any) -> None:
            if track.kind == "audio":
                task = asyncio.create_task(self.hear(call, track))
                call.tasks.add(task)
                task.add_done_callback(call.tasks.discard)

        @peer.on("connectionstatechange")
        async def _state() -> None:
            if peer.connectionState in ("failed", "closed") and not call.ended:
                await self.end(call, peer.connectionState)

        await peer.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        for transceiver in peer.getTransceivers():
            if transceiver.kind == "audio":
                peer.addTrack(AudioStreamTrack())
                break
        await peer.setLocalDescription(await peer.createAnswer())
        return call

    async def hear(self, call: Call, track: Any) -> None:
        with contextlib.suppress(Exception):
            while not call.ended:
                frame = await track.recv()
                seconds = frame.samples / frame.sample_rate
                call.audio_seconds += seconds
                call.unanswered_seconds += seconds
                turn = float(self.config().get("realtime_turn_seconds") or 1.0)
                if call.unanswered_seconds >= turn:
                    self.respond(call)

    async def client_secret(self, request: web.Request) -> web.Response:
        if not self.key_ok(request):
            return _error(401, "invalid_api_key", "Access denied due to invalid key.")
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("session"), dict):
            return _error(400, "invalid_request_error", "session is required")
        if not body["session"].get("model"):
            return _error(400, "invalid_request_error", "session.model is required")
        seconds = (body.get("expires_after") or {}).get("seconds", SECRET_SECONDS_DEFAULT)
        if not isinstance(seconds, int) or not 10 <= seconds <= 7200:
            return _error(400, "invalid_request_error", "expires_after.seconds: 10 to 7200")
        value = f"ek_{secrets.token_hex(16)}"
        now = time.time()
        self.secrets = {k: v for k, v in self.secrets.items() if v[0] > now}
        expires = now + seconds
        session = _session(body["session"])
        self.secrets[value] = (expires, session)
        return web.json_response({"value": value, "expires_at": int(expires), "session": session})

    async def sideband(self, request: web.Request) -> web.StreamResponse:
        if not self.key_ok(request):
            return _error(401, "invalid_api_key", "Access denied due to invalid key.")
        call = self.calls.get(request.query.get("call_id", ""))
        if call is None or call.ended:
            return _error(404, "call_id_not_found", "No session found for the provided call_id")
        socket = web.WebSocketResponse(heartbeat=20)
        await socket.prepare(request)
        call.sidebands.append(socket)
        await socket.send_str(_event(call, {"type": "session.created", "session": call.session}))
        try:
            async for message in socket:
                if message.type == WSMsgType.TEXT:
                    self.client_event(call, message.data)
        finally:
            if socket in call.sidebands:
                call.sidebands.remove(socket)
        return socket

    async def hangup(self, request: web.Request) -> web.Response:
        if not self.key_ok(request):
            return _error(401, "invalid_api_key", "Access denied due to invalid key.")
        call = self.calls.get(request.match_info["call_id"])
        if call is None:
            return _error(404, "call_id_not_found", "No session found for the provided call_id")
        if not call.ended:
            await self.end(call, "hangup")
        return web.Response(status=200)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": [c.view() for c in self.calls.values()]})

    async def drop(self, request: web.Request) -> web.Response:
        call = self.calls.get(request.match_info["call_id"])
        if call is None:
            return _error(404, "call_id_not_found", "No such call")
        for socket in list(call.sidebands):
            await socket.close()
        return web.json_response({"dropped": True})

    # --- the session --------------------------------------------------------------------------

    def client_event(self, call: Call, text: Any) -> None:
        try:
            event = json.loads(text)
        except (TypeError, ValueError):
            event = None
        if not isinstance(event, dict):
            self.emit(call, _error_event("invalid_request_error", "The event is not JSON."))
            return
        kind = event.get("type")
        if kind == "session.update" and isinstance(event.get("session"), dict):
            update = {k: v for k, v in event["session"].items() if k not in ("model", "type")}
            call.session.update(update)
            self.emit(call, {"type": "session.updated", "session": call.session})
        elif kind == "response.create":
            self.respond(call, event.get("response") or {})
        elif kind == "response.cancel":
            pass  # every response is done at once here
        elif kind == "conversation.item.create":
            item = event.get("item") or {}
            self.emit(call, {"type": "conversation.item.created", "item": item})
        else:
            self.emit(call, _error_event("invalid_request_error", f"Unknown event {kind!r}."))

    def respond(self, call: Call, asked: dict[str, Any] | None = None) -> None:
        """One response: its events, and its usage in response.done."""
        if call.ended:
            return
        asked = asked or {}
        limit = asked.get("max_output_tokens", call.session.get("max_output_tokens", "inf"))
        heard = int(call.unanswered_seconds * AUDIO_TOKENS_PER_SECOND)
        call.unanswered_seconds = 0.0
        text_in = max(1, len(str(call.session.get("instructions") or "")) // 4)
        input_tokens = text_in + heard + call.input_so_far
        cached, cached_audio = call.input_so_far, call.audio_so_far  # the earlier turns
        text_out, audio_out = OUTPUT_TEXT_TOKENS, OUTPUT_AUDIO_TOKENS
        status, details = "completed", None
        if isinstance(limit, int) and text_out + audio_out > limit:
            text_out = min(text_out, limit)
            audio_out = limit - text_out
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        output_tokens = text_out + audio_out
        call.input_so_far = input_tokens + output_tokens
        call.audio_so_far += heard + audio_out
        audio_in = heard + cached_audio
        usage = {
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_token_details": {
                "text_tokens": input_tokens - audio_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached,
                "cached_tokens_details": {
                    "text_tokens": cached - cached_audio,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }
        response_id = f"resp_{secrets.token_hex(12)}"
        response = {
            "object": "realtime.response",
            "id": response_id,
            "status": status,
            "status_details": details,
            "output": [
                {
                    "id": f"item_{secrets.token_hex(8)}",
                    "type": "message",
                    "role": "assistant",
                    "status": status,
                    "content": [{"type": "output_audio", "transcript": "Simulated answer."}],
                }
            ],
            "conversation_id": f"conv_{call.id[4:20]}",
            "output_modalities": ["audio"],
            "max_output_tokens": limit,
            "usage": usage,
        }
        call.responses.append({"id": response_id, "status": status, "usage": usage})
        self.emit(call, {"type": "response.created", "response": {**response, "usage": None}})
        self.emit(
            call,
            {"type": "response.output_audio_transcript.done", "response_id": response_id,
             "transcript": "Simulated answer."},
        )  # fmt: skip
        self.emit(call, {"type": "response.done", "response": response})

    def emit(self, call: Call, event: dict[str, Any]) -> None:
        """A server event, to the caller's data channel and every sideband."""
        text = _event(call, event)
        channel = call.channel
        if channel is not None and channel.readyState == "open":
            with contextlib.suppress(Exception):
                channel.send(text)
        for socket in list(call.sidebands):
            if not socket.closed:
                task = asyncio.ensure_future(socket.send_str(text))
                call.tasks.add(task)
                task.add_done_callback(call.tasks.discard)

    async def end(self, call: Call, why: str) -> None:
        call.ended = why
        for socket in list(call.sidebands):
            with contextlib.suppress(Exception):
                await socket.close()
        with contextlib.suppress(Exception):
            await call.peer.close()

    async def close(self) -> None:
        for call in list(self.calls.values()):
            if not call.ended:
                await self.end(call, "shutdown")


def _session(asked: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": f"sess_{secrets.token_hex(10)}",
        "output_modalities": ["audio"],
        "instructions": "",
        "max_output_tokens": "inf",
        "audio": {
            "output": {"voice": "alloy"},
            "input": {"turn_detection": {"type": "server_vad"}},
        },
        **asked,
    }


def _text(value: Any) -> str:
    """A form field's text (aiohttp gives bytes for a field with a content type of its own)."""
    if isinstance(value, bytes | bytearray):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _event(call: Call, event: dict[str, Any]) -> str:
    call.events += 1
    return json.dumps({"event_id": f"event_{call.events:06d}", **event})


def _error_event(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "code": kind, "message": message}}


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return web.json_response(body, status=status)


REALTIME_KEY = web.AppKey("sim_realtime", Realtime)


def add_routes(app: web.Application, api_key: str, config: Any) -> None:
    """The realtime routes on the simulator's app (before its catch-all)."""
    realtime = Realtime(api_key, config)
    app[REALTIME_KEY] = realtime
    app.router.add_post("/openai/v1/realtime/calls", realtime.create_call)
    app.router.add_post("/openai/v1/realtime/client_secrets", realtime.client_secret)
    app.router.add_get("/openai/v1/realtime", realtime.sideband)
    app.router.add_post("/openai/v1/realtime/calls/{call_id}/hangup", realtime.hangup)
    app.router.add_get("/_sim/realtime", realtime.stats)
    app.router.add_post("/_sim/realtime/{call_id}/drop", realtime.drop)

    async def _close(app: web.Application) -> None:
        await realtime.close()

    app.on_shutdown.append(_close)
