"""The OpenAPI 3 description of the app's HTTP routes, served at GET /api/openapi.json.

The paths come from OPERATIONS, one row per route and method; tests/test_openapi.py checks it
against the routes function_app registers. A new route needs a row here (use the helpers
`manage`, `proxy`, `anonymous` and `page`). The schemas of the management bodies and answers
come from their models (shared/directory/models.py, listed in _MODELS); any other new body or
answer shape needs a schema in SCHEMAS.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from shared.directory import models
from shared.directory.models import MODEL_CLASSES
from shared.errors import STATUS_BY_CODE
from shared.governance.rollups import GROUPS, REFUSALS
from shared.web import registration
from shared.web.registration import endpoint_of

Schema = dict[str, Any]

OPERATOR_OR_ORGANISER = "manager"  # manage/*: the operator key, or an Entra token
ATTENDEE_KEY = "attendee"  # proxy routes: the event key, header api-key or Authorization: Bearer
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Operation:
    """One route and method of the app, as the document describes it."""

    method: str
    route: str  # the route template as registered, without the route prefix
    operation_id: str
    summary: str
    tag: str
    security: str
    body: str | None = None  # schema name of the request body
    body_type: str = "application/json"
    answer: str | None = None  # schema name of the success answer; None: no content
    status: int = 200
    answer_types: tuple[str, ...] = ("application/json",)
    errors: tuple[int, ...] = ()
    query: tuple[Schema, ...] = ()
    description: str = ""
    also: dict[int, str] = field(default_factory=dict)  # more success answers: status -> text


# --- schemas ------------------------------------------------------------------------------


def _string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def _integer(description: str, minimum: int = 0) -> Schema:
    return {"type": "integer", "minimum": minimum, "description": description}


def _boolean(description: str) -> Schema:
    return {"type": "boolean", "description": description}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


def _openapi30(schema: Any, *, answer: bool) -> Any:
    """A pydantic JSON schema (draft 2020-12) in the OpenAPI 3.0 dialect this document declares:
    `nullable` for a null branch, `allOf` around a `$ref` with siblings, `enum` for `const`, no
    titles; answers also without defaults (they always carry every field)."""
    if isinstance(schema, list):
        return [_openapi30(item, answer=answer) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: Schema = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _openapi30(spec, answer=answer) for name, spec in value.items()}
        elif not (key == "title" or (key == "default" and answer)):
            out[key] = _openapi30(value, answer=answer)
    branches = out.pop("anyOf", None)
    if branches is not None:
        kept = [branch for branch in branches if branch != {"type": "null"}]
        if len(kept) < len(branches):
            out["nullable"] = True
        out = {**kept[0], **out} if len(kept) == 1 else {**out, "anyOf": kept}
    if "$ref" in out and len(out) > 1:
        out = {"allOf": [{"$ref": out.pop("$ref")}], **out}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    return out


# Component name -> the model that describes it, and whether it is an answer (else a body).
_MODELS: tuple[tuple[str, type[BaseModel], bool], ...] = (
    ("EventCreate", models.EventCreate, False),
    ("Event", models.EventView, True),
    ("PublicEvent", models.PublicEventView, True),
    ("ResourceCreate", models.ResourceCreate, False),
    ("Resource", models.ResourceView, True),
    ("AttendeeCreate", models.AttendeeCreate, False),
    ("Attendee", models.AttendeeView, True),
    ("AttendeeWithKey", models.AttendeeWithKeyView, True),
    ("RegistrationRequest", registration.RegistrationRequest, False),
)


def _from_models() -> dict[str, Schema]:
    """The schemas of the management bodies (as validated) and answers (as sent)."""
    found: dict[str, Schema] = {}
    for name, model, answer in _MODELS:
        mode = "serialization" if answer else "validation"
        schema = model.model_json_schema(mode=mode, ref_template="#/components/schemas/{model}")
        for nested, spec in schema.pop("$defs", {}).items():
            found[nested] = _openapi30(spec, answer=answer)
        found[name] = _openapi30(schema, answer=answer)
    return found


def _patch(create: Schema) -> Schema:
    """A patch body: the create body's fields, none required and none defaulted."""
    properties = {
        name: {key: value for key, value in spec.items() if key != "default"}
        for name, spec in create["properties"].items()
    }
    return {**{k: v for k, v in create.items() if k != "required"}, "properties": properties}


