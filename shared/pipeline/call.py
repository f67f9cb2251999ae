"""The call's lifecycle: one proxied request from its arrival to its usage record.

`ProxyCall.run` takes named steps: arrive (who calls, for which event), parse (the body, the
deployment and its pool, the plugins' screening), limit the stream options, cap, admit (today's
caps and this minute's limits), rewrite (what goes upstream), dispatch (to the members in
order) and settle (the answer relayed or read, and the usage recorded). The steps fill in one
`UpstreamRequest`, which the Responses API's calls (responses.py) share.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response

from shared.directory import Event, Resource
from shared.errors import NoCapacity, ProxyError, UpstreamFailed
from shared.pipeline.answers import (
    BUDGET_HEADER,
    PASSED_HEADERS,
    REQUEST_ID_HEADER,
    error_response,
    new_request_id,
)
from shared.pipeline.bodies import CallerGone, deployment_named, parse_json_body, read_body
from shared.pipeline.forwarding import Forwarder, UpstreamRequest
from shared.pipeline.kinds import (
    SEARCH_API_VERSION,
    TOKEN_CLASSES,
    CallKind,
    apply_token_cap,
    details_of,
    estimated_usage,
    find_pool,
    supports_stream_options,
    units_of,
    usage_numbers,
    worst_units,
)
from shared.pipeline.ledger import Ledger
from shared.pipeline.relays import (
    STREAM_CUT_EVENT,
    Meter,
    StreamTimes,
    is_event_stream,
    read_whole,
    relay,
)
from shared.pipeline.streaming import BytesMeter, EventStreamResponse, StreamMeter
from shared.plugins import RequestContext, Screened
from shared.runtime import Access, Runtime, get_runtime
from shared.upstreams.client import UpstreamAnswer

# Never passed upstream: the api-version is set explicitly, and a key or function code put in
# the query string by mistake must not travel further.
NOT_FORWARDED_QUERY = frozenset({"api-version", "api-key", "key", "code", "subscription-key"})


class Exchange:
    """What every proxied request has from its arrival (a model call, an MCP message): its id,
    its upstream request and its ledger; `answer` runs it."""

    def __init__(
        self, request: Request, runtime: Runtime, model_class: str, upstream: UpstreamRequest
    ) -> None:
        self.request = request
        self.runtime = runtime
        self.request_id = new_request_id()
        self.access: Access | None = None
        self.upstream = upstream
        self.ledger = Ledger(runtime, self.request_id, model_class, upstream)
        self.started = self.ledger.started

    def refusal(self, error: ProxyError) -> Response:
        """The answer to a refused call, in the contract's shape."""
        return error_response(error, self.request_id)

    async def answer(self, run: Callable[[], Awaitable[Response]]) -> Response:
        """Run the call, answering its refusals and releasing what it held."""
        try:
            return await run()
        except ProxyError as error:
            self.ledger.release()
            self.ledger.refused(error)
            return self.refusal(error)
        except CallerGone:
            self.ledger.release()
            return Response(status_code=499)  # never read: the connection is gone
        except BaseException:
            self.ledger.release()
            raise


