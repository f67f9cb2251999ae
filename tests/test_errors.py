"""Errors are caught by what they mean: the code picks the class, the answer body stays the
contract's (docs/api.md#errors)."""

from __future__ import annotations

import orjson
import pytest

from shared import errors
from shared.errors import (
    STATUS_BY_CODE,
    BadRequest,
    InConflict,
    NoCapacity,
    NotFound,
    OutsideEvent,
    ProxyError,
    Revoked,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
    UpstreamFailed,
    WrongCredential,
)


def test_every_code_builds_the_one_class_that_owns_it_with_the_status_of_the_contract():
    owners = {}
    for code, status in STATUS_BY_CODE.items():
        error = ProxyError(code, "m")
        assert type(error) is not ProxyError and error.code == code and error.status == status
        owners[code] = type(error)
        # Named by its own class (or a parent), the same class comes back.
        assert type(type(error)(code, "m")) is type(error)
    assert owners["key_revoked"] is Revoked and issubclass(Revoked, Unauthenticated)
    assert owners["invalid_api_key"] is owners["invalid_token"] is WrongCredential
    assert owners["event_ended"] is OutsideEvent and owners["no_capacity"] is NoCapacity
    assert owners["upstream_timeout"] is owners["upstream_error"] is UpstreamFailed
    assert owners["conflict"] is InConflict and owners["storage_unavailable"] is Unavailable
    assert {c for c, cls in owners.items() if issubclass(cls, TooManyRequests)} == {
        c for c, s in STATUS_BY_CODE.items() if s == 429
    }


def test_a_code_is_refused_by_a_class_it_does_not_belong_to_and_unknown_codes_are_refused():
    with pytest.raises(TypeError, match="InConflict"):
        NotFound("conflict", "m")
    with pytest.raises(ValueError, match="no error code"):
        ProxyError("teapot", "m")
    with pytest.raises(TypeError, match="belongs to"):

        class Twice(errors.ProxyError, codes={"not_found": 404}):
            pass


def test_callers_catch_by_class():
    with pytest.raises(Unauthenticated) as caught:
        raise ProxyError("invalid_token", "m", headers={"WWW-Authenticate": "Bearer"})
    assert isinstance(caught.value, WrongCredential) and caught.value.headers
    with pytest.raises(TooManyRequests):
        raise ProxyError("no_capacity", "m")


def test_the_body_is_the_contracts_shape_whatever_the_class():
    error = errors.invalid("email", "must be an email address", "Send yours.")
    assert isinstance(error, BadRequest)
    assert orjson.loads(error.body()) == {
        "error": {
            "code": "invalid_request",
            "message": "Field 'email' must be an email address.",
            "param": "email",
            "details": [
                {"field": "email", "problem": "must be an email address", "fix": "Send yours."}
            ],
            "status": 400,
        }
    }
    assert ProxyError("no_capacity", "busy").body() == (
        b'{"error":{"code":"no_capacity","message":"busy","status":429}}'
    )
