"""Every error the proxy itself produces: one class, one table of codes (docs/api.md#errors)."""

from __future__ import annotations

import orjson

STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "max_tokens_exceeds_cap": 400,
    "content_filter": 400,  # a request plugin's refusal, shaped like Azure's own filter
    "invalid_api_key": 401,
    "key_revoked": 401,
    "invalid_token": 401,
    "unauthorized": 401,
    "forbidden": 403,
    "event_not_started": 403,
    "event_ended": 403,
    "event_inactive": 403,
    "registration_refused": 403,
    "not_found": 404,
    "deployment_not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "payload_too_large": 413,
    "daily_request_cap_exceeded": 429,
    "daily_token_cap_exceeded": 429,
    "event_daily_request_cap_exceeded": 429,
    "event_daily_token_cap_exceeded": 429,
    "no_capacity": 429,
    "rate_limit_exceeded": 429,
    "too_many_failed_keys": 429,
    "internal_error": 500,
    "upstream_error": 502,
    "storage_unavailable": 503,
    "entra_unavailable": 503,
    "plugin_failed": 503,  # a request plugin failed or ran out of time (shared/plugins)
    "upstream_timeout": 504,
}


class ProxyError(Exception):
    """An error answered to the caller in the Azure OpenAI error shape."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[dict[str, str]] | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = STATUS_BY_CODE[code]
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.details = details
        # Why a call was refused, as the usage reports count it: the code without its
        # "_exceeded", or which per-minute limit (requests_per_minute, fair_share, …).
        self.reason = reason or code.removesuffix("_exceeded")

    def body(self) -> bytes:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.details:
            error["details"] = self.details
        error["status"] = self.status
        return orjson.dumps({"error": error})


def invalid(param: str, problem: str, fix: str = "") -> ProxyError:
    """A 400 that names the offending field, with what to send instead (docs/api.md#errors)."""
    detail = {"field": param, "problem": problem, "fix": fix or "Correct it and send it again."}
    return ProxyError(
        "invalid_request", f"Field '{param}' {problem}.", param=param, details=[detail]
    )


def invalid_fields(errors: list[ProxyError]) -> ProxyError:
    """One 400 for several bad fields: `param` and the message name the first, `details` all."""
    details = [d for error in errors for d in error.details or ()]
    first = errors[0]
    more = len(details) - 1
    message = first.message
    if more > 0:
        message += f" {more} more field{'s' if more > 1 else ''} to fix: see details."
    return ProxyError("invalid_request", message, param=first.param, details=details)
