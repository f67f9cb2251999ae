"""Field checks for management bodies: each failure names the field and what it must be."""

from __future__ import annotations

import re
from typing import Any

import orjson

from shared.errors import ProxyError, invalid

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EMAIL = re.compile(r"^[^@\s,;<>()\"]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z0-9-]{2,}$")


def text(param: str, value: Any, *, limit: int, required: bool = False) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise invalid(param, "must be a string")
    value = value.strip()
    if required and not value:
        raise invalid(param, "is required and must not be empty")
    if len(value) > limit:
        raise invalid(param, f"must be at most {limit} characters")
    return value


def whole_number(param: str, value: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(param, f"must be a whole number of at least {minimum}")
    if maximum is not None and value > maximum:
        raise invalid(param, f"must be a whole number from {minimum} to {maximum}")
    return value


def boolean(param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(param, "must be true or false")
    return value


def required(body: dict[str, Any], params: tuple[str, ...]) -> None:
    for param in params:
        if body.get(param) is None:
            raise invalid(param, "is required")


def known_fields(body: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], f"is not {kind} field (fields: {', '.join(sorted(allowed))})")


def is_email(value: str) -> bool:
    """An email address as attendees register with it (already lower-cased and stripped)."""
    return len(value) <= 254 and _EMAIL.match(value) is not None


def is_id(value: str) -> bool:
    """Ids in paths: short, and safe as Table Storage keys."""
    return _ID.match(value) is not None


async def json_object(request: Any) -> dict[str, Any]:
    """A request body that must be a JSON object (an empty body is an empty object)."""
    raw = await request.body()
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ProxyError("invalid_request", f"The body is not valid JSON ({exc.msg}).") from exc
    if not isinstance(body, dict):
        raise ProxyError("invalid_request", "The body must be a JSON object.")
    return body
