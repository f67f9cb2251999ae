"""The call's lifecycle: one proxied request from its arrival to its usage record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response

from shared.access.entra import EVENT_HEADER
from shared.access.guard import client_address
from shared.directory.catalog import Resource, valid_deployment_name
from shared.directory.events import Event
from shared.directory.keys import key_from_headers
from shared.errors import ProxyError
from shared.governance import tokens
from shared.governance.caps import Counter
from shared.governance.ratelimits import Admission
from shared.governance.usage import UsageRecord
from shared.pipeline.answers import REQUEST_ID_HEADER, error_response, new_request_id
from shared.pipeline.bodies import CallerGone, parse_json_body, read_body
from shared.pipeline.forwarding import Forwarder
from shared.pipeline.operations import (
    SEARCH_API_VERSION,
    TOKEN_CLASSES,
    Operation,
    apply_token_cap,
    find_pool,
    reasoning_of,
    supports_stream_options,
    units_of,
    usage_numbers,
)
from shared.pipeline.relays import relay_bytes, relay_events
from shared.pipeline.streaming import EventStreamResponse
from shared.platform import clock, telemetry
from shared.plugins import RequestContext, Screened
from shared.runtime import Access, Runtime, get_runtime
from shared.upstreams.client import UpstreamAnswer, UpstreamTimeout, UpstreamUnreachable

# Never passed upstream: the api-version is set explicitly, and a key or function code put in
# the query string by mistake must not travel further.
NOT_FORWARDED_QUERY = frozenset({"api-version", "api-key", "key", "code", "subscription-key"})


class Call:
    """One proxied request, from its arrival to its usage record."""

    metered = True  # calls that use no model (by id) neither take from the caps nor record

    def __init__(self, request: Request, operation: Operation, runtime: Runtime) -> None:
        self.request = request
        self.operation = operation
        self.runtime = runtime
        self.request_id = new_request_id()
        self.started = time.perf_counter()
        self.access: Access | None = None
        self.counter: Counter | None = None
        self.worst_case_tokens = 0
        self.deployment = ""
        self.admission: Admission | None = None  # its place in the per-minute counts

    # --- the steps every call takes ------------------------------------------------------------

    async def arrive(self) -> Event:
        """Who is calling, for which event; refused outside the event's window."""
        headers = self.request.headers
        self.access = await self.runtime.access(
            key_from_headers(headers.get("api-key"), headers.get("authorization")),
            client_address(headers, self.request.client),
            headers.get(EVENT_HEADER),
        )
        event = self.access.event
        event.check_open(clock.now())
        return event

    def deployment_of(self, payload: dict[str, Any], deployment: str | None) -> str:
        """The deployment the path names, or else the body's `model`."""
        if deployment is None:
            model = payload.get("model")
            if not isinstance(model, str) or not model:
                raise ProxyError(
                    "invalid_request",
                    "Field 'model' is required: name one of the event's deployments.",
                    param="model",
                )
            deployment = model
        if not valid_deployment_name(deployment):
            raise ProxyError(
                "deployment_not_found",
                "Deployment names hold letters, digits, '.', '_' and '-' (at most 64).",
            )
        self.deployment = deployment
        return deployment

    async def screen(self, payload: dict[str, Any]) -> Screened | None:
        """The plugins' request hooks on the caller's body: None, or the body (and its JSON)
        to go on with as if the caller had sent it (checked, capped, counted and forwarded).
        Raises their refusals, and the failures of hooks that are not fail_open, as ProxyError."""
        assert self.access is not None
        attendee = self.access.attendee
        context = RequestContext(
            request_id=self.request_id,
            event_id=attendee.event_id,
            attendee_id=attendee.id,
            user=attendee.user,
            operation=self.operation.path,
            model_class=self.operation.model_class,
            deployment=self.deployment,
        )
        return await self.runtime.plugins.screen(context, payload)

    async def admit(self, event: Event, body: bytes, limit: Any, members: list[Resource]) -> None:
        """Take one request from today's cap and this minute's limits (and the pool's fair
        share near its quota), reserving the call's worst case in tokens."""
        assert self.access is not None
        if event.daily_token_cap or self.operation.model_class in TOKEN_CLASSES:
            # A cheap worst case (about 4 bytes a token): no tokenizer on the request path.
            self.worst_case_tokens = len(body) // 4 + (limit if isinstance(limit, int) else 0)
        self.counter = await self.runtime.caps.admit(
            event, self.access.attendee.id, clock.now(), self.worst_case_tokens
        )
        self.admission = self.runtime.limits.admit(
            event, self.access.attendee.id, self.counter, self.deployment, members,
            self.worst_case_tokens,
        )  # fmt: skip

    async def forward(
        self,
        event: Event,
        members: list[Resource],
        url_of: Callable[[Resource], str],
        body: bytes,
        content_type: str | None = None,
        *,
        body_of: Callable[[Resource], bytes] | None = None,
        method: str = "POST",
        streamed: bool = False,
    ) -> tuple[Resource, UpstreamAnswer]:
        """The first member's answer that is not a failure; failures are recorded."""
        try:
            return await Forwarder(self.runtime).send(
                event.id, self.deployment, members, url_of, body, content_type,
                body_of=body_of, method=method,
            )  # fmt: skip
        except ProxyError as error:
            if error.code == "no_capacity" and self.admission is not None:
                self.admission.cancel()  # nothing reached a deployment: it uses no quota
                self.admission = None
            if self.metered and error.code in ("upstream_error", "upstream_timeout", "no_capacity"):
                self.record_failure(None, error.status, error.code, streamed=streamed)
            raise

    def upstream_query(self, api_version: str | None) -> str:
        """The caller's query string without secrets, with this api-version (None: without)."""
        params = [
            (k, v)
            for k, v in self.request.query_params.multi_items()
            if k.lower() not in NOT_FORWARDED_QUERY
        ]
        if api_version:
            params.append(("api-version", api_version))
        return urlencode(params)

    async def read_answer(self, resource: Resource, answer: UpstreamAnswer, stream: bool) -> bytes:
        """The whole upstream answer, within what is left of the call's time."""
        remaining = (
            self.started + self.runtime.settings.upstream_total_timeout - time.perf_counter()
        )
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                return await answer.read()
        except (UpstreamTimeout, UpstreamUnreachable, TimeoutError) as exc:
            if self.metered:
                self.record_failure(resource, 502, "upstream_error", streamed=stream)
            timed_out = isinstance(exc, UpstreamTimeout | TimeoutError)
            code = "upstream_timeout" if timed_out else "upstream_error"
            raise ProxyError(code, "The deployment stopped answering midway. Retry.") from exc

    def answer_headers(self, answer: UpstreamAnswer) -> dict[str, str]:
        return {**answer.passed_headers(), REQUEST_ID_HEADER: self.request_id}

    # --- records ---------------------------------------------------------------------------

    def release(self) -> None:
        """Give back a token reservation no record will settle (the call failed before)."""
        if self.admission is not None:
            self.admission.cancel()
            self.admission = None
        if self.counter is not None:
            self.runtime.caps.settle(self.counter, self.worst_case_tokens, 0)
            self.counter = None

    def record_failure(
        self, resource: Resource | None, status: int, outcome: str, *, streamed: bool
    ) -> None:
        """A call that used no tokens: the upstream failed or never answered."""
        self.record(
            resource, status, (0, 0, 0), streamed=streamed, estimated=False, outcome=outcome
        )

    def record(
        self,
        resource: Resource | None,
        status: int,
        usage: tuple[int, int, int],
        *,
        streamed: bool,
        estimated: bool,
        outcome: str,
        units: int = 0,
        reasoning: int = 0,
        charge: int | None = None,
    ) -> None:
        """The call's usage record; its tokens (or `charge`) count against today's cap."""
        assert self.access is not None
        if self.counter is not None:
            charged = usage[2] if charge is None else charge
            self.runtime.caps.settle(self.counter, self.worst_case_tokens, charged)
            self.counter = None  # settled once
        if self.admission is not None:
            self.admission.settle(usage[2] if charge is None else charge)
            self.admission = None
        event = self.access.event
        now = clock.now()
        latency_ms = (time.perf_counter() - self.started) * 1000
        telemetry.call_finished(
            {
                "request_id": self.request_id,
                "event_id": event.id,
                "attendee_id": self.access.attendee.id,
                "deployment": self.deployment,
                "resource_id": resource.id if resource else "",
                "status": status,
                "outcome": outcome,
                "streamed": streamed,
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
                "latency_ms": round(latency_ms, 1),
            }
        )
        self.runtime.usage.append(
            UsageRecord(
                event_id=event.id,
                attendee_id=self.access.attendee.id,
                deployment=self.deployment,
                resource_id=resource.id if resource else "",
                model_class=self.operation.model_class,
                status=status,
                prompt_tokens=usage[0],
                completion_tokens=usage[1],
                total_tokens=usage[2],
                streamed=streamed,
                estimated=estimated,
                latency_ms=latency_ms,
                time=now,
                local_date=event.local_date(now),
                request_id=self.request_id,
                outcome=outcome,
                units=units,
                reasoning_tokens=reasoning,
            )
        )

    # --- chat, completions, embeddings, images, audio, search ---------------------------------

    async def run(self, deployment: str | None) -> Response:
        request = self.request
        event = await self.arrive()
        body = await read_body(request, self.runtime.settings.max_body_bytes)
        operation = self.operation
        content_type = request.headers.get("content-type")
        from_body = deployment is None
        if operation.multipart:
            if not content_type or not content_type.lower().startswith("multipart/form-data"):
                raise ProxyError(
                    "invalid_request",
                    "Send the audio file as multipart/form-data with a 'file' field.",
                )
            payload: dict[str, Any] = {}
            if from_body:
                payload["model"] = form_field(body, content_type, "model")
        else:
            payload = parse_json_body(body, content_type)
            content_type = None
        deployment = self.deployment_of(payload, deployment)
        members = find_pool(await self.runtime.pools(event.id), deployment, operation.model_class)
        if self.runtime.plugins.requests:
            screened = await self.screen(payload)
            if screened is not None and not operation.multipart:  # uploads go as they came
                payload, body = screened
        default_version = (
            SEARCH_API_VERSION
            if operation.model_class == "azure-ai-search"
            else self.runtime.settings.default_api_version
        )
        api_version = request.query_params.get("api-version") or default_version
        stream_value = payload.get("stream")
        if stream_value is not None and not isinstance(stream_value, bool):
            raise ProxyError(
                "invalid_request", "Field 'stream' must be true or false.", param="stream"
            )
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ProxyError(
                "invalid_request",
                "Field 'stream_options' must be an object such as {\"include_usage\": true}.",
                param="stream_options",
            )
        stream = operation.streams and stream_value is True
        hide_usage = False
        changed = False
        if operation.token_capped:
            # max_completion_tokens came with the same api-versions as stream_options; the
            # reasoning models refuse max_tokens.
            limit_field = (
                "max_completion_tokens"
                if operation.model_class == "openai-chat" and supports_stream_options(api_version)
                else "max_tokens"
            )
            changed = apply_token_cap(payload, event.max_token_cap, limit_field)
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
        await self.admit(event, body, limit, members)
        if stream:
            asked = isinstance(options, dict) and options.get("include_usage") is True
            if not asked and supports_stream_options(api_version):
                payload["stream_options"] = {**(options or {}), "include_usage": True}
                hide_usage = changed = True
        if from_body and not (operation.multipart or operation.binary):
            # The v1 route: the deployment is in the upstream path instead (a plugin may have
            # dropped the field already).
            payload.pop("model", None)
            changed = True
        upstream_body = orjson.dumps(payload) if changed else body
        query = self.upstream_query(api_version)

        def url_of(resource: Resource) -> str:
            return operation.upstream_url(resource, query)

        resource, answer = await self.forward(
            event, members, url_of, upstream_body, content_type, streamed=stream
        )
        response_headers = self.answer_headers(answer)
        content_kind = answer.headers.get("content-type", "")
        if stream and answer.status == 200 and "text/event-stream" in content_kind:
            return EventStreamResponse(
                relay_events(self, resource, answer, payload, hide_usage),
                status_code=200,
                headers=response_headers,
                media_type="text/event-stream",
            )
        if operation.binary and answer.status == 200:
            units = len(payload["input"]) if isinstance(payload.get("input"), str) else 0
            return EventStreamResponse(
                relay_bytes(self, resource, answer, units),
                status_code=200,
                headers=response_headers,
            )
        return await self._finish(resource, answer, payload, response_headers, stream)

    async def _finish(
        self,
        resource: Resource,
        answer: UpstreamAnswer,
        payload: dict[str, Any],
        headers: dict[str, str],
        stream: bool,
    ) -> Response:
        content = await self.read_answer(resource, answer, stream)
        parsed: Any = None
        json_answer = "json" in answer.headers.get("content-type", "")
        if answer.status == 200 and (json_answer or not self.operation.multipart):
            try:
                parsed = orjson.loads(content)
            except orjson.JSONDecodeError:
                self.record_failure(resource, 502, "upstream_error", streamed=stream)
                raise ProxyError(
                    "upstream_error", "The deployment answered with something that is not JSON."
                ) from None
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        numbers, estimated = usage_numbers(usage), False
        if answer.status == 200 and not usage and self.operation.model_class in TOKEN_CLASSES:
            prompt = tokens.prompt_tokens(payload)
            numbers, estimated = (prompt, 0, prompt), True
        outcome = "ok" if answer.status < 400 else "upstream_status"
        self.record(
            resource,
            answer.status,
            numbers,
            streamed=stream,
            estimated=estimated,
            outcome=outcome,
            units=units_of(self.operation, parsed) if answer.status == 200 else 0,
            reasoning=reasoning_of(usage),
        )
        return Response(content, answer.status, headers)