_FROM_MODELS = _from_models()
_EVENT_FIELDS = _FROM_MODELS["EventCreate"]["properties"]
_USAGE_NUMBERS: dict[str, Schema] = {
    "requests": _integer("requests answered"),
    "prompt_tokens": _integer("prompt tokens"),
    "completion_tokens": _integer("completion tokens"),
    "total_tokens": _integer("prompt plus completion tokens"),
    "units": _integer("images, audio seconds or searches, for models not counted in tokens"),
}
_USAGE_EXTRAS: dict[str, Schema] = {
    "refused": _object(
        {reason: _integer(f"calls refused: {reason.replace('_', ' ')}") for reason in REFUSALS},
        REFUSALS,
        description="group_by=attendee and day: calls refused (429) by reason",
    ),
    "active_attendees": _integer("group_by=hour: attendees who made calls in the hour"),
    "new_attendees": _integer("group_by=hour: attendees whose first call was in the hour"),
}
_OPENAI_ANSWER = _object(
    {}, additionalProperties=True, description="The upstream's answer, passed through unchanged"
)

SCHEMAS: dict[str, Schema] = {
    "Error": _object(
        {
            "error": _object(
                {
                    "code": {"type": "string", "enum": sorted(STATUS_BY_CODE)},
                    "message": _string("what went wrong and how to fix it"),
                    "status": _integer("the HTTP status", 400),
                    "param": _string("the request field at fault, when there is one"),
                    "details": {
                        "type": "array",
                        "description": "every bad field of a management body, the first "
                        "being `param` (docs/api.md#errors)",
                        "items": _object(
                            {
                                "field": _string("the field"),
                                "problem": _string("what is wrong with it"),
                                "fix": _string("what to send instead"),
                            },
                            ("field", "problem", "fix"),
                        ),
                    },
                },
                ("code", "message", "status"),
            )
        },
        ("error",),
        description="Every error the proxy produces itself (docs/api.md#errors)",
    ),
    **_FROM_MODELS,
    "EventPatch": _patch(_FROM_MODELS["EventCreate"]),
    "ResourcePatch": _patch(_FROM_MODELS["ResourceCreate"]),
    "Attendee": {
        **_FROM_MODELS["Attendee"],
        "properties": {**_FROM_MODELS["Attendee"]["properties"], **_USAGE_NUMBERS},
        "description": "One person's access to one event; in lists, with their totals",
    },
    "CatalogEntry": _object(
        {"event_id": _string("the event"), "resource": _ref("Resource")},
        ("event_id", "resource"),
    ),
    "UsageReport": _object(
        {
            "event_id": _string("the event"),
            "group_by": {"type": "string", "enum": list(GROUPS)},
            "rows": {
                "type": "array",
                "items": _object(
                    {
                        "attendee_id": _string("group_by=attendee"),
                        "user": _string("group_by=attendee"),
                        "deployment": _string("group_by=deployment"),
                        "day": _string("group_by=day: YYYY-MM-DD in the event's time zone"),
                        "hour": _string("group_by=hour: the hour's start, UTC", format="date-time"),
                        **_USAGE_NUMBERS,
                        **_USAGE_EXTRAS,
                    },
                    tuple(_USAGE_NUMBERS),
                ),
            },
            "totals": _object({**_USAGE_NUMBERS, **_USAGE_EXTRAS}, tuple(_USAGE_NUMBERS)),
        },
        ("event_id", "group_by", "rows", "totals"),
    ),
    "Registration": _object(
        {
            "api_key": _string("your key for this event"),
            "endpoint": _string("the base URL for the SDKs (azure_endpoint)", format="uri"),
            "attendee_id": _string("your attendee id"),
            "user": _string("your attendee name"),
            "event": _ref("PublicEvent"),
        },
        ("api_key", "endpoint", "attendee_id", "event"),
    ),
    "EventInfo": {
        "allOf": [
            _ref("PublicEvent"),
            _object(
                {
                    "status": {"type": "string", "enum": ["upcoming", "live", "ended", "inactive"]},
                    "today": _object(
                        {
                            "date": _string("today in the event's time zone, YYYYMMDD"),
                            "requests_used": _integer("requests made today"),
                            "requests_left": _integer("requests left today"),
                            "tokens_used": _integer("tokens used today"),
                            "tokens_left": {
                                **_integer("tokens left today; null without a token cap"),
                                "nullable": True,
                            },
                            "resets_in_seconds": _integer("seconds to the next local midnight"),
                        },
                        description="this key's use of today's caps",
                    ),
                    "attendee": _object({"id": _string("attendee id"), "user": _string("name")}),
                    "max_token_cap": _EVENT_FIELDS["max_token_cap"],
                    "daily_request_cap": _EVENT_FIELDS["daily_request_cap"],
                    "daily_token_cap": _EVENT_FIELDS["daily_token_cap"],
                    "event_daily_request_cap": _EVENT_FIELDS["event_daily_request_cap"],
                    "event_daily_token_cap": _EVENT_FIELDS["event_daily_token_cap"],
                    "requests_per_minute": _EVENT_FIELDS["requests_per_minute"],
                    "tokens_per_minute": _EVENT_FIELDS["tokens_per_minute"],
                    "deployments": _object(
                        {},
                        additionalProperties={"type": "array", "items": {"type": "string"}},
                        description="model class -> deployment names this key may use",
                    ),
                },
                ("status", "deployments"),
            ),
        ]
    },
    "Health": _object(
        {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "storage": _string(
                "'ok'; 'unavailable' when storage does not answer, 'error' when the check failed "
                "otherwise (the reason is in the app's log)",
                enum=["ok", "unavailable", "error"],
            ),
            "usage_pending": _integer("usage records waiting to be written"),
        },
        ("status", "storage"),
    ),
    "ChatCompletionRequest": _object(
        {
            "messages": {"type": "array", "items": {"type": "object"}},
            "model": _string("the deployment (OpenAI v1 paths); ignored on deployments paths"),
            "stream": _boolean("answer as server-sent events"),
            "max_tokens": _integer("at most the event's max_token_cap", 1),
            "max_completion_tokens": _integer("at most the event's max_token_cap", 1),
        },
        ("messages",),
        additionalProperties=True,
    ),
    "CompletionRequest": _object(
        {
            "prompt": {"oneOf": [{"type": "string"}, {"type": "array"}]},
            "model": _string("the deployment (OpenAI v1 paths)"),
            "stream": _boolean("answer as server-sent events"),
            "max_tokens": _integer("at most the event's max_token_cap", 1),
        },
        additionalProperties=True,
    ),
    "EmbeddingRequest": _object(
        {
            "input": {"oneOf": [{"type": "string"}, {"type": "array"}]},
            "model": _string("the deployment (OpenAI v1 paths)"),
        },
        ("input",),
        additionalProperties=True,
    ),
    "ImageRequest": _object(
        {
            "prompt": _string("what to draw"),
            "model": _string("the deployment (OpenAI v1 paths)"),
            "n": _integer("how many images", 1),
            "size": _string("e.g. 1024x1024"),
        },
        ("prompt",),
        additionalProperties=True,
    ),
    "TranscriptionRequest": _object(
        {
            "file": _string("the audio file", format="binary"),
            "model": _string("the deployment"),
            "language": _string("ISO-639-1 code"),
            "response_format": _string("json, text, srt, verbose_json or vtt"),
        },
        ("file",),
        additionalProperties=True,
    ),
    "SpeechRequest": _object(
        {
            "input": _string("the text to say", maxLength=4096),
            "voice": _string("alloy, echo, fable, onyx, nova, shimmer, …"),
            "model": _string("the deployment (OpenAI v1 paths)"),
            "response_format": _string("mp3 (default), opus, aac, flac, wav or pcm"),
        },
        ("input", "voice"),
        additionalProperties=True,
        description="Metered in characters of input",
    ),
    "ResponseRequest": _object(
        {
            "model": _string("the deployment"),
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {}}]},
            "instructions": _string("a system message"),
            "previous_response_id": _string(
                "an id this proxy answered to this key: the call goes where that response is"
            ),
            "max_output_tokens": _integer("at most the event's max_token_cap", 1),
            "stream": _boolean("answer as server-sent events"),
            "background": _boolean("answer at once; poll GET /responses/{response_id}"),
            "store": _boolean("keep the response upstream (default true)"),
        },
        ("model",),
        additionalProperties=True,
    ),
    "SearchRequest": _object(
        {"search": _string("the query text"), "top": _integer("how many results", 1)},
        additionalProperties=True,
        description="An Azure AI Search query, passed through",
    ),
    "Model": _object(
        {
            "id": _string("the deployment name to send as model"),
            "object": {"type": "string", "enum": ["model"]},
            "created": _integer("when its first resource was added, Unix seconds"),
            "owned_by": _string("always aiproxy"),
            "model_class": {"type": "string", "enum": list(MODEL_CLASSES)},
            "capabilities": _object(
                {}, additionalProperties={"type": "boolean"}, description="what it can do"
            ),
        },
        ("id", "object", "created", "owned_by"),
        description="A deployment of the event's catalog",
    ),
    "ModelList": _object(
        {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _ref("Model")},
        },
        ("object", "data"),
    ),
    "OpenAIAnswer": _OPENAI_ANSWER,
    "UpstreamError": _object(
        {"error": _object({}, additionalProperties=True)},
        ("error",),
        additionalProperties=True,
        description="The upstream's own error answer, passed through unchanged (docs/api.md#proxy-routes)",
    ),
}

