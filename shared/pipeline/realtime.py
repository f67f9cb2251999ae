"""Realtime voice over WebRTC: the call's setup relayed, its session capped.

A browser (or an SDK) posts its SDP offer to the proxy with its event key; the call is admitted
like any other (window, caps, limits), its session capped (the output tokens per response by
the event's `max_token_cap`), and sent to a realtime deployment of the event's catalog with the
resource's credential. The SDP answer comes back with the call's id in `Location`; the media
then flows between the browser and Azure, never through the proxy. The call's setup is
recorded (one session); what the session uses is metered through the call's sideband
(sideband.py): the SDP answer goes back only once the metering has joined it.

Ephemeral client secrets are admitted and capped the same way, with a short lifetime; the
calls a browser makes with one go straight to the deployment, so only their setup is counted.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from shared.directory.catalog import Resource, valid_deployment_name
from shared.directory.events import Event
from shared.errors import ProxyError
from shared.pipeline import sideband
from shared.pipeline.bodies import parse_json_body, read_body
from shared.pipeline.call import ProxyCall, form_field
from shared.pipeline.forwarding import Forwarder, UpstreamRequest
from shared.pipeline.kinds import (
    REALTIME_CALLS,
    REALTIME_CLIENT_SECRETS,
    CallKind,
    apply_token_cap,
    find_pool,
)
from shared.runtime import get_runtime
from shared.upstreams.client import UpstreamAnswer

log = logging.getLogger(__name__)

# What Azure takes as a response's max_output_tokens (an integer up to this, or "inf").
MAX_OUTPUT_TOKENS = 4096
# The longest an ephemeral client secret lives; a caller may ask for less.
CLIENT_SECRET_SECONDS = 60
# The header naming where a client secret's holder posts its SDP offer.
CALLS_URL_HEADER = "x-aiproxy-realtime-calls-url"
SDP = "application/sdp"
# What a call id may be (Azure's are rtc_ and hex).
CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# The most of an SDP offer the proxy takes (a browser's is a few KiB).
MAX_SDP_BYTES = 64 * 1024


@dataclass
class RealtimeUpstream(UpstreamRequest):
    """A realtime request: its session names each member's own deployment in `model`."""

    session: dict[str, Any] = field(default_factory=dict)
    sdp: str = ""  # the call's offer; empty for a client secret
    others: dict[str, Any] = field(default_factory=dict)  # a client secret's other fields

    def session_for(self, resource: Resource) -> dict[str, Any]:
        return {**self.session, "model": resource.upstream_deployment}

    def body_for(self, resource: Resource) -> bytes:
        session = orjson.dumps(self.session_for(resource))
        if not self.sdp:
            return orjson.dumps({**self.others, "session": orjson.loads(session)})
        boundary = self.content_type.partition("boundary=")[2] if self.content_type else ""
        sdp = self.sdp if self.sdp.endswith("\r\n") else self.sdp + "\r\n"
        return b"".join(
            (
                f"--{boundary}\r\n".encode(),
                b'Content-Disposition: form-data; name="sdp"\r\n',
                b"Content-Type: application/sdp\r\n\r\n",
                sdp.encode(),
                f"\r\n--{boundary}\r\n".encode(),
                b'Content-Disposition: form-data; name="session"\r\n',
                b"Content-Type: application/json\r\n\r\n",
                session,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )


def cap_session(session: Any, token_cap: int) -> dict[str, Any]:
    """The session as the caller asked for it, within the event's cap on output tokens."""
    if not isinstance(session, dict):
        raise ProxyError(
            "invalid_request",
            "Field 'session' must be a JSON object such as "
            '{"type": "realtime", "model": "<deployment>"}.',
            param="session",
        )
    kind = session.get("type", "realtime")
    if kind != "realtime":
        raise ProxyError(
            "invalid_request",
            "Only realtime sessions are relayed: send 'session.type' as \"realtime\".",
            param="session.type",
        )
    session = {**session, "type": "realtime"}
    if session.get("max_output_tokens") == "inf":
        del session["max_output_tokens"]  # unlimited: the cap instead
    apply_token_cap(
        session, min(token_cap, MAX_OUTPUT_TOKENS), "max_output_tokens", ("max_output_tokens",)
    )
    return session


def deployment_of(session: dict[str, Any], query_model: str | None) -> str:
    model = session.get("model", query_model)
    if not isinstance(model, str) or not model:
        raise ProxyError(
            "invalid_request",
            "Name the realtime deployment: as 'session.model', or as ?model= with an "
            "application/sdp body.",
            param="model",
        )
    if not valid_deployment_name(model):
        raise ProxyError(
            "deployment_not_found",
            "Deployment names hold letters, digits, '.', '_' and '-' (at most 64).",
        )
    return model


class RealtimeCall(ProxyCall):
    """One realtime call's setup (or client secret): the steps of any call, on a session."""

    def __init__(self, request: Request, kind: CallKind) -> None:
        super().__init__(request, kind, get_runtime())
        self.upstream = self.ledger.upstream = RealtimeUpstream()
        self.call_id = ""
        self.expires_after = 0  # a client secret's lifetime, seconds

    async def setup(self) -> Response:
        """A call: the offer in, the SDP answer out with the call's id in Location."""
        event = await self.arrive()
        offer, session = await self.read_offer()
        await self.prepare(event, session)
        await self.ledger.admit(event, len(offer), self.upstream.session["max_output_tokens"])
        answer = await self.dispatch(False)
        content = await self.read_answer(answer, False)
        location = answer.headers.get("location", "")
        call_id = location.rstrip("/").rpartition("/")[2]
        if not CALL_ID.fullmatch(call_id):
            call_id = ""  # never put into a header or a URL
        if answer.status not in (200, 201) or not call_id:
            return self.failed(answer, content)
        self.call_id = call_id
        await self.metered(event, call_id)
        # The setup counts as one session; its tokens come from the sideband's metering.
        self.ledger.record(
            answer.status, (0, 0, 0), streamed=False, estimated=False, outcome="ok", units=1
        )
        headers = self.answer_headers(answer)
        headers["location"] = f"{self.request.url.path.rstrip('/')}/{call_id}"
        return Response(content, answer.status, headers, media_type=SDP)

    async def client_secret(self) -> Response:
        """An ephemeral key for a realtime session, capped, living briefly: only where the
        event allows them (its sessions go straight to the deployment, unmetered)."""
        event = await self.arrive()
        if not event.realtime_client_secrets:
            raise ProxyError(
                "forbidden",
                f"Event '{event.name}' gives no ephemeral realtime keys: their sessions would "
                "bypass its caps and metering. Start the call through the proxy instead (POST "
                "/openai/v1/realtime/calls with your key, the SDP offer as application/sdp), or "
                "ask the organiser to turn on realtime_client_secrets.",
            )
        body = await read_body(self.request, self.runtime.settings.max_body_bytes)
        payload = parse_json_body(body, self.request.headers.get("content-type"))
        upstream = self.upstream
        assert isinstance(upstream, RealtimeUpstream)
        upstream.others = {"expires_after": self.lifetime(payload.get("expires_after"))}
        await self.prepare(event, payload.get("session", {}))
        await self.ledger.admit(event, len(body), upstream.session["max_output_tokens"])
        answer = await self.dispatch(False)
        content = await self.read_answer(answer, False)
        if answer.status != 200:
            return self.failed(answer, content)
        try:
            secret = orjson.loads(content)
        except orjson.JSONDecodeError:
            secret = None
        if not isinstance(secret, dict) or not isinstance(secret.get("value"), str):
            self.ledger.record_failure(502, "upstream_error", streamed=False)
            raise ProxyError(
                "upstream_error", "The deployment answered with something that is not a secret."
            )
        if isinstance(secret.get("session"), dict):
            secret["session"]["model"] = upstream.deployment  # the event's name for it
        self.ledger.record(200, (0, 0, 0), streamed=False, estimated=False, outcome="ok", units=1)
        headers = self.answer_headers(answer)
        member = upstream.member
        assert member is not None
        headers[CALLS_URL_HEADER] = f"{member.endpoint}/openai/v1/realtime/calls"
        return Response(orjson.dumps(secret), 200, headers, media_type="application/json")

    # --- what the steps use -------------------------------------------------------------------

    async def metered(self, event: Event, call_id: str) -> None:
        """The call handed to its metering, which has joined its sideband; otherwise the call
        is hung up before any media flows, and refused."""
        upstream, access = self.upstream, self.access
        assert upstream.member is not None and access is not None
        ticket = sideband.ticket_of(
            call_id, event, access.attendee.id, upstream.member, upstream.deployment,
            self.request_id,
        )  # fmt: skip
        try:
            await sideband.enqueue(self.runtime, ticket)
            within = self.runtime.settings.realtime_attach_seconds
            if await sideband.attached(self.runtime, ticket, within):
                return
        except Exception as error:  # storage away: the call cannot be metered
            log.error("realtime %s: not handed to its metering: %s", call_id, error)
        await self.hang_up(call_id)
        raise ProxyError(
            "storage_unavailable",
            "The call could not be metered, so it was ended before it started. Retry in a few "
            "seconds.",
            retry_after=5,
        )

    async def hang_up(self, call_id: str) -> None:
        member = self.upstream.member
        assert member is not None
        headers = await Forwarder(self.runtime).headers(member)
        url = f"{member.endpoint}/openai/v1/realtime/calls/{call_id}/hangup"
        try:
            answer = await self.runtime.upstream.send("POST", url, headers, b"")
            answer.close()
        except Exception as error:  # the call ends by itself when no media comes
            log.warning("realtime %s: hangup: %s", call_id, error)

    async def read_offer(self) -> tuple[bytes, Any]:
        """The SDP offer and the session asked for: an application/sdp body (the deployment
        in ?model=), or a multipart form with `sdp` and `session` (JSON) fields."""
        limit = min(self.runtime.settings.max_body_bytes, MAX_SDP_BYTES)
        body = await read_body(self.request, limit)
        content_type = self.request.headers.get("content-type") or ""  # the boundary's case
        kind = content_type.lower()
        query_model = self.request.query_params.get("model")
        if kind.startswith(SDP):
            offer, session = body, {"model": query_model} if query_model else {}
        elif kind.startswith("multipart/form-data"):
            offer = form_field(body, content_type, "sdp").encode()
            text = form_field(body, content_type, "session")
            try:
                session = orjson.loads(text) if text else {}
            except orjson.JSONDecodeError:
                raise ProxyError(
                    "invalid_request", "The 'session' field is not valid JSON.", param="session"
                ) from None
            if query_model and isinstance(session, dict):
                session.setdefault("model", query_model)
        else:
            raise ProxyError(
                "invalid_request",
                "Send the SDP offer as application/sdp, or as multipart/form-data with 'sdp' "
                "and 'session' fields.",
            )
        try:
            sdp = offer.decode()
        except UnicodeDecodeError:
            sdp = ""
        if not sdp.lstrip().startswith("v=0"):
            raise ProxyError(
                "invalid_request",
                "The SDP offer is missing or not an SDP offer (it starts with 'v=0'): send "
                "your peer connection's localDescription.sdp.",
                param="sdp",
            )
        upstream = self.upstream
        assert isinstance(upstream, RealtimeUpstream)
        upstream.sdp = sdp
        upstream.content_type = f"multipart/form-data; boundary=aiproxy{secrets.token_hex(12)}"
        return body, session

    async def prepare(self, event: Any, session: Any) -> None:
        """The session capped, its deployment and pool found, the plugins' screening, and the
        upstream request filled in."""
        upstream = self.upstream
        assert isinstance(upstream, RealtimeUpstream) and self.access is not None
        if not isinstance(session, dict):
            cap_session(session, event.max_token_cap)  # refuses it
        upstream.deployment = deployment_of(session, None)
        self.pools = await self.runtime.directory.pools(self.access.event.id)
        upstream.members = find_pool(self.pools, upstream.deployment, self.kind.model_class)
        if self.runtime.plugins.requests:
            screened = await self.screen(session)
            if screened is not None:
                session = screened[0]
        upstream.session = cap_session(session, event.max_token_cap)
        upstream.session.pop("model", None)
        upstream.path = self.kind.upstream_path
        upstream.query = ""
        upstream.payload = None

    def lifetime(self, asked: Any) -> dict[str, Any]:
        """A client secret's `expires_after`, at most CLIENT_SECRET_SECONDS."""
        seconds = CLIENT_SECRET_SECONDS
        if asked is not None:
            wanted = asked.get("seconds") if isinstance(asked, dict) else None
            if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 10:
                raise ProxyError(
                    "invalid_request",
                    '\'expires_after\' takes {"anchor": "created_at", "seconds": N} with N '
                    f"from 10 to {CLIENT_SECRET_SECONDS}.",
                    param="expires_after",
                )
            seconds = min(wanted, CLIENT_SECRET_SECONDS)
        self.expires_after = seconds
        return {"anchor": "created_at", "seconds": seconds}

    def failed(self, answer: UpstreamAnswer, content: bytes) -> Response:
        """The deployment refused (or answered without a call id): its answer, recorded."""
        if answer.status < 400:
            self.ledger.record_failure(502, "upstream_error", streamed=False)
            raise ProxyError(
                "upstream_error", "The deployment answered the call without a call id."
            )
        self.ledger.record(
            answer.status, (0, 0, 0), streamed=False, estimated=False, outcome="upstream_status"
        )
        media_type = answer.headers.get("content-type")
        return Response(content, answer.status, self.answer_headers(answer), media_type=media_type)


async def realtime_call(request: Request) -> Response:
    """POST openai/v1/realtime/calls: an SDP offer in, the SDP answer out."""
    call = RealtimeCall(request, REALTIME_CALLS)
    return await call.answer(call.setup)


async def realtime_client_secret(request: Request) -> Response:
    """POST openai/v1/realtime/client_secrets: a short-lived key for one realtime session."""
    call = RealtimeCall(request, REALTIME_CLIENT_SECRETS)
    return await call.answer(call.client_secret)
