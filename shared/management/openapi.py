"""The OpenAPI 3.1 document of the app, served at GET /api/openapi.json, generated from the route
table (shared/management/routes.py) and the pydantic models it names: no schema is written here.
Pydantic writes JSON Schema 2020-12, the dialect of OpenAPI 3.1, so the schemas go in as they are.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, get_args, get_origin

import orjson
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from shared.management.routing import ATTENDEE, MANAGER, Endpoint, Query, Route
from shared.pipeline.shapes import Error, UpstreamError
from shared.web.registration import endpoint_of

Schema = dict[str, Any]
_REF = "#/components/schemas/{model}"

_ERROR_TEXT = {
    400: "Invalid request: the message and `param` name the field (`content_filter`: refused "
    "by a request plugin)",
    401: "Missing or wrong key, or an Entra ID token refused (WWW-Authenticate says why)",
    403: (
        "Refused: outside the event window, switched off, registration refused, or a valid "
        "Entra ID token of someone who is not an organiser"
    ),
    404: "Not found (or not yours)",
    409: "Conflict: still in use; the message says what to do",
    413: "Body too large",
    429: (
        "A cap, a per-minute limit or the capacity is exhausted, or too many wrong keys came "
        "from this address; see Retry-After"
    ),
    502: "The upstream failed, after failover",
    503: (
        "Storage, or the signing keys of the caller's Entra tenant, unavailable; "
        "`plugin_failed`: a request plugin failed or ran out of time"
    ),
    504: "The upstream was too slow, after failover",
}
# Proxy errors an upstream may answer itself (any status it does not fail over on): the caller
# gets the upstream's status and body, in the upstream's shape.
_PASSED_THROUGH = (400, 401, 403, 404, 413)
_PARAMETERS = {
    "event_id": "the event's id",
    "resource_id": "the resource's id",
    "attendee_id": "the attendee's id",
    "deployment": "the deployment name in the event's catalog",
    "model": "a deployment name in the event's catalog",
    "index": "the search index name in the event's catalog",
    "file": "a file's path under pages/, e.g. vendor/marked.min.js (may hold '/')",
    "response_id": "a response id as this proxy answered it (only the key that made it)",
}
_EVENT_HEADER: Schema = {
    "name": "x-aiproxy-event",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": (
        "with an Entra ID token: the event it is for; needed only when several events running "
        "now take the token's tenant"
    ),
}
_SECURITY = {
    MANAGER: [{"operatorKey": []}, {"entraToken": []}],
    ATTENDEE: [{"apiKey": []}, {"bearer": []}],
}
_SECURITY_SCHEMES: Schema = {
    "operatorKey": {
        "type": "apiKey",
        "in": "header",
        "name": "x-aiproxy-operator-key",
        "description": (
            "The operator key (app setting AIPROXY_OPERATOR_KEY): every event and resource. "
            "A wrong key counts toward the failed-key lock-out"
        ),
    },
    "entraToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": (
            "An organiser's Entra ID access token for the app registration "
            "(AIPROXY_ENTRA_ORGANIZER_AUDIENCE): their own events and resources; a principal "
            "with an operator role or group is the operator. Behind App Service authentication "
            "its session cookie works as well"
        ),
    },
    "apiKey": {"type": "apiKey", "in": "header", "name": "api-key"},
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": (
            "Authorization: Bearer <event key>, or an Entra ID access token (audience "
            "https://cognitiveservices.azure.com) for events that take its tenant"
        ),
    },
}
_TAGS = [
    {"name": "management", "description": "The operator (operator key) and organisers (Entra ID)"},
    {"name": "proxy", "description": "Azure OpenAI and AI Search, with an event key"},
    {
        "name": "seed",
        "description": (
            "The proxy routes again under /v1, the layout of the AI Proxy this replaces: "
            "AzureOpenAI(azure_endpoint=<base>/v1) works unchanged"
        ),
    },
    {"name": "mcp", "description": "The event's MCP servers (streamable HTTP), with an event key"},
    {"name": "attendees", "description": "Event info and self-registration"},
    {"name": "pages", "description": "Web pages"},
    {"name": "operations", "description": "Health and this document"},
]
_DESCRIPTION = (
    "A serverless Azure OpenAI proxy for events. Organisers manage events, resources, catalogs "
    "and attendees under manage/: the operator with the operator key (every event and "
    "resource), organisers with an Entra ID token or the App Service sign-in (their own events "
    "and resources). Attendees call the OpenAI routes with their event key, exactly as they "
    "would call Azure OpenAI."
)

_TEMPLATE = re.compile(r"\{\*?([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?\??\}")


def openapi_path(route: str) -> str:
    """A Functions route template ({x}, {*x}, {x:int}, {x?}) as an OpenAPI path."""
    return "/" + _TEMPLATE.sub(r"{\1}", route.strip("/"))


class _Schemas(GenerateJsonSchema):
    """Pydantic's JSON schemas, each named by its model's title (its class name unless the
    model says otherwise), without the titles pydantic makes up for fields."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _model_of(kind: Any) -> Any:
    """The model inside `list[Model]`, or the model itself."""
    return get_args(kind)[0] if get_origin(kind) is list else kind


