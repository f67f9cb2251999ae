"""Every error the proxy itself produces: one class, one table of codes (API.md section 2)."""

from __future__ import annotations

import orjson

STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "max_tokens_exceeds_cap": 400,
    "invalid_api_key": 401,
    "key_revoked": 401,
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
    "no_capacity": 429,
    "too_many_failed_keys": 429,
    "internal_error": 500,
    "upstream_error": 502,
    "storage_unavailable": 503,
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
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = STATUS_BY_CODE[code]
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        error["status"] = self.status
        return orjson.dumps({"error": error})


def invalid(param: str, problem: str) -> ProxyError:
    """A 400 that names the offending field."""
    return ProxyError("invalid_request", f"Field '{param}' {problem}.", param=param)
