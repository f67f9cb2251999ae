"""The OpenAPI document describes exactly the routes the app registers, and validates."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from tests.harness import AppHost, EventSetup, window


@dataclass(frozen=True)
class Route:
    """One registered HTTP function: its OpenAPI-style path, methods and auth level."""

    path: str
    methods: frozenset[str]
    auth_level: str


def openapi_path(route: str) -> str:
    """A Functions route template ({x}, {*x}, {x:int}, {x?}) as an OpenAPI path."""
    return "/" + re.sub(r"\{\*?([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?\??\}", r"{\1}", route)


def registered(host: AppHost) -> tuple[Route, ...]:
    """The app's HTTP functions as the worker indexed them (the host's status API)."""
    return tuple(
        Route(openapi_path(f["route"] or f["name"]), frozenset(f["methods"]), f["auth_level"])
        for f in host.status()["functions"]
        if f["trigger"] == "httpTrigger"
    )


def registered_routes(host: AppHost) -> set[tuple[str, str]]:
    """(METHOD, OpenAPI path) of every HTTP function of function_app."""
    return {(method, route.path) for route in registered(host) for method in route.methods}


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }


@pytest.fixture(scope="module")
def document(host: AppHost) -> dict[str, Any]:
    response = host.http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def test_every_registered_route_is_documented_and_nothing_else(
    host: AppHost, document: dict[str, Any]
) -> None:
    registered, documented = registered_routes(host), documented_routes(document)
    missing = sorted(registered - documented)
    extra = sorted(documented - registered)
    assert not missing, "routes missing from shared/management/openapi.py OPERATIONS: " + ", ".join(
        f"{method} {path}" for method, path in missing
    )
    assert not extra, "documented routes the app does not register: " + ", ".join(
        f"{method} {path}" for method, path in extra
    )
    assert ("POST", "/indexes('{index}')/docs/search.post.search") in documented
    assert ("POST", "/events/{event_id}/register") in documented
    assert len(registered) >= 30


def test_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.")
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_servers_url_is_the_proxy_base_the_caller_used(
    host: AppHost, document: dict[str, Any]
) -> None:
    assert document["servers"] == [{"url": host.base}]
    forwarded = host.http.get(
        "/openapi.json",
        headers={"x-forwarded-proto": "https", "x-forwarded-host": "proxy.example.org"},
    )
    assert forwarded.json()["servers"] == [{"url": "https://proxy.example.org/api"}]


def test_security_schemes_match_the_keys_each_route_takes(
    host: AppHost, document: dict[str, Any]
) -> None:
    # The host asks no function key of any route: the app decides who calls, as documented.
    assert {route.auth_level for route in registered(host)} == {"anonymous"}
    schemes = document["components"]["securitySchemes"]
    # manage/*: the operator key or an organiser's token; no route takes the function key.
    operator = schemes["operatorKey"]
    assert (operator["type"], operator["in"], operator["name"]) == (
        "apiKey",
        "header",
        "x-aiproxy-operator-key",
    )
    assert "AIPROXY_OPERATOR_KEY" in operator["description"]
    assert schemes["entraToken"]["type"] == "http" and schemes["entraToken"]["scheme"] == "bearer"
    assert not any(s.get("name") in ("x-functions-key", "code") for s in schemes.values())
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "api-key"}
    assert schemes["bearer"]["scheme"] == "bearer"
    used: set[str] = set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            names = {name for option in operation["security"] for name in option}
            used |= names
            # Either credential alone opens a manage/* route: two alternatives, not one pair.
            if path.startswith("/manage/"):
                assert operation["security"] == [{"operatorKey": []}, {"entraToken": []}]
                assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)
            elif path.startswith(("/openai/", "/indexes", "/v1/")) or path == "/eventinfo":
                assert names == {"apiKey", "bearer"}, (method, path)
            else:
                assert names == set(), (method, path)
    assert used == set(schemes)  # every scheme is some route's


def test_error_schema_has_the_contract_shape(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["required"]) == {"code", "message", "status"}
    assert set(error["properties"]) == {"code", "message", "status", "param", "details"}
    assert {"invalid_request", "registration_refused", "conflict"} <= set(
        error["properties"]["code"]["enum"]
    )
    create = document["paths"]["/manage/events"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EventCreate"
    }
    assert create["responses"]["400"] == {"$ref": "#/components/responses/Error400"}
    delete = document["paths"]["/manage/events/{event_id}"]["delete"]
    assert {"204", "401", "404", "409"} <= set(delete["responses"])


def _validator(document: dict[str, Any], name: str) -> OAS30Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return OAS30Validator(schema)


def _assert_described(document: dict[str, Any], name: str, data: dict[str, Any]) -> None:
    """The answer fits the schema, and every field it carries is described."""
    errors = [e.message for e in _validator(document, name).iter_errors(data)]
    assert not errors, (name, errors)
    schema = document["components"]["schemas"][name]
    described: set[str] = set()
    for part in schema.get("allOf", [schema]):
        target = part
        if "$ref" in part:
            target = document["components"]["schemas"][part["$ref"].rsplit("/", 1)[1]]
        described |= set(target.get("properties", {}))
    assert set(data) <= described, (name, sorted(set(data) - described))


def test_real_answers_fit_their_schemas(
    host: AppHost, event: EventSetup, document: dict[str, Any]
) -> None:
    _assert_described(document, "Event", host.manage.get(f"/events/{event.id}").json())
    _assert_described(document, "PublicEvent", host.http.get(f"/events/{event.id}").json())
    resource = host.manage.get(f"/resources/{next(iter(event.resources))}").json()
    _assert_described(document, "Resource", resource)
    _assert_described(document, "AttendeeWithKey", event.attendee)
    for attendee in host.manage.get(f"/events/{event.id}/attendees").json():
        _assert_described(document, "Attendee", attendee)
    info = host.http.get("/eventinfo", headers={"api-key": event.key}).json()
    _assert_described(document, "EventInfo", info)
    _assert_described(document, "Health", host.http.get("/health").json())
    missing = host.manage.get("/events/nosuchevent").json()
    _assert_described(document, "Error", missing)
    body = {"name": 5, **window(), "max_token_cap": 1, "daily_request_cap": 1}
    invalid = host.manage.post("/events", json=body).json()
    _assert_described(document, "Error", invalid)
    assert invalid["error"]["param"] == "name"
