"""The call's lifecycle: one proxied request from its arrival to its usage record."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response

from shared import clock, telemetry, tokens
from shared.caps import Counter
from shared.catalog import Resource, valid_deployment_name
from shared.errors import ProxyError
from shared.guard import client_address
from shared.keys import key_from_headers
from shared.pipeline.answers import REQUEST_ID_HEADER, error_response, new_request_id
from shared.pipeline.bodies import CallerGone, parse_json_body, read_body
from shared.pipeline.forwarding import Forwarder
from shared.pipeline.operations import (
    SEARCH_API_VERSION,
    TOKEN_CLASSES,
    Operation,
    apply_token_cap,
    find_pool,
    supports_stream_options,
    units_of,
    usage_numbers,
)
from shared.pipeline.relays import relay_events
from shared.runtime import Access, Runtime, get_runtime
from shared.streaming import EventStreamResponse
from shared.upstream import UpstreamAnswer, UpstreamTimeout, UpstreamUnreachable
from shared.usage import UsageRecord

# Never passed upstream: the api-version is set explicitly, and a key or function code put in
# the query string by mistake must not travel further.
_NOT_FORWARDED_QUERY = frozenset({"api-version", "api-key", "key", "code", "subscription-key"})


class Call:
    """One proxied request, from its arrival to its usage record."""

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

    def release(self) -> None:
        """Give back a token reservation no record will settle (the call failed before)."""
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
    ) -> None:
        assert self.access is not None
        if self.counter is not None:
            self.runtime.caps.settle(self.counter, self.worst_case_tokens, usage[2])
            self.counter = None  # settled once
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
            )
        )

    async def run(self, deployment: str | None) -> Response:
        request = self.request
        headers = request.headers
        self.access = await self.runtime.access(
            key_from_headers(headers.get("api-key"), headers.get("authorization")),
            client_address(headers, request.client),
        )
        event = self.access.event
        event.check_open(clock.now())
        body = await read_body(request, self.runtime.settings.max_body_bytes)
        operation = self.operation
        content_type = headers.get("content-type")
        if operation.multipart:
            if not content_type or not content_type.lower().startswith("multipart/form-data"):
                raise ProxyError(
                    "invalid_request",
                    "Send the audio file as multipart/form-data with a 'file' field.",
                )
            payload: dict[str, Any] = {}
        else:
            payload = parse_json_body(body, content_type)
            content_type = None
        from_body = deployment is None
        if from_body:
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
        members = find_pool(await self.runtime.pools(event.id), deployment, operation.model_class)
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
        if event.daily_token_cap:
            # A cheap worst case (about 4 bytes a token): no tokenizer on the request path.
            limit = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
            self.worst_case_tokens = len(body) // 4 + (limit if isinstance(limit, int) else 0)
        self.counter = await self.runtime.caps.admit(
            event, self.access.attendee.id, clock.now(), self.worst_case_tokens
        )
        if stream:
            asked = isinstance(options, dict) and options.get("include_usage") is True
            if not asked and supports_stream_options(api_version):
                payload["stream_options"] = {**(options or {}), "include_usage": True}
                hide_usage = changed = True
        if from_body:
            del payload["model"]  # the v1 route: the deployment is in the upstream path instead
            changed = True
        upstream_body = orjson.dumps(payload) if changed else body
        query = self._upstream_query(api_version)

        def url_of(resource: Resource) -> str:
            return operation.upstream_url(resource, query)

        try:
            resource, answer = await Forwarder(self.runtime).send(
                event.id, deployment, members, url_of, upstream_body, content_type
            )
        except ProxyError as error:
            if error.code in ("upstream_error", "upstream_timeout", "no_capacity"):
                self.record_failure(None, error.status, error.code, streamed=stream)
            raise
        response_headers = {**answer.passed_headers(), REQUEST_ID_HEADER: self.request_id}
        if (
            stream
            and answer.status == 200
            and "text/event-stream" in answer.headers.get("content-type", "")
        ):
            return EventStreamResponse(
                relay_events(self, resource, answer, payload, hide_usage),
                status_code=200,
                headers=response_headers,
                media_type="text/event-stream",
            )
        return await self._finish(resource, answer, payload, response_headers, stream)

    def _upstream_query(self, api_version: str) -> str:
        params = [
            (k, v)
            for k, v in self.request.query_params.multi_items()
            if k.lower() not in _NOT_FORWARDED_QUERY
        ]
        params.append(("api-version", api_version))
        return urlencode(params)

    async def _finish(
        self,
        resource: Resource,
        answer: UpstreamAnswer,
        payload: dict[str, Any],
        headers: dict[str, str],
        stream: bool,
    ) -> Response:
        remaining = (
            self.started + self.runtime.settings.upstream_total_timeout - time.perf_counter()
        )
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                content = await answer.read()
        except (UpstreamTimeout, UpstreamUnreachable, TimeoutError) as exc:
            self.record_failure(resource, 502, "upstream_error", streamed=stream)
            timed_out = isinstance(exc, UpstreamTimeout | TimeoutError)
            code = "upstream_timeout" if timed_out else "upstream_error"
            raise ProxyError(code, "The deployment stopped answering midway. Retry.") from exc
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
        )
        return Response(content, answer.status, headers)


async def proxy(request: Request, operation: Operation, deployment: str | None) -> Response:
    """Entry point of every OpenAI-style proxy route."""
    call = Call(request, operation, get_runtime())
    try:
        return await call.run(deployment)
    except ProxyError as error:
        call.release()
        telemetry.refused(error.code, call.request_id, call.access.event.id if call.access else "")
        return error_response(error, call.request_id)
    except CallerGone:
        call.release()
        return Response(status_code=499)  # never read: the connection is gone
    except BaseException:
        call.release()
        raise
