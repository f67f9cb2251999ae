"""The proxy's request path: authenticate, authorize, choose a deployment, forward, meter."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
from opentelemetry.trace import SpanKind
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from shared import clock, telemetry, tokens
from shared.balancer import DEFAULT_COOLDOWN_SECONDS, cooldown_seconds
from shared.caps import Counter
from shared.catalog import Resource, valid_deployment_name
from shared.errors import ProxyError
from shared.guard import client_address
from shared.identity import scope_for, upstream_token
from shared.keys import key_from_headers
from shared.ratelimits import Admission
from shared.runtime import Access, Runtime, get_runtime
from shared.streaming import EventStreamResponse, StreamMeter
from shared.upstream import UpstreamAnswer, UpstreamTimeout, UpstreamUnreachable
from shared.usage import UsageRecord

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-aiproxy-request-id"
_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# Never passed upstream: the api-version is set explicitly, and a key or function code put in
# the query string by mistake must not travel further.
_NOT_FORWARDED_QUERY = frozenset({"api-version", "api-key", "key", "code", "subscription-key"})
# api-versions from which Azure OpenAI accepts stream_options (2024-09-01-preview, GA 2024-10-21).
_STREAM_OPTIONS_FROM = "2024-09-01-preview"


@dataclass(frozen=True)
class Operation:
    """One kind of proxied call: its model class, upstream path and how its body is read."""

    model_class: str
    path: str
    streams: bool = False
    token_capped: bool = False
    multipart: bool = False  # forwarded as it came (audio uploads); never parsed

    def upstream_url(self, resource: Resource, query: str) -> str:
        if self.model_class == "azure-ai-search":
            return f"{resource.endpoint}/indexes/{resource.upstream_deployment}/{self.path}?{query}"
        return (
            f"{resource.endpoint}/openai/deployments/{resource.upstream_deployment}/"
            f"{self.path}?{query}"
        )


CHAT = Operation("openai-chat", "chat/completions", streams=True, token_capped=True)
EXTENSIONS_CHAT = Operation(
    "openai-chat", "extensions/chat/completions", streams=True, token_capped=True
)
COMPLETIONS = Operation("openai-completions", "completions", streams=True, token_capped=True)
EMBEDDINGS = Operation("openai-embeddings", "embeddings")
IMAGES = Operation("openai-images", "images/generations")
TRANSCRIPTIONS = Operation("openai-audio", "audio/transcriptions", multipart=True)
SEARCH = Operation("azure-ai-search", "docs/search")
# Azure AI Search has api-versions of its own.
SEARCH_API_VERSION = "2024-07-01"


def new_request_id() -> str:
    return secrets.token_hex(8)


def error_response(error: ProxyError, request_id: str) -> Response:
    headers = {REQUEST_ID_HEADER: request_id, **error.headers}
    return Response(error.body(), error.status, headers, media_type="application/json")


def supports_stream_options(api_version: str) -> bool:
    return api_version[:10] >= _STREAM_OPTIONS_FROM[:10] or not api_version[:1].isdigit()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise CallerGone from None
    return b"".join(chunks)


class CallerGone(Exception):
    """The client left before it finished sending: nobody is there to answer."""


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        "payload_too_large",
        f"The request body is larger than this proxy accepts ({limit} bytes). Send less.",
    )


def parse_json_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    if content_type and "json" not in content_type.lower():
        raise ProxyError(
            "invalid_request",
            f"Content type {content_type!r} is not accepted here: send 'application/json'.",
        )
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(
            "invalid_request", f"The request body is not valid JSON ({exc.msg})."
        ) from exc
    if not isinstance(payload, dict):
        raise ProxyError("invalid_request", "The request body must be a JSON object.")
    return payload


def apply_token_cap(payload: dict[str, Any], cap: int, limit_field: str) -> bool:
    """Refuse a limit above the cap; name the cap as the limit when the request has none.

    Returns True when the payload was changed.
    """
    named = False
    for field in ("max_tokens", "max_completion_tokens"):
        value = payload.get(field)
        if value is None:
            continue
        named = True
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProxyError(
                "invalid_request", f"'{field}' must be a positive whole number.", param=field
            )
        if value > cap:
            raise ProxyError(
                "max_tokens_exceeds_cap",
                f"'{field}' is {value}, above this event's cap of {cap} tokens per request. "
                f"Ask for {cap} or fewer.",
                param=field,
            )
    if not named:
        payload[limit_field] = cap  # so that no single call can pass the cap
        return True
    return False


def find_pool(
    pools: dict[str, list[Resource]], deployment: str, model_class: str
) -> list[Resource]:
    pool = [r for r in pools.get(deployment, ()) if r.model_class == model_class]
    if pool:
        return pool
    offered = sorted(
        name for name, rs in pools.items() if any(r.model_class == model_class for r in rs)
    )
    kind = model_class.removeprefix("openai-").removeprefix("azure-")
    listing = ", ".join(offered) if offered else "none"
    raise ProxyError(
        "deployment_not_found",
        f"Deployment '{deployment[:100]}' is not in this event's catalog for {kind}. "
        f"Deployments you can use for {kind}: {listing}.",
    )


class Forwarder:
    """Sends one request to the members of a pool in order until one answers."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def headers(self, resource: Resource) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if resource.auth == "managed_identity":
            token = await upstream_token(self.runtime.settings, scope_for(resource.model_class))
            headers["authorization"] = f"Bearer {token}"
        else:
            key = await self.runtime.upstream_key(resource)
            if key is None:
                raise ProxyError(
                    "upstream_error",
                    "The deployment has no upstream key configured. Tell the organiser.",
                )
            headers["api-key"] = key
        return headers

    async def send(
        self,
        event_id: str,
        deployment: str,
        members: list[Resource],
        url_of: Any,
        body: bytes,
        content_type: str | None = None,
    ) -> tuple[Resource, UpstreamAnswer]:
        balancer = self.runtime.balancer
        ordered = balancer.order(f"{event_id}|{deployment}", members)
        if not ordered:
            raise no_capacity(balancer.soonest(members))
        failures: list[str] = []  # per attempt: "throttled", "timeout" or "error"
        for resource in ordered:
            if failures:
                telemetry.failover(event_id, deployment, resource.id, failures[-1])
            with telemetry.tracer.start_as_current_span(
                "upstream",
                kind=SpanKind.CLIENT,
                attributes={
                    "aiproxy.event_id": event_id,
                    "aiproxy.deployment": deployment,
                    "aiproxy.resource_id": resource.id,
                    "aiproxy.attempt": len(failures) + 1,
                },
            ) as span:
                failure, answer = await self._attempt(
                    resource, url_of(resource), body, content_type
                )
                if answer is not None:
                    span.set_attribute("http.response.status_code", answer.status)
                if failure:
                    span.set_attribute("aiproxy.failure", failure)
            if failure is None and answer is not None:
                return resource, answer
            failures.append(failure or "error")
        if all(f == "throttled" for f in failures):
            raise no_capacity(balancer.soonest(members))
        if "timeout" in failures:
            raise ProxyError(
                "upstream_timeout",
                "Every deployment for this model was too slow to answer. Retry shortly.",
            )
        raise ProxyError(
            "upstream_error",
            "No deployment for this model could answer. Retry shortly.",
        )

    async def _attempt(
        self, resource: Resource, url: str, body: bytes, content_type: str | None
    ) -> tuple[str | None, UpstreamAnswer | None]:
        """One try at one member: (None, answer) or (why it failed, answer if any)."""
        balancer = self.runtime.balancer
        headers = await self.headers(resource)
        if content_type:
            headers["content-type"] = content_type
        self.runtime.limits.sending(resource)
        try:
            answer = await self.runtime.upstream.send("POST", url, headers, body)
        except UpstreamTimeout:
            balancer.cool(resource.id, DEFAULT_COOLDOWN_SECONDS)
            return "timeout", None
        except UpstreamUnreachable:
            balancer.cool(resource.id, DEFAULT_COOLDOWN_SECONDS)
            return "error", None
        self.runtime.limits.observe(resource, answer.headers)  # its x-ratelimit-* headers
        if answer.status not in _RETRYABLE:
            return None, answer
        balancer.cool(resource.id, cooldown_seconds(answer.headers))
        answer.close()
        if answer.status == 429:
            return "throttled", answer
        return ("timeout" if answer.status in (408, 504) else "error"), answer


