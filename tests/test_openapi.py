"""The OpenAPI 3.1 document, generated from the route table, validates; the host indexes exactly
the table's routes; real answers fit the models the document takes its schemas from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import OpenAPIV31SpecValidator

from shared.management.openapi import openapi_path as documented_path
from shared.management.routes import ROUTES
from tests.harness import AppHost, EventSetup, Simulator, window

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


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


def test_the_host_indexes_exactly_the_route_table(host: AppHost) -> None:
    # function_app.py registers the table: each route once, with its methods and auth level.
    table = {Route(documented_path(r.path), frozenset(r.methods), r.auth_level) for r in ROUTES}
    assert set(registered(host)) == table
    assert len(registered(host)) == len(ROUTES) == 87


def test_the_document_describes_every_endpoint_of_the_table(document: dict[str, Any]) -> None:
    table = {(m, documented_path(r.path)) for r in ROUTES for m in r.methods}
    assert documented_routes(document) == table
    assert ("POST", "/indexes('{index}')/docs/search.post.search") in table
    assert ("POST", "/v1/openai/deployments/{deployment}/chat/completions") in table
    assert not any(path.startswith("/v1/manage") for _, path in table)


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    errors = [e.message for e in OpenAPIV31SpecValidator(document).iter_errors()]
    assert not errors, errors[:5]
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    # JSON Schema 2020-12 as pydantic writes it: null as a type, never 3.0's `nullable`.
    assert '"nullable"' not in str(document).replace("'", '"')
    cap = document["components"]["schemas"]["EventCreate"]["properties"]["daily_token_cap"]
    assert cap["type"] == ["integer", "null"]


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
            elif path.startswith(("/openai/", "/indexes", "/v1/", "/mcp/")) or path == "/eventinfo":
                assert names == {"apiKey", "bearer"}, (method, path)
            else:
                assert names == set(), (method, path)
    assert used == set(schemes)  # every scheme is some route's


def test_error_schema_has_the_contract_shape(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["Error"]["required"] == ["error"]
    error = schemas[schemas["Error"]["properties"]["error"]["$ref"].rsplit("/", 1)[1]]
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


def _validator(document: dict[str, Any], name: str) -> OAS31Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return OAS31Validator(schema)


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
    _assert_described(document, "EventView", host.manage.get(f"/events/{event.id}").json())
    _assert_described(document, "PublicEvent", host.http.get(f"/events/{event.id}").json())
    resource = host.manage.get(f"/resources/{next(iter(event.resources))}").json()
    _assert_described(document, "ResourceView", resource)
    _assert_described(document, "AttendeeWithKeyView", event.attendee)
    key = {"api-key": event.key}
    assert host.http.post(CHAT, json=HELLO, headers=key).status_code == 200
    for attendee in host.manage.get(f"/events/{event.id}/attendees").json():
        _assert_described(document, "AttendeeWithTotals", attendee)
    info = host.http.get("/eventinfo", headers=key).json()
    _assert_described(document, "EventInfo", info)
    models = host.http.get("/openai/v1/models", headers=key).json()
    _assert_described(document, "ModelList", models)
    for model in models["data"]:
        _assert_described(document, "Model", model)
    for group_by in ("attendee", "deployment", "day", "hour"):
        report = host.manage.get(f"/events/{event.id}/usage", params={"group_by": group_by})
        _assert_described(document, "UsageReport", report.json())
        for row in report.json()["rows"]:
            _assert_described(document, "UsageRow", row)
        _assert_described(document, "UsageTotals", report.json()["totals"])
    _assert_described(document, "Health", host.http.get("/health").json())
    missing = host.manage.get("/events/nosuchevent").json()
    _assert_described(document, "Error", missing)
    body = {"name": 5, **window(), "max_token_cap": 1, "daily_request_cap": 1}
    invalid = host.manage.post("/events", json=body).json()
    _assert_described(document, "Error", invalid)
    assert invalid["error"]["param"] == "name"


def test_a_registration_answer_fits_its_schema(
    host: AppHost, sim: Simulator, document: dict[str, Any]
) -> None:
    setup = EventSetup(host, sim, shared_code="fits-the-schema")
    answer = host.http.post(
        f"/events/{setup.id}/register",
        json={"email": "schema@example.com", "shared_code": "fits-the-schema"},
    )
    assert answer.status_code == 201, answer.text
    _assert_described(document, "Registered", answer.json())
    _assert_described(document, "PublicEventFields", answer.json()["event"])