# --- responses and parameters ---------------------------------------------------------------

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
_PARAMETERS: dict[str, str] = {
    "event_id": "the event's id",
    "resource_id": "the resource's id",
    "attendee_id": "the attendee's id",
    "deployment": "the deployment name in the event's catalog",
    "model": "a deployment name in the event's catalog",
    "index": "the search index name in the event's catalog",
    "file": "a file's path under pages/, e.g. vendor/marked.min.js (may hold '/')",
    "response_id": "a response id as this proxy answered it (only the key that made it)",
}
_API_VERSION: Schema = {
    "name": "api-version",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "forwarded upstream; the configured default when missing",
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
_FORCE: Schema = {
    "name": "force",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean", "default": False},
    "description": "true also deletes the event's attendees and their keys",
}
_USAGE_QUERY: tuple[Schema, ...] = (
    {
        "name": "group_by",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": list(GROUPS)},
    },
    {
        "name": "format",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["json", "csv"], "default": "json"},
    },
)

# --- the table of routes --------------------------------------------------------------------


def manage(method: str, route: str, operation_id: str, summary: str, **kw: Any) -> Operation:
    """A manage/* route: operator key or organiser token; 401 without one (429 after too many
    wrong keys), 404 for unknown ids (or another organiser's), 400 for bad bodies."""
    errors = {401, 403, 429, 503, *kw.pop("errors", ())}
    if "{" in route:
        errors.add(404)
    if kw.get("body") or kw.get("query"):
        errors.add(400)
    return Operation(
        method,
        f"manage/{route}",
        operation_id,
        summary,
        "management",
        OPERATOR_OR_ORGANISER,
        errors=tuple(sorted(errors)),
        **kw,
    )