def no_capacity(seconds: float) -> ProxyError:
    wait = max(1, int(seconds + 0.999))
    return ProxyError(
        "no_capacity",
        f"Every deployment for this model is busy. Retry after {wait} seconds.",
        headers={"Retry-After": str(wait)},
    )


_TOKEN_CLASSES = frozenset({"openai-chat", "openai-completions", "openai-embeddings"})


def units_of(operation: Operation, answer: Any) -> int:
    """What a call used in its own unit: images made, audio seconds, searches run."""
    if operation.model_class == "openai-images":
        data = answer.get("data") if isinstance(answer, dict) else None
        return len(data) if isinstance(data, list) else 0
    if operation.model_class == "openai-audio":
        duration = answer.get("duration") if isinstance(answer, dict) else None
        return int(duration + 0.999) if isinstance(duration, int | float) else 0
    if operation.model_class == "azure-ai-search":
        return 1
    return 0


def _usage_numbers(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    if not usage:
        return 0, 0, 0
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    total = int(usage.get("total_tokens") or prompt + completion)
    return prompt, completion, total


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
        self.admission: Admission | None = None  # its place in the per-minute counts

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
    ) -> None:
        assert self.access is not None
        if self.counter is not None:
            self.runtime.caps.settle(self.counter, self.worst_case_tokens, usage[2])
            self.counter = None  # settled once
        if self.admission is not None:
            self.admission.settle(usage[2])
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
        if operation.model_class in _TOKEN_CLASSES:
            # A cheap worst case (about 4 bytes a token): no tokenizer on the request path.
            limit = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
            self.worst_case_tokens = len(body) // 4 + (limit if isinstance(limit, int) else 0)
        self.counter = await self.runtime.caps.admit(
            event, self.access.attendee.id, clock.now(), self.worst_case_tokens
        )
        self.admission = self.runtime.limits.admit(
            event, self.access.attendee.id, self.counter, deployment, members,
            self.worst_case_tokens,
        )  # fmt: skip
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
            if error.code == "no_capacity" and self.admission is not None:
                self.admission.cancel()  # nothing reached a deployment: it uses no quota
                self.admission = None
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
                self._relay(resource, answer, payload, hide_usage),
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
        numbers, estimated = _usage_numbers(usage), False
        if answer.status == 200 and not usage and self.operation.model_class in _TOKEN_CLASSES:
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

    async def _relay(
        self, resource: Resource, answer: UpstreamAnswer, payload: dict[str, Any], hide_usage: bool
    ) -> AsyncIterator[bytes]:
        meter = StreamMeter(hide_usage=hide_usage)
        outcome = "ok"
        settings = self.runtime.settings
        deadline = self.started + settings.upstream_total_timeout
        content = answer.response.content
        try:
            while True:
                # Azure ends HTTP responses at 230 s: stop cleanly before the platform does.
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    outcome = "cut"
                    raise StreamCut(
                        f"the stream ran longer than {settings.upstream_total_timeout}s"
                    )
                try:
                    # A timeout scope, not wait_for: no task per chunk.
                    async with asyncio.timeout(min(settings.stream_idle_timeout, remaining)):
                        chunk = await content.readany()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    outcome = "cut"
                    out = meter.feed(answer.received_before_failure())
                    if out:
                        yield out
                    raise StreamCut(str(exc) or type(exc).__name__) from exc
                if not chunk:
                    break
                out = meter.feed(chunk)
                if out:
                    yield out
            rest = meter.rest()
            if rest:
                yield rest
            if not meter.done:
                outcome = "cut"
                raise StreamCut("the upstream closed the stream before [DONE]")
        except StreamCut as exc:
            log.warning("stream %s cut by upstream: %s", self.request_id, exc)
            yield stream_error_event()
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "client_gone"
            raise
        finally:
            answer.close()
            estimated = meter.usage is None
            if estimated:
                prompt = tokens.prompt_tokens(payload)
                completion = meter.estimate_completion_tokens()
                numbers = (prompt, completion, prompt + completion)
            else:
                numbers = _usage_numbers(meter.usage)
            status = 200 if outcome == "ok" else 502 if outcome == "cut" else 499
            self.record(
                resource, status, numbers, streamed=True, estimated=estimated, outcome=outcome
            )


