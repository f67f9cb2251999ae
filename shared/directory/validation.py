"""Field checks for management bodies: each failure names the field and what it must be."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from shared.errors import ProxyError, invalid, invalid_fields

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_EMAIL = re.compile(r"^[^@\s,;<>()\"]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z0-9-]{2,}$")


def text(param: str, value: Any, *, limit: int, required: bool = False) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise invalid(param, "must be a string", "Send it as a JSON string.")
    value = value.strip()
    if required and not value:
        raise invalid(param, "is required and must not be empty", "Send a non-empty string.")
    if len(value) > limit:
        raise invalid(
            param, f"must be at most {limit} characters", f"Shorten it to {limit} characters."
        )
    return value


def whole_number(param: str, value: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    span = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
    fix = f"Send a whole number {span}, without quotes."
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(param, f"must be a whole number of at least {minimum}", fix)
    if maximum is not None and value > maximum:
        raise invalid(param, f"must be a whole number from {minimum} to {maximum}", fix)
    return value


def guids(param: str, value: Any, *, limit: int, what: str) -> list[str]:
    """A list of Entra ids (tenants, users, apps, groups), lower-cased, each once; null: none."""
    if value is None:
        return []
    fix = f'Send a JSON list of {what}, such as ["00000000-0000-0000-0000-000000000000"].'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(param, "must be a list of ids (strings)", fix)
    found = list(dict.fromkeys(v.strip().lower() for v in value))
    bad = next((v for v in found if not is_guid(v)), None)
    if bad is not None:
        raise invalid(param, f"holds {bad[:60]!r}, which is not an Entra id (a GUID)", fix)
    if len(found) > limit:
        raise invalid(param, f"must hold at most {limit} ids", f"Send at most {limit}.")
    return found


def boolean(param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(param, "must be true or false", "Send true or false, without quotes.")
    return value


def required(body: dict[str, Any], params: tuple[str, ...], problems: Problems) -> None:
    for param in params:
        if body.get(param) is None:
            problems.add(invalid(param, "is required", f"Add '{param}' to the body."))


def known_fields(body: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        fields = ", ".join(sorted(allowed))
        errors = [
            invalid(name, f"is not {kind} field (fields: {fields})", "Leave it out.")
            for name in unknown
        ]
        raise errors[0] if len(errors) == 1 else invalid_fields(errors)


class Problems:
    """Every bad field of one body, so that a single answer names them all.

    Checks run inside `with problems.check():`; a field's 400 is noted there instead of
    ending the validation, and `raise_any` answers with all of them.
    """

    def __init__(self) -> None:
        self.errors: list[ProxyError] = []

    def add(self, error: ProxyError) -> None:
        self.errors.append(error)

    @contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except ProxyError as error:
            if error.code != "invalid_request" or error.param is None:
                raise
            self.errors.append(error)

    def bad(self, *params: str) -> bool:
        """Whether any of these fields was found bad (checks that need them are skipped)."""
        return any(d["field"] in params for e in self.errors for d in e.details or ())

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise invalid_fields(self.errors)


def is_email(value: str) -> bool:
    """An email address as attendees register with it (already lower-cased and stripped)."""
    return len(value) <= 254 and _EMAIL.match(value) is not None


def is_guid(value: str) -> bool:
    """An Entra tenant or object id, lower-cased: 8-4-4-4-12 hexadecimal digits."""
    return _GUID.match(value) is not None


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