_PROXY_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)


def proxy(route: str, operation_id: str, summary: str, body: str, **kw: Any) -> Operation:
    """A proxy route: attendee key; the upstream's answer comes back as it is."""
    query = kw.pop("query", (_API_VERSION,))
    return Operation(
        "POST",
        route,
        operation_id,
        summary,
        "proxy",
        ATTENDEE_KEY,
        body=body,
        answer="OpenAIAnswer",
        errors=_PROXY_ERRORS,
        query=query,
        **kw,
    )


_GET_RESPONSE = "A response, from the member that holds it; ?stream=true replays its events"
_DELETE = "Delete a stored response"
_ITEMS = "The input items of a response"
_CANCEL = "Cancel a background response"


def response_by_id(method: str, route: str, operation_id: str, summary: str) -> Operation:
    """A call on a stored response: attendee key; 404 for an id that is not this key's."""
    return Operation(
        method,
        route,
        operation_id,
        summary,
        "proxy",
        ATTENDEE_KEY,
        answer="OpenAIAnswer",
        answer_types=_STREAMS if method == "GET" and "input_items" not in route else _JSON,
        errors=_PROXY_ERRORS,
        query=() if route.startswith("openai/v1/") else (_API_VERSION,),
    )


def catalog(route: str, operation_id: str, summary: str, answer: str) -> Operation:
    """A GET of the event's catalog as models: attendee key; 404 for a model not in it."""
    return Operation(
        "GET",
        route,
        operation_id,
        summary,
        "proxy",
        ATTENDEE_KEY,
        answer=answer,
        errors=(401, 404, 429, 503) if "{" in route else (401, 429, 503),
        query=() if route.startswith("openai/v1/") else (_API_VERSION,),
    )


def anonymous(method: str, route: str, operation_id: str, summary: str, **kw: Any) -> Operation:
    return Operation(
        method, route, operation_id, summary, kw.pop("tag", "attendees"), ANONYMOUS, **kw
    )


