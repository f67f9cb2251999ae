"""What organisers can watch: one structured log line per proxied call, and OpenTelemetry
traces and metrics (exported to Application Insights when its connection string is set).

Nothing here ever sees a key, an upstream secret or prompt text.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from opentelemetry import metrics, trace

from shared.platform.settings import Settings

request_log = logging.getLogger("aiproxy.request")
tracer = trace.get_tracer("aiproxy")
_meter = metrics.get_meter("aiproxy")
requests_counter = _meter.create_counter(
    "aiproxy.requests", unit="{request}", description="Proxied calls, by event, deployment, outcome"
)
tokens_counter = _meter.create_counter(
    "aiproxy.tokens", unit="{token}", description="Tokens used, by event, deployment and kind"
)
failovers_counter = _meter.create_counter(
    "aiproxy.failovers", unit="{failover}", description="Calls moved on to another pool member"
)
refusals_counter = _meter.create_counter(
    "aiproxy.refusals", unit="{request}", description="Calls refused by the proxy, by error code"
)

_configured = False

# INFO chatter of the libraries under the app, per call: the Azure SDK logs each storage request
# with its headers, the Functions runtime three lines per invocation. In the worker every record
# becomes a message to the host (and Application Insights), so they are held at WARNING; the
# app's own per-call line is `aiproxy.request`.
QUIET_LOGGERS = ("azure", "azure.functions")


def set_log_levels() -> None:
    """The app's log levels, whoever runs it (the Functions worker sets the root to INFO)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # The worker's uvicorn prints an access line per call (the host logs calls itself). Its
    # logging is configured after the app is indexed, which resets levels but keeps filters.
    access = logging.getLogger("uvicorn.access")
    if _no_access_lines not in access.filters:
        access.addFilter(_no_access_lines)


def _no_access_lines(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def configure(settings: Settings) -> bool:
    """Send traces, metrics and logs to Application Insights when it is configured."""
    global _configured
    if _configured or not settings.appinsights_connection_string:
        return False
    from azure.monitor.opentelemetry import configure_azure_monitor

    options: dict[str, Any] = {"connection_string": settings.appinsights_connection_string}
    if settings.managed_identity_client_id:
        # The Bicep turns local authentication off: ingestion needs the app's identity.
        from azure.identity import ManagedIdentityCredential

        options["credential"] = ManagedIdentityCredential(
            client_id=settings.managed_identity_client_id
        )
    configure_azure_monitor(logger_name="aiproxy", **options)
    _configured = True
    return True


def call_finished(fields: dict[str, Any]) -> None:
    """The structured line and the metrics of one proxied call."""
    attributes = {
        "event_id": fields["event_id"],
        "deployment": fields["deployment"],
        "outcome": fields["outcome"],
        "status": fields["status"],
    }
    requests_counter.add(1, attributes)
    where = {"event_id": fields["event_id"], "deployment": fields["deployment"]}
    if fields["prompt_tokens"]:
        tokens_counter.add(fields["prompt_tokens"], {**where, "kind": "prompt"})
    if fields["completion_tokens"]:
        tokens_counter.add(fields["completion_tokens"], {**where, "kind": "completion"})
    # Successful calls are the bulk and are counted by the metrics: their lines are DEBUG.
    level = logging.DEBUG if fields["outcome"] == "ok" else logging.INFO
    if request_log.isEnabledFor(level):
        request_log.log(level, json.dumps(fields, separators=(",", ":")))


def refused(code: str, request_id: str, event_id: str = "") -> None:
    refusals_counter.add(1, {"code": code, "event_id": event_id})
    if request_log.isEnabledFor(logging.INFO):
        request_log.info(
            json.dumps({"request_id": request_id, "refused": code, "event_id": event_id})
        )


def failover(event_id: str, deployment: str, resource_id: str, reason: str) -> None:
    failovers_counter.add(
        1,
        {
            "event_id": event_id,
            "deployment": deployment,
            "resource_id": resource_id,
            "reason": reason,
        },
    )