class ProxyCall(Exchange):
    """One proxied request, from its arrival to its usage record."""

    def __init__(self, request: Request, kind: CallKind, runtime: Runtime) -> None:
        super().__init__(request, runtime, kind.model_class, UpstreamRequest())  # filled in later
        self.kind = kind
        self.pools: dict[str, list[Resource]] = {}  # the event's deployments and their members

    # --- the steps, in order --------------------------------------------------------------------

    async def run(self, deployment: str | None) -> Response:
        """Chat, completions, embeddings, images, audio and search; `deployment` is the path's,
        or None where the body's `model` names it."""
        event = await self.arrive()
        payload, body = await self.parse(deployment)
        api_version = self.request.query_params.get("api-version") or (
            SEARCH_API_VERSION
            if self.kind.model_class == "azure-ai-search"
            else self.runtime.settings.default_api_version
        )
        stream, hide_usage = self.limit_stream(payload, api_version)
        capped = self.cap(payload, event.max_token_cap, api_version)
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
        await self.ledger.admit(
            event, len(body), limit, worst_units(self.kind, payload), streamed=stream
        )
        self.rewrite(
            payload, body, api_version, changed=capped or hide_usage,
            model_in_body=deployment is None,
        )  # fmt: skip
        answer = await self.dispatch(stream)
        return await self.settle(answer, payload, stream, hide_usage)

    async def arrive(self) -> Event:
        """Who is calling, for which event; refused outside the event's window."""
        self.access = await self.runtime.gate.of_request(self.request.headers, self.request.client)
        self.ledger.access = self.access
        event = self.access.event
        event.check_open()
        return event

    async def parse(self, deployment: str | None) -> tuple[dict[str, Any], bytes]:
        """The body (a JSON object, or an upload's `model` field), the deployment it goes to
        and that deployment's pool, then the plugins' screening: the payload and body to go on
        with as if the caller had sent them."""
        body = await read_body(self.request, self.runtime.settings.max_body_bytes)
        content_type = self.request.headers.get("content-type")
        if self.kind.multipart:
            if not content_type or not content_type.lower().startswith("multipart/form-data"):
                raise ProxyError(
                    "invalid_request",
                    "Send the audio file as multipart/form-data with a 'file' field.",
                )
            payload: dict[str, Any] = {}
            if deployment is None:
                payload["model"] = form_field(body, content_type, "model")
            self.upstream.content_type = content_type
        else:
            payload = parse_json_body(body, content_type)
        upstream = self.upstream
        upstream.deployment = deployment_named(payload, deployment)
        assert self.access is not None
        self.pools = await self.runtime.directory.pools(self.access.event.id)
        upstream.members = find_pool(self.pools, upstream.deployment, self.kind.model_class)
        if self.runtime.plugins.requests:
            screened = await self.screen(payload)
            if screened is not None and not self.kind.multipart:  # uploads go as they came
                payload, body = screened
        return payload, body

    def limit_stream(self, payload: dict[str, Any], api_version: str) -> tuple[bool, bool]:
        """Whether the call streams, and whether usage was asked for on the caller's behalf
        (to meter the stream: then it is hidden from the caller again)."""
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
        if not (self.kind.streams and stream_value is True):
            return False, False
        asked = isinstance(options, dict) and options.get("include_usage") is True
        if asked or not supports_stream_options(api_version):
            return True, False
        payload["stream_options"] = {**(options or {}), "include_usage": True}
        return True, True

    def cap(self, payload: dict[str, Any], cap: int, api_version: str) -> bool:
        """The event's cap on the tokens the call may ask for; True if the payload changed."""
        if not self.kind.token_capped:
            return False
        # max_completion_tokens came with the same api-versions as stream_options; the
        # reasoning models refuse max_tokens.
        limit_field = (
            "max_completion_tokens"
            if self.kind.model_class == "openai-chat" and supports_stream_options(api_version)
            else "max_tokens"
        )
        return apply_token_cap(payload, cap, limit_field)

    def rewrite(
        self, payload: dict[str, Any], body: bytes, api_version: str, *, changed: bool,
        model_in_body: bool,
    ) -> None:  # fmt: skip
        """What goes upstream: the kind's path and the caller's query, and the body as it came
        unless the steps changed it."""
        kind, upstream = self.kind, self.upstream
        if model_in_body and not (kind.multipart or kind.binary):
            # The v1 routes: the deployment goes in the upstream path instead (a plugin may
            # have dropped the field already).
            payload.pop("model", None)
            changed = True
        upstream.path = kind.upstream_path
        upstream.query = self.upstream_query(api_version)
        upstream.body = orjson.dumps(payload) if changed else body

    async def dispatch(self, streamed: bool) -> UpstreamAnswer:
        """The first member's answer that is not a failure (once the call's entry in flight is
        stored); failures are recorded."""
        assert self.access is not None
        try:
            answer = await Forwarder(self.runtime).send(self.access.event.id, self.upstream)
        except NoCapacity as error:
            self.ledger.unsent()
            self.ledger.record_failure(error.status, error.code, streamed=streamed)
            raise
        except UpstreamFailed as error:
            self.ledger.record_failure(error.status, error.code, streamed=streamed)
            raise
        # The call's entry in flight was written while the request went upstream: no byte of
        # the answer reaches the caller before storage has it.
        await self.ledger.journaled()
        return answer

    async def settle(
        self, answer: UpstreamAnswer, payload: dict[str, Any], stream: bool, hide_usage: bool
    ) -> Response:
        """The answer to the caller, relayed as it arrives or read whole; the usage recorded."""
        if stream and is_event_stream(answer):
            meter = StreamMeter(hide_usage=hide_usage)

            def finish(outcome: str) -> None:
                usage = meter.usage
                self.ledger.record_end(
                    outcome,
                    usage_numbers(usage)
                    if usage is not None
                    else estimated_usage(payload, meter.estimate_completion_tokens()),
                    estimated=usage is None,
                    details=details_of(usage, meter.model),
                )

            return self.relayed(answer, meter, finish, STREAM_CUT_EVENT)
        if self.kind.binary and answer.status == 200:
            # Speech counts the characters it was asked to say.
            said = payload.get("input")
            units = len(said) if isinstance(said, str) else 0
            return self.relayed(
                answer, BytesMeter(), lambda outcome: self.ledger.record_end(outcome, units=units)
            )
        content = await self.read_answer(answer, stream)
        parsed: Any = None
        json_answer = "json" in answer.headers.get("content-type", "")
        if answer.status == 200 and (json_answer or not self.kind.multipart):
            try:
                parsed = orjson.loads(content)
            except orjson.JSONDecodeError:
                self.ledger.record_failure(502, "upstream_error", streamed=stream)
                raise ProxyError(
                    "upstream_error", "The deployment answered with something that is not JSON."
                ) from None
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        numbers, estimated = usage_numbers(usage), False
        if answer.status == 200 and not usage and self.kind.model_class in TOKEN_CLASSES:
            numbers, estimated = estimated_usage(payload), True
        self.ledger.record(
            answer.status,
            numbers,
            streamed=stream,
            estimated=estimated,
            outcome="ok" if answer.status < 400 else "upstream_status",
            units=units_of(self.kind, parsed) if answer.status == 200 else 0,
            details=details_of(usage, parsed.get("model") if isinstance(parsed, dict) else None),
        )
        return Response(content, answer.status, self.answer_headers(answer))

    # --- what the steps use -------------------------------------------------------------------

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
            operation=self.kind.path,
            model_class=self.kind.model_class,
            deployment=self.upstream.deployment,
        )
        return await self.runtime.plugins.screen(context, payload)

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

    async def read_answer(self, answer: UpstreamAnswer, stream: bool) -> bytes:
        """The whole upstream answer, within what is left of the call's time."""
        deadline = self.started + self.runtime.settings.upstream_total_timeout
        try:
            return await read_whole(answer, deadline)
        except ProxyError:
            self.ledger.record_failure(502, "upstream_error", streamed=stream)
            raise

    def answer_headers(self, answer: UpstreamAnswer) -> dict[str, str]:
        """The upstream's headers the caller may see, and the call's request id."""
        headers = {name: answer.headers[name] for name in PASSED_HEADERS if name in answer.headers}
        headers[REQUEST_ID_HEADER] = self.request_id
        left = self.ledger.budget_left()
        if left is not None:
            headers[BUDGET_HEADER] = left
        return headers

    def relayed(
        self,
        answer: UpstreamAnswer,
        meter: Meter,
        finish: Callable[[str], None],
        cut_event: bytes = b"",
    ) -> Response:
        """The answer passed on as it arrives; `finish(outcome)` records the call at its end."""
        settings = self.runtime.settings
        total = settings.upstream_total_timeout
        times = StreamTimes(self.started + total, total, settings.stream_idle_timeout)
        events = relay(
            answer, meter, times, finish, cut_event=cut_event, request_id=self.request_id
        )
        # Event streams end with an error event when cut; binary answers keep their own type.
        media_type = "text/event-stream" if cut_event else None
        return EventStreamResponse(
            events, status_code=200, headers=self.answer_headers(answer), media_type=media_type
        )


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


async def proxy_call(request: Request, kind: CallKind, deployment: str | None) -> Response:
    """Entry point of every OpenAI-style proxy route that names a deployment (in its path, or
    None: in the body's `model`)."""
    call = ProxyCall(request, kind, get_runtime())
    return await call.answer(lambda: call.run(deployment))
