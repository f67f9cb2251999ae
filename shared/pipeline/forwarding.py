"""Forwarding and failover: one request tried on the members of a pool in order."""

from __future__ import annotations

import logging
from collections.abc import Callable

from opentelemetry.trace import SpanKind

from shared.directory.catalog import Resource
from shared.errors import ProxyError
from shared.platform import telemetry
from shared.platform.identity import scope_for, upstream_token
from shared.runtime import Runtime
from shared.upstreams.balancer import DEFAULT_COOLDOWN_SECONDS, cooldown_seconds
from shared.upstreams.client import UpstreamAnswer, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger(__name__)

_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})


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
        url_of: Callable[[Resource], str],
        body: bytes,
        content_type: str | None = None,
        *,
        body_of: Callable[[Resource], bytes] | None = None,
        method: str = "POST",
    ) -> tuple[Resource, UpstreamAnswer]:
        """`body_of`, when given, makes each member's body (one that names its deployment)."""
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
                    resource,
                    method,
                    url_of(resource),
                    body if body_of is None else body_of(resource),
                    content_type,
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
        self, resource: Resource, method: str, url: str, body: bytes, content_type: str | None
    ) -> tuple[str | None, UpstreamAnswer | None]:
        """One try at one member: (None, answer) or (why it failed, answer if any)."""
        balancer = self.runtime.balancer
        headers = await self.headers(resource)
        if content_type:
            headers["content-type"] = content_type
        self.runtime.limits.sending(resource)
        try:
            answer = await self.runtime.upstream.send(method, url, headers, body)
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