class StreamCut(Exception):
    """The upstream stream ended before its [DONE] marker."""


def stream_error_event() -> bytes:
    error = ProxyError(
        "upstream_error",
        "The deployment cut the stream before it finished; the answer is incomplete. Retry.",
    )
    return b"data: " + error.body() + b"\n\n"


async def proxy(request: Request, operation: Operation, deployment: str | None) -> Response:
    """Entry point of every OpenAI-style proxy route."""
    call = Call(request, operation, get_runtime())
    try:
        return await call.run(deployment)
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


async def event_info(request: Request) -> Response:
    """What an attendee's key gives: the event, its caps and window, deployments by class."""
    runtime = get_runtime()
    request_id = new_request_id()
    try:
        headers = request.headers
        access = await runtime.access(
            key_from_headers(headers.get("api-key"), headers.get("authorization")),
            client_address(headers, request.client),
        )
        event = access.event
        by_class: dict[str, list[str]] = {}
        for name, members in sorted((await runtime.pools(event.id)).items()):
            for model_class in sorted({m.model_class for m in members}):
                by_class.setdefault(model_class, []).append(name)
        now = clock.now()
        start, end = event.window_utc()
        status = (
            "inactive"
            if not event.active
            else ("upcoming" if now < start else "ended" if now >= end else "live")
        )
        used_requests, used_tokens = await runtime.caps.today(event, access.attendee.id, now)
        today: dict[str, Any] = {
            "date": event.local_date(now),
            "requests_used": used_requests,
            "requests_left": max(0, event.daily_request_cap - used_requests),
            "tokens_used": used_tokens,
            "tokens_left": (
                max(0, event.daily_token_cap - used_tokens) if event.daily_token_cap else None
            ),
            "resets_in_seconds": event.seconds_to_local_midnight(now),
        }
        info = {
            **event.public(),
            "status": status,
            "today": today,
            "attendee": {"id": access.attendee.id, "user": access.attendee.user},
            "max_token_cap": event.max_token_cap,
            "daily_request_cap": event.daily_request_cap,
            "daily_token_cap": event.daily_token_cap,
            "requests_per_minute": event.requests_per_minute,
            "tokens_per_minute": event.tokens_per_minute,
            "deployments": by_class,
        }
        return Response(
            orjson.dumps(info), 200, {REQUEST_ID_HEADER: request_id}, media_type="application/json"
        )
    except ProxyError as error:
        return error_response(error, request_id)