def page(route: str, operation_id: str, summary: str) -> Operation:
    """A web page: anonymous, HTML."""
    return Operation(
        "GET",
        route,
        operation_id,
        summary,
        "pages",
        ANONYMOUS,
        answer="",
        answer_types=("text/html",),
    )


_JSON = ("application/json",)
_STREAMS = ("application/json", "text/event-stream")
_AUDIO = ("audio/mpeg", "audio/wav", "application/octet-stream")

OPERATIONS: list[Operation] = [
    # management: events
    manage("GET", "events", "listEvents", "List events (an owner sees its own)", answer="Event[]"),
    manage(
        "POST",
        "events",
        "createEvent",
        "Create an event",
        body="EventCreate",
        answer="Event",
        status=201,
    ),
    manage("GET", "events/{event_id}", "getEvent", "One event", answer="Event"),
    manage(
        "PATCH",
        "events/{event_id}",
        "updateEvent",
        "Change an event",
        body="EventPatch",
        answer="Event",
    ),
    manage(
        "DELETE",
        "events/{event_id}",
        "deleteEvent",
        "Delete an event; 409 while it has attendees, unless force=true",
        status=204,
        query=(_FORCE,),
        errors=(409,),
    ),
    # management: resources
    manage(
        "GET",
        "resources",
        "listResources",
        "List resources, never with secrets",
        answer="Resource[]",
    ),
    manage(
        "POST",
        "resources",
        "createResource",
        "Add an upstream deployment; api_key is write-only",
        body="ResourceCreate",
        answer="Resource",
        status=201,
    ),
    manage("GET", "resources/{resource_id}", "getResource", "One resource", answer="Resource"),
    manage(
        "PATCH",
        "resources/{resource_id}",
        "updateResource",
        "Change a resource",
        body="ResourcePatch",
        answer="Resource",
    ),
    manage(
        "DELETE",
        "resources/{resource_id}",
        "deleteResource",
        "Delete a resource; 409 while an event's catalog holds it",
        status=204,
        errors=(409,),
    ),
    # management: catalogs
    manage(
        "GET",
        "events/{event_id}/resources",
        "listCatalog",
        "The event's catalog",
        answer="Resource[]",
    ),
    manage(
        "PUT",
        "events/{event_id}/resources/{resource_id}",
        "attachResource",
        "Add a resource to the event's catalog",
        answer="CatalogEntry",
    ),
    manage(
        "DELETE",
        "events/{event_id}/resources/{resource_id}",
        "detachResource",
        "Take a resource out of the event's catalog",
        status=204,
    ),
    # management: attendees and usage
    manage(
        "GET",
        "events/{event_id}/attendees",
        "listAttendees",
        "The event's attendees with their totals, without keys",
        answer="Attendee[]",
    ),
    manage(
        "POST",
        "events/{event_id}/attendees",
        "addAttendee",
        "Issue a key to a user; the same user again gets the same attendee (200)",
        body="AttendeeCreate",
        answer="AttendeeWithKey",
        status=201,
        also={200: "The user already had a key: the same attendee and key"},
    ),
    manage(
        "GET",
        "events/{event_id}/attendees/{attendee_id}",
        "getAttendee",
        "One attendee, with its key",
        answer="AttendeeWithKey",
    ),
    manage(
        "DELETE",
        "events/{event_id}/attendees/{attendee_id}",
        "revokeAttendee",
        "Revoke the attendee's key (every instance refuses it within the cache TTL)",
        answer="Attendee",
    ),
    manage(
        "POST",
        "events/{event_id}/attendees/{attendee_id}/rotate",
        "rotateAttendeeKey",
        "A new key for the attendee; the old one stops working",
        answer="AttendeeWithKey",
    ),
    manage(
        "GET",
        "events/{event_id}/usage",
        "usageReport",
        "Usage totals by attendee, deployment or day",
        answer="UsageReport",
        answer_types=("application/json", "text/csv"),
        query=_USAGE_QUERY,
    ),
    # proxy: Azure OpenAI deployments paths
    proxy(
        "openai/deployments/{deployment}/chat/completions",
        "chatCompletions",
        "Chat completions (Azure OpenAI path)",
        "ChatCompletionRequest",
        answer_types=_STREAMS,
    ),
    proxy(
        "openai/deployments/{deployment}/extensions/chat/completions",
        "extensionsChatCompletions",
        "Chat completions on your data (legacy path)",
        "ChatCompletionRequest",
        answer_types=_STREAMS,
    ),
    proxy(
        "openai/deployments/{deployment}/completions",
        "completions",
        "Completions (Azure OpenAI path)",
        "CompletionRequest",
        answer_types=_STREAMS,
    ),
    proxy(
        "openai/deployments/{deployment}/embeddings",
        "embeddings",
        "Embeddings (Azure OpenAI path)",
        "EmbeddingRequest",
    ),
    proxy(
        "openai/deployments/{deployment}/images/generations",
        "imageGenerations",
        "Image generations (Azure OpenAI path)",
        "ImageRequest",
    ),
    proxy(
        "openai/deployments/{deployment}/audio/transcriptions",
        "audioTranscriptions",
        "Audio transcriptions (multipart), metered in seconds",
        "TranscriptionRequest",
        body_type="multipart/form-data",
    ),
    proxy(
        "openai/deployments/{deployment}/audio/translations",
        "audioTranslations",
        "Audio translations to English (multipart), metered in seconds",
        "TranscriptionRequest",
        body_type="multipart/form-data",
    ),
    proxy(
        "openai/deployments/{deployment}/audio/speech",
        "audioSpeech",
        "Text to speech: the audio streamed through, metered in characters",
        "SpeechRequest",
        answer_types=_AUDIO,
    ),
    # proxy: OpenAI v1 paths, the deployment is the body's model
    proxy(
        "openai/v1/chat/completions",
        "v1ChatCompletions",
        "Chat completions (OpenAI v1 path; model = deployment)",
        "ChatCompletionRequest",
        answer_types=_STREAMS,
        query=(),
    ),
    proxy(
        "openai/v1/completions",
        "v1Completions",
        "Completions (OpenAI v1 path)",
        "CompletionRequest",
        answer_types=_STREAMS,
        query=(),
    ),
    proxy(
        "openai/v1/embeddings",
        "v1Embeddings",
        "Embeddings (OpenAI v1 path)",
        "EmbeddingRequest",
        query=(),
    ),
    proxy(
        "openai/v1/images/generations",
        "v1ImageGenerations",
        "Image generations (OpenAI v1 path)",
        "ImageRequest",
        query=(),
    ),
    proxy(
        "openai/v1/audio/transcriptions",
        "v1AudioTranscriptions",
        "Audio transcriptions (OpenAI v1 path; the form's model = deployment)",
        "TranscriptionRequest",
        body_type="multipart/form-data",
        query=(),
    ),
    proxy(
        "openai/v1/audio/translations",
        "v1AudioTranslations",
        "Audio translations (OpenAI v1 path)",
        "TranscriptionRequest",
        body_type="multipart/form-data",
        query=(),
    ),
    proxy(
        "openai/v1/audio/speech",
        "v1AudioSpeech",
        "Text to speech (OpenAI v1 path)",
        "SpeechRequest",
        answer_types=_AUDIO,
        query=(),
    ),
    # proxy: the Responses API; calls by id reach the member that holds the response
    proxy(
        "openai/responses",
        "createResponse",
        "Create a response (AzureOpenAI path, api-version 2025-03-01-preview or later)",
        "ResponseRequest",
        answer_types=_STREAMS,
    ),
    proxy(
        "openai/v1/responses",
        "v1CreateResponse",
        "Create a response (OpenAI v1 path)",
        "ResponseRequest",
        answer_types=_STREAMS,
        query=(),
    ),
    response_by_id("GET", "openai/responses/{response_id}", "getResponse", _GET_RESPONSE),
    response_by_id("DELETE", "openai/responses/{response_id}", "deleteResponse", _DELETE),
    response_by_id("GET", "openai/responses/{response_id}/input_items", "listInputItems", _ITEMS),
    response_by_id("POST", "openai/responses/{response_id}/cancel", "cancelResponse", _CANCEL),
    response_by_id("GET", "openai/v1/responses/{response_id}", "v1GetResponse", _GET_RESPONSE),
    response_by_id("DELETE", "openai/v1/responses/{response_id}", "v1DeleteResponse", _DELETE),
    response_by_id(
        "GET", "openai/v1/responses/{response_id}/input_items", "v1ListInputItems", _ITEMS
    ),
    response_by_id("POST", "openai/v1/responses/{response_id}/cancel", "v1CancelResponse", _CANCEL),
    # proxy: Azure AI Search
    proxy("indexes/{index}/docs/search", "search", "Azure AI Search query", "SearchRequest"),
    proxy(
        "indexes('{index}')/docs/search.post.search",
        "searchOData",
        "Azure AI Search query (OData path the Search SDK uses)",
        "SearchRequest",
    ),
    # proxy: the catalog as a model list
    catalog("openai/models", "listModels", "The event's models (AzureOpenAI client)", "ModelList"),
    catalog("openai/models/{model}", "getModel", "One of the event's models", "Model"),
    catalog("openai/v1/models", "v1ListModels", "The event's models (OpenAI v1 path)", "ModelList"),
    catalog("openai/v1/models/{model}", "v1GetModel", "One of the event's models", "Model"),
    # attendees
    Operation(
        "GET",
        "eventinfo",
        "eventInfo",
        "The event of this key: window, caps and the deployments it may use",
        "attendees",
        ATTENDEE_KEY,
        answer="EventInfo",
        errors=(401, 429, 503),  # 429: too many wrong keys from the caller's address
    ),
    anonymous(
        "GET",
        "events/{event_id}",
        "publicEvent",
        "Public registration info of an event",
        answer="PublicEvent",
        errors=(404,),
    ),
    anonymous(
        "POST",
        "events/{event_id}/register",
        "register",
        "Register for an event: signed in, or with email and shared code",
        body="RegistrationRequest",
        answer="Registration",
        status=201,
        errors=(400, 403, 404, 409, 413, 429, 503),
        also={200: "A signed-in user registered before: its own attendee and key"},
        description=(
            "As the event's self_registration allows: a signed-in user (EasyAuth, when the app "
            "trusts it) needs no body; otherwise send the email address and the event's shared "
            "code (a body of at most 16 KiB). A key is given by code once, to the registration "
            "that creates the email's attendee: any later one for that email is 409. Open from "
            "the event's creation until it ends, while it is active."
        ),
    ),
    anonymous(
        "GET",
        "health",
        "health",
        "200 when storage answers, 503 otherwise",
        answer="Health",
        tag="operations",
        also={503: "Storage is unavailable"},
    ),
    # web pages and the files they load
    page("playground", "playgroundPage", "The attendee playground: try the event's models"),
    page("register/{event_id}", "registrationPage", "An event's registration page"),
    page("console", "consolePage", "The organiser console"),
    Operation(
        "GET",
        "pages/{*file}",
        "pageAsset",
        "A script, stylesheet or image of the web pages",
        "pages",
        ANONYMOUS,
        answer="",
        answer_types=("text/javascript", "text/css", "image/svg+xml"),
        also={304: "Not modified (If-None-Match)", 404: "No such file (plain text)"},
    ),
    anonymous(
        "GET",
        "openapi.json",
        "openapi",
        "This document",
        answer="",
        tag="operations",
    ),
]

