"""Management bodies checked against their models; each bad field named with what to send."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import orjson
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from shared.directory.models import GUID, Body
from shared.errors import ProxyError, invalid, invalid_fields

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# No ':' in the local part: 'aad:…@…' would be the name of a signed-in attendee.
_EMAIL = re.compile(r"^[^@\s,;<>()\":]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z0-9-]{2,}$")


def parse[M: Body](model: type[M], body: dict[str, Any], **context: Any) -> M:
    """The body as `model`, or one 400 that names every bad field: `param` and the message the
    first, `details` all, each with its problem and fix (docs/api.md#errors)."""
    try:
        return model.model_validate(body, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise invalid_fields([_invalid(model, error) for error in errors]) from None


def _invalid(model: type[Body], error: ErrorDetails) -> ProxyError:
    field = ".".join(str(part) for part in error["loc"])
    return invalid(field, *_explain(model, field, error))


def _explain(model: type[Body], field: str, error: ErrorDetails) -> tuple[str, str]:
    """What is wrong and what to send instead, in the words of the field's schema."""
    kind, ctx = error["type"], error.get("ctx", {})
    spec = _properties(model).get(field, {})
    if kind == "field":  # the models' own checks say it themselves
        return ctx["problem"], ctx["fix"]
    if kind == "extra_forbidden":
        fields = ", ".join(sorted(model.model_fields))
        return f"is not {model.noun} field (fields: {fields})", "Leave it out."
    declared = model.model_fields.get(field)
    if kind == "missing" or (error["input"] is None and declared and declared.is_required()):
        about = spec.get("description")
        return "is required", f"Add '{field}' to the body" + (f": {about}." if about else ".")
    if kind == "string_type":
        return "must be a string", "Send it as a JSON string."
    if kind == "string_too_short":
        return "is required and must not be empty", "Send a non-empty string."
    if kind == "string_too_long":
        limit = ctx["max_length"]
        return f"must be at most {limit} characters", f"Shorten it to {limit} characters."
    if kind in ("int_type", "int_from_float", "greater_than_equal", "less_than_equal"):
        low, high = spec.get("minimum", 0), spec.get("maximum")
        span = f"of at least {low}" if high is None else f"from {low} to {high}"
        fix = f"Send a whole number {span}, without quotes."
        if kind == "less_than_equal":
            return f"must be a whole number {span}", fix
        return f"must be a whole number of at least {low}", fix
    if kind == "bool_type":
        return "must be true or false", "Send true or false, without quotes."
    if kind == "literal_error":
        choices = spec["enum"]
        if len(choices) == 2:
            either = f"'{choices[0]}' or '{choices[1]}'"
            return f"must be {either}", f"Send {either}."
        return f"must be one of {', '.join(choices)}", f"Send one of them, such as '{choices[0]}'."
    return f"is not valid ({error['msg']})", "Correct it and send it again."


@cache
def _properties(model: type[Body]) -> dict[str, Any]:
    """Each field's JSON schema (the branch that is not null, for optional fields)."""
    found = {}
    for name, spec in model.model_json_schema()["properties"].items():
        branches = [b for b in spec.get("anyOf", []) if b.get("type") != "null"]
        found[name] = {**spec, **branches[0]} if branches else spec
    return found


def is_email(value: str) -> bool:
    """An email address as attendees register with it (already lower-cased and stripped)."""
    return len(value) <= 254 and _EMAIL.match(value) is not None


def is_guid(value: str) -> bool:
    """An Entra tenant or object id, lower-cased: 8-4-4-4-12 hexadecimal digits."""
    return GUID.match(value) is not None


def is_id(value: str) -> bool:
    """Ids in paths: short, and safe as Table Storage keys."""
    return _ID.match(value) is not None


async def json_object(request: Any) -> dict[str, Any]:
    """A request body that must be a JSON object (an empty body is an empty object)."""
    return json_object_of(await request.body())


def json_object_of(raw: bytes) -> dict[str, Any]:
    """Bytes that must be a JSON object (nothing is an empty object)."""
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ProxyError("invalid_request", f"The body is not valid JSON ({exc.msg}).") from exc
    if not isinstance(body, dict):
        raise ProxyError("invalid_request", "The body must be a JSON object.")
    return body