def form_field(body: bytes, content_type: str, name: str) -> str:
    """A small text field of a multipart/form-data body (the v1 audio routes' `model`)."""
    boundary = content_type.partition("boundary=")[2].split(";")[0].strip().strip('"')
    if not boundary:
        raise ProxyError("invalid_request", "The multipart body names no boundary.")
    marker = f'name="{name}"'.encode()
    for part in body.split(b"--" + boundary.encode()):
        head, _, value = part.partition(b"\r\n\r\n")
        if marker in head and b"filename=" not in head:
            return value.removesuffix(b"\r\n").decode(errors="replace").strip()
    return ""


async def answer_call(call: Call, run: Callable[[], Any]) -> Response:
    """Run a call, answering its refusals in the contract's shape and releasing what it held."""
    try:
        return await run()
    except ProxyError as error:
        call.release()
        telemetry.refused(error.code, call.request_id, call.access.event.id if call.access else "")
        if error.status == 429 and call.access is not None:  # for the organiser's reports
            access = call.access
            call.runtime.caps.count_refusal(
                access.event, access.attendee.id, clock.now(), error.reason
            )
        return error_response(error, call.request_id)
    except CallerGone:
        call.release()
        return Response(status_code=499)  # never read: the connection is gone
    except BaseException:
        call.release()
        raise


async def proxy(request: Request, operation: Operation, deployment: str | None) -> Response:
    """Entry point of every OpenAI-style proxy route that names a deployment."""
    call = Call(request, operation, get_runtime())
    return await answer_call(call, lambda: call.run(deployment))