# The seed's layout: every route that takes an event key, again under /v1 (function_app.py).
SEED_PREFIX = "v1/"


def seed_twin(op: Operation) -> Operation:
    return replace(
        op,
        route=SEED_PREFIX + op.route,
        operation_id="seed" + op.operation_id[0].upper() + op.operation_id[1:],
        tag="seed",
        summary=f"{op.summary}; under /v1",
    )


OPERATIONS += [seed_twin(op) for op in OPERATIONS if op.security == ATTENDEE_KEY]

# --- the document ---------------------------------------------------------------------------

_TEMPLATE = re.compile(r"\{\*?([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?\??\}")


def openapi_path(route: str) -> str:
    """A Functions route template as an OpenAPI path: '/' + route with plain {name}s."""
    return "/" + _TEMPLATE.sub(r"{\1}", route.strip("/"))


def _schema_of(name: str) -> Schema:
    if name.endswith("[]"):
        return {"type": "array", "items": _ref(name[:-2])}
    return _ref(name)


def _operation(op: Operation) -> Schema:
    spec: Schema = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.description:
        spec["description"] = op.description
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": _PARAMETERS.get(name, name),
        }
        for name in _TEMPLATE.findall(op.route)
    ]
    parameters += [copy.deepcopy(q) for q in op.query]
    if parameters:
        spec["parameters"] = parameters
    if op.body:
        spec["requestBody"] = {
            "required": op.body not in ("EventPatch", "ResourcePatch", "RegistrationRequest"),
            "content": {op.body_type: {"schema": _ref(op.body)}},
        }
    responses: Schema = {}
    success: Schema = {"description": op.summary}
    if op.answer is not None and op.status != 204:
        content: Schema = {}
        for kind in op.answer_types:
            if kind == "application/json" and op.answer:
                content[kind] = {"schema": _schema_of(op.answer)}
            else:
                content[kind] = {"schema": {"type": "string"}}
        success["content"] = content
    responses[str(op.status)] = success
    for status, text in op.also.items():
        # The main answer's shape (health's 503 carries the same body); 304 and 4xx carry none.
        answer: Schema = {"description": text}
        if "content" in success and status != 304 and not 400 <= status < 500:
            answer["content"] = success["content"]
        responses[str(status)] = answer
    for status in op.errors:
        name = "UpstreamOrError" if op.tag == "proxy" and status in _PASSED_THROUGH else "Error"
        responses.setdefault(str(status), {"$ref": f"#/components/responses/{name}{status}"})
    spec["responses"] = responses
    if op.security == OPERATOR_OR_ORGANISER:
        spec["security"] = [{"operatorKey": []}, {"entraToken": []}]
    elif op.security == ATTENDEE_KEY:
        spec["security"] = [{"apiKey": []}, {"bearer": []}]
        spec.setdefault("parameters", []).append(copy.deepcopy(_EVENT_HEADER))
    else:
        spec["security"] = []
    return spec


