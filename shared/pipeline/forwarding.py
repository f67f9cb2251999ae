"""Forwarding and failover: one upstream request tried on the members of a pool in order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
from opentelemetry.trace import SpanKind

from shared.directory.catalog import Resource
from shared.directory.endpoints import EndpointPolicy, endpoint_problem
from shared.errors import ProxyError
from shared.pipeline.kinds import DEPLOYMENT
from shared.platform import telemetry
from shared.platform.identity import scope_for, upstream_token
from shared.runtime import Runtime
from shared.upstreams.balancer import DEFAULT_COOLDOWN_SECONDS, cooldown_seconds
from shared.upstreams.client import UpstreamAnswer, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger(__name__)

_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
_REFUSED_LOGGED: set[tuple[str, str]] = set()  # (resource, endpoint) logged as refused


@dataclass
class UpstreamRequest:
    """What one call sends to a deployment, whatever its kind (chat, embeddings, speech, the
    Responses API, …): filled in by the call's steps, then tried on the members in order."""

    deployment: str = ""  # the event's name for it, as the caller named it
    members: list[Resource] = field(default_factory=list)  # the pool it may go to
    path: str = ""  # after a member's endpoint; DEPLOYMENT stands for the member's deployment
    query: str = ""
    method: str = "POST"
    content_type: str | None = None  # None: application/json
    body: bytes = b""
    # Set when each member's body names its own deployment in `model` (the Responses API).
    payload: dict[str, Any] | None = None
    member: Resource | None = None  # the member that answered

    def url(self, resource: Resource) -> str:
        path = self.path.replace(DEPLOYMENT, resource.upstream_deployment)
        return f"{resource.endpoint}/{path}?{self.query}"

    def body_for(self, resource: Resource) -> bytes:
        if self.payload is None:
            return self.body
        self.payload["model"] = resource.upstream_deployment
        return orjson.dumps(self.payload)


class Forwarder:
    """Sends one request to the members of a pool in order until one answers."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def headers(self, resource: Resource) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if resource.auth == "managed_identity":
            if resource.owner:
                # Only the operator may point the app's identity somewhere; an organiser's
                # resource set so (stored before this rule) gets no token, wherever it points.
                log.warning(
                    "resource %s of owner %s uses the app's managed identity, which only the "
                    "operator's resources may: no token sent",
                    resource.id,
                    resource.owner,
                )
                raise ProxyError(
                    "upstream_error",
                    "The deployment is set to call with the proxy's own identity, which only "
                    "the operator's deployments may. Tell the organiser to use its key.",
                )
            token = await upstream_token(self.runtime.settings, scope_for(resource.model_class))
            headers["authorization"] = f"Bearer {token}"
        else:
            key = await self.runtime.directory.upstream_key(resource)
            if key is None:
                raise ProxyError(
                    "upstream_error",
                    "The deployment has no upstream key configured. Tell the organiser.",
                )
            headers["api-key"] = key
        return headers

    async def send(self, event_id: str, request: UpstreamRequest) -> UpstreamAnswer:
        """The first answer of a member that is not a failure; `request.member` is who gave it."""
        deployment = request.deployment
        balancer = self.runtime.balancer
        members = self.callable(request.members)
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
                failure, answer = await self._attempt(resource, request)
                if answer is not None:
                    span.set_attribute("http.response.status_code", answer.status)
                if failure:
                    span.set_attribute("aiproxy.failure", failure)
            if failure is None and answer is not None:
                request.member = resource
                return answer
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

    def callable(self, members: list[Resource]) -> list[Resource]:
        """The members whose endpoint the proxy may call now; a resource stored before the
        allowed hosts were narrowed (or the setting changed) is skipped, and logged once."""
        policy = EndpointPolicy.of(self.runtime.settings)
        allowed = []
        for resource in members:
            found = endpoint_problem(resource.endpoint, policy)
            if found is None:
                allowed.append(resource)
            elif (resource.id, resource.endpoint) not in _REFUSED_LOGGED:
                _REFUSED_LOGGED.add((resource.id, resource.endpoint))
                log.error(
                    "resource %s: endpoint %s %s; it is not called. Change its endpoint, or "
                    "allow its host in AIPROXY_UPSTREAM_HOSTS",
                    resource.id, resource.endpoint, found,
                )  # fmt: skip
        if members and not allowed:
            raise ProxyError(
                "upstream_error",
                "This deployment's upstream endpoint is not one this proxy may call, so the "
                "call was not sent. Tell the event's organiser to correct the resource.",
            )
        return allowed

    async def _attempt(
        self, resource: Resource, request: UpstreamRequest
    ) -> tuple[str | None, UpstreamAnswer | None]:
        """One try at one member: (None, answer) or (why it failed, answer if any)."""
        balancer = self.runtime.balancer
        headers = await self.headers(resource)
        if request.content_type:
            headers["content-type"] = request.content_type
        self.runtime.limits.sending(resource)
        try:
            answer = await self.runtime.upstream.send(
                request.method, request.url(resource), headers, request.body_for(resource)
            )
        except UpstreamTimeout:
            balancer.cool(resource.id, DEFAULT_COOLDOWN_SECONDS)
            return "timeout", None
        except UpstreamUnreachable:
            balancer.cool(resource.id, DEFAULT_COOLDOWN_SECONDS)
            return "error", None
        self.runtime.limits.observe(resource, answer.headers)  # its x-ratelimit-* headers
        if 300 <= answer.status < 400:
            # Redirects are never followed (the request carries the upstream's credential) and
            # never passed on: the deployment failed this call, as a 5xx would.
            log.warning(
                "resource %s answered %d (a redirect, not followed); counted as a failure",
                resource.id, answer.status,
            )  # fmt: skip
            balancer.cool(resource.id, DEFAULT_COOLDOWN_SECONDS)
            answer.close()
            return "error", answer
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
