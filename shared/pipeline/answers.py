"""What every answer of the proxy carries: a request id, the upstream's headers the caller may
see, and errors in the contract's shape."""

from __future__ import annotations

import secrets

from starlette.responses import Response

from shared.errors import ProxyError

# Successful answers of attendees with a budget: what is left of it, in the event's currency.
BUDGET_HEADER = "x-aiproxy-budget-remaining"
REQUEST_ID_HEADER = "x-aiproxy-request-id"
# Response headers of the upstream that the caller gets to see.
PASSED_HEADERS = (
    "content-type",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)


def new_request_id() -> str:
    return secrets.token_hex(8)


def error_response(error: ProxyError, request_id: str) -> Response:
    headers = {REQUEST_ID_HEADER: request_id, **error.headers}
    return Response(error.body(), error.status, headers, media_type="application/json")