@lru_cache(maxsize=1)
def _base_document() -> Schema:
    paths: Schema = {}
    for op in OPERATIONS:
        paths.setdefault(openapi_path(op.route), {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "AI Proxy",
            "version": "1.0.0",
            "description": (
                "A serverless Azure OpenAI proxy for events. Organisers manage events, resources, "
                "catalogs and attendees under manage/: the operator with the operator key (every "
                "event and resource), organisers with an Entra ID token or the App Service "
                "sign-in (their own events and resources). Attendees call the OpenAI routes with "
                "their event key, exactly as they would call Azure OpenAI."
            ),
        },
        "servers": [{"url": "/api"}],
        "tags": [
            {
                "name": "management",
                "description": "The operator (operator key) and organisers (Entra ID token)",
            },
            {"name": "proxy", "description": "Azure OpenAI and AI Search, with an event key"},
            {
                "name": "seed",
                "description": (
                    "The proxy routes again under /v1, the layout of the AI Proxy this replaces: "
                    "AzureOpenAI(azure_endpoint=<base>/v1) works unchanged"
                ),
            },
            {"name": "attendees", "description": "Event info and self-registration"},
            {"name": "pages", "description": "Web pages"},
            {"name": "operations", "description": "Health and this document"},
        ],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "responses": {
                f"Error{status}": {
                    "description": text,
                    "content": {"application/json": {"schema": _ref("Error")}},
                }
                for status, text in _ERROR_TEXT.items()
            }
            | {
                f"UpstreamOrError{status}": {
                    "description": f"{_ERROR_TEXT[status]}; or the upstream's own answer",
                    "content": {
                        "application/json": {
                            "schema": {"anyOf": [_ref("Error"), _ref("UpstreamError")]}
                        }
                    },
                }
                for status in _PASSED_THROUGH
            },
            "securitySchemes": {
                "operatorKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-aiproxy-operator-key",
                    "description": (
                        "The operator key (app setting AIPROXY_OPERATOR_KEY): every event and "
                        "resource. A wrong key counts toward the failed-key lock-out"
                    ),
                },
                "entraToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": (
                        "An organiser's Entra ID access token for the app registration "
                        "(AIPROXY_ENTRA_ORGANIZER_AUDIENCE): their own events and resources; "
                        "a principal with an operator role or group is the operator. Behind "
                        "App Service authentication its session cookie works as well"
                    ),
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "api-key"},
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "Authorization: Bearer <event key>, or an Entra ID access token "
                        "(audience https://cognitiveservices.azure.com) for events that take "
                        "its tenant"
                    ),
                },
            },
        },
    }


def document(server_url: str = "/api") -> Schema:
    """The OpenAPI document, with the given base URL of the routes."""
    return {**_base_document(), "servers": [{"url": server_url}]}


async def answer(request: Request) -> Response:
    """GET /api/openapi.json."""
    server = endpoint_of(request, "openapi.json")
    return Response(orjson.dumps(document(server)), media_type="application/json")
