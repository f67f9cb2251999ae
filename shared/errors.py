"""Every error the proxy itself produces, one class per meaning, each owning its contract codes
(docs/api.md#errors).

Callers raise `ProxyError(code, message)` and catch by class: the code picks the class
(`ProxyError("key_revoked", ...)` is a `Revoked`, hence an `Unauthenticated`), so nobody
branches on code strings. The answer body is the same whatever the class.

    ProxyError
    ├── BadRequest        400 invalid_request, max_tokens_exceeds_cap, content_filter;
    │                     405 method_not_allowed; 413 payload_too_large
    ├── Unauthenticated   401 unauthorized (no credential at all)
    │   ├── WrongCredential   401 invalid_api_key, invalid_token (counted against the client)
    │   └── Revoked           401 key_revoked
    ├── Forbidden         403 forbidden, registration_refused, tool_not_allowed
    │   └── OutsideEvent      403 event_not_started, event_ended, event_inactive
    ├── NotFound          404 not_found, deployment_not_found, session_not_found
    ├── InConflict        409 conflict
    ├── TooManyRequests   429 the daily caps, rate_limit_exceeded, too_many_failed_keys
    │   └── NoCapacity        429 no_capacity (no member of the pool can take the call now)
    ├── InternalError     500 internal_error
    ├── UpstreamFailed    502 upstream_error, 504 upstream_timeout
    └── Unavailable       503 storage_unavailable, entra_unavailable, plugin_failed
"""

from __future__ import annotations

from typing import Self

import orjson

# Every code of the contract and its status, filled by the classes below.
STATUS_BY_CODE: dict[str, int] = {}
_CLASS_BY_CODE: dict[str, type[ProxyError]] = {}


class ProxyError(Exception):
    """An error answered to the caller in the Azure OpenAI error shape.

    `ProxyError(code, message)` builds the instance of the class that owns `code`; a class may be
    named instead when the code is its own (`NotFound("not_found", ...)`), never another's.
    A class names the codes it owns, with their status, as `codes={code: status}` in its
    bases: a code belongs to exactly one class.
    """

    def __init_subclass__(cls, codes: dict[str, int] | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for code, status in (codes or {}).items():
            if code in _CLASS_BY_CODE:
                raise TypeError(f"code {code!r} belongs to {_CLASS_BY_CODE[code].__name__}")
            _CLASS_BY_CODE[code] = cls
            STATUS_BY_CODE[code] = status

    def __new__(cls, code: str, *args: object, **kwargs: object) -> Self:
        owner = _CLASS_BY_CODE.get(code)
        if owner is None:
            raise ValueError(f"{code!r} is no error code of the contract")
        if not issubclass(owner, cls):
            raise TypeError(f"{code!r} is a {owner.__name__}, not a {cls.__name__}")
        return super().__new__(owner)  # type: ignore[return-value]

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[dict[str, str]] | None = None,
        reason: str = "",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = STATUS_BY_CODE[code]
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        if retry_after is not None:  # seconds until a retry can succeed
            self.headers["Retry-After"] = str(retry_after)
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


class BadRequest(
    ProxyError,
    codes={
        "invalid_request": 400,
        "max_tokens_exceeds_cap": 400,
        "content_filter": 400,  # a request plugin's refusal, shaped like Azure's own filter
        "method_not_allowed": 405,
        "payload_too_large": 413,
    },
):
    """The request as sent cannot be served: fix it and send it again."""


class Unauthenticated(ProxyError, codes={"unauthorized": 401}):
    """The caller is not known: no credential, or one that opens nothing."""


class WrongCredential(Unauthenticated, codes={"invalid_api_key": 401, "invalid_token": 401}):
    """A key, code or token that is wrong: counted against the client (shared/access/guard.py)."""


class Revoked(Unauthenticated, codes={"key_revoked": 401}):
    """A credential that was right until the organiser revoked it."""


class Forbidden(
    ProxyError, codes=dict.fromkeys(("forbidden", "registration_refused", "tool_not_allowed"), 403)
):
    """The caller is known, and not allowed this (tool_not_allowed: an MCP tool the event's
    catalog entry does not allow)."""


class OutsideEvent(
    Forbidden, codes={"event_not_started": 403, "event_ended": 403, "event_inactive": 403}
):
    """The caller's event is not running now."""


class NotFound(
    ProxyError, codes=dict.fromkeys(("not_found", "deployment_not_found", "session_not_found"), 404)
):
    """No such thing, or none the caller may see (session_not_found: an MCP session id that is
    not this key's, or ended)."""


class InConflict(ProxyError, codes={"conflict": 409}):
    """The change contradicts what exists (a name taken, a resource in use)."""


class TooManyRequests(
    ProxyError,
    codes={
        "daily_request_cap_exceeded": 429,
        "daily_token_cap_exceeded": 429,
        "event_daily_request_cap_exceeded": 429,
        "event_daily_token_cap_exceeded": 429,
        "rate_limit_exceeded": 429,
        "too_many_failed_keys": 429,
        "attendee_budget_exhausted": 429,
        "event_budget_exhausted": 429,
    },
):
    """Over a cap or a limit: retry later (most carry Retry-After)."""


class NoCapacity(TooManyRequests, codes={"no_capacity": 429}):
    """Every member of the deployment's pool is busy or cooling down."""


class InternalError(ProxyError, codes={"internal_error": 500}):
    """A failure of the proxy itself."""


class UpstreamFailed(ProxyError, codes={"upstream_error": 502, "upstream_timeout": 504}):
    """The deployment behind the proxy failed or did not answer in time."""


class Unavailable(
    ProxyError,
    codes={
        "storage_unavailable": 503,
        "entra_unavailable": 503,
        "plugin_failed": 503,  # a request plugin failed or ran out of time (shared/plugins)
    },
):
    """Something the proxy needs (storage, Entra ID, a request plugin) is not answering."""


class StorageUnavailable(Exception):
    """Table Storage could not be reached or answered with a server error (shared/platform/
    tables.py). Not a `ProxyError`: what the caller is told depends on what was cached."""


class CallerGone(Exception):
    """The caller left (hung up while sending, or while its answer was written): there is
    nobody to answer. Not a `ProxyError`: nothing is sent."""


def invalid(param: str, problem: str, fix: str = "") -> BadRequest:
    """A 400 that names the offending field, with what to send instead (docs/api.md#errors)."""
    detail = {"field": param, "problem": problem, "fix": fix or "Correct it and send it again."}
    return BadRequest(
        "invalid_request", f"Field '{param}' {problem}.", param=param, details=[detail]
    )


def invalid_fields(errors: list[ProxyError]) -> BadRequest:
    """One 400 for several bad fields: `param` and the message name the first, `details` all."""
    details = [d for error in errors for d in error.details or ()]
    first = errors[0]
    more = len(details) - 1
    message = first.message
    if more > 0:
        message += f" {more} more field{'s' if more > 1 else ''} to fix: see details."
    return BadRequest("invalid_request", message, param=first.param, details=details)


def storage_down() -> Unavailable:
    """Storage did not answer and nothing cached answers for it."""
    message = "The proxy cannot reach its storage right now and has no cached answer."
    return Unavailable("storage_unavailable", f"{message} Retry in a few seconds.", retry_after=5)