def _schema_of(kind: Any, refs: dict[Any, Schema]) -> Schema:
    if get_origin(kind) is list:
        return {"type": "array", "items": refs[(get_args(kind)[0], "serialization")]}
    return refs[(kind, "serialization")]


def _components(routes: tuple[Route, ...]) -> tuple[dict[Any, Schema], Schema]:
    """The $ref of each (model, mode) the routes use, and the schemas they point to."""
    used: dict[tuple[Any, str], None] = {
        (Error, "serialization"): None,
        (UpstreamError, "serialization"): None,
    }
    for route in routes:
        for endpoint in route.endpoints:
            if endpoint.body is not None:
                used[(endpoint.body, "validation")] = None
            for answer in endpoint.answers:
                if answer.model is not None:
                    used[(_model_of(answer.model), "serialization")] = None
    refs, defs = models_json_schema(list(used), ref_template=_REF, schema_generator=_Schemas)
    return refs, _tidy(defs.get("$defs", {}))


def _tidy(schema: Any) -> Any:
    """Without the `default: null` of fields that are simply left out when not given."""
    if isinstance(schema, list):
        return [_tidy(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: _tidy(value)
        for key, value in schema.items()
        if not (key == "default" and value is None)
    }


def _query(query: Query) -> Schema:
    from pydantic import TypeAdapter

    schema = TypeAdapter(query.type).json_schema()
    if query.default is not None:
        schema["default"] = query.default
    return {
        "name": query.name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": query.description,
    }


def _operation(route: Route, endpoint: Endpoint, refs: dict[Any, Schema]) -> Schema:
    spec: Schema = {
        "operationId": endpoint.operation_id,
        "summary": endpoint.summary,
        "tags": [route.tag],
    }
    if endpoint.description:
        spec["description"] = endpoint.description
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": _PARAMETERS.get(name, name),
        }
        for name in _TEMPLATE.findall(route.path)
    ]
    parameters += [_query(q) for q in endpoint.query]
    if route.access == ATTENDEE:
        parameters.append(dict(_EVENT_HEADER))
    if parameters:
        spec["parameters"] = parameters
    if endpoint.body is not None:
        spec["requestBody"] = {
            "required": endpoint.body_required,
            "content": {endpoint.body_type: {"schema": refs[(endpoint.body, "validation")]}},
        }
    responses: Schema = {}
    for answer in endpoint.answers:
        described: Schema = {"description": answer.description}
        if answer.types:
            described["content"] = {
                kind: {
                    "schema": _schema_of(answer.model, refs)
                    if kind == "application/json" and answer.model is not None
                    else {"type": "string"}
                }
                for kind in answer.types
            }
        responses[str(answer.status)] = described
    for status in endpoint.errors:
        name = "UpstreamOrError" if route.tag == "proxy" and status in _PASSED_THROUGH else "Error"
        responses.setdefault(str(status), {"$ref": f"#/components/responses/{name}{status}"})
    spec["responses"] = responses
    spec["security"] = _SECURITY.get(route.access, [])
    return spec


@lru_cache(maxsize=4)
def _document(routes: tuple[Route, ...]) -> Schema:
    refs, schemas = _components(routes)
    error = refs[(Error, "serialization")]
    upstream = refs[(UpstreamError, "serialization")]
    paths: Schema = {}
    for route in routes:
        item = paths.setdefault(openapi_path(route.path), {})
        for endpoint in route.endpoints:
            item[endpoint.method.lower()] = _operation(route, endpoint, refs)
    errors = {
        f"Error{status}": {
            "description": text,
            "content": {"application/json": {"schema": error}},
        }
        for status, text in _ERROR_TEXT.items()
    }
    passed = {
        f"UpstreamOrError{status}": {
            "description": f"{_ERROR_TEXT[status]}; or the upstream's own answer",
            "content": {"application/json": {"schema": {"anyOf": [error, upstream]}}},
        }
        for status in _PASSED_THROUGH
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "AI Proxy", "version": "1.0.0", "description": _DESCRIPTION},
        "servers": [{"url": "/api"}],
        "tags": _TAGS,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": errors | passed,
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }


def document(routes: tuple[Route, ...], server_url: str = "/api") -> Schema:
    """The OpenAPI document of `routes`, with the given base URL of the routes."""
    return {**_document(routes), "servers": [{"url": server_url}]}


async def answer(request: Request, routes: tuple[Route, ...]) -> Response:
    """GET /api/openapi.json: the document, with the base URL the caller used."""
    server = endpoint_of(request, "openapi.json")
    return Response(orjson.dumps(document(routes, server)), media_type="application/json")
