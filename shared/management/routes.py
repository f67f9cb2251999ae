"""Every HTTP route of the app, declared once (the shape: shared/management/routing.py).

function_app.py registers one Functions HTTP function per route of `ROUTES` (the seed layout's
copies included); the OpenAPI document at GET /api/openapi.json is generated from the same
table and the models it names. A new route is one `Route` here, and nothing else.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response

from shared import pipeline
from shared.directory import models
from shared.governance import GROUPS, AlertView, ToolCalls, UsageReport
from shared.management import http, openapi
from shared.management.routing import (
    ANONYMOUS,
    ATTENDEE,
    JSON,
    MANAGER,
    Answer,
    Endpoint,
    Handler,
    Query,
    Route,
    with_seed_copies,
)
from shared.pipeline import shapes
from shared.runtime import get_runtime
from shared.web import pages, public, registration
from shared.web.public import Health

STREAMS = ("application/json", "text/event-stream")
AUDIO = ("audio/mpeg", "audio/wav", "application/octet-stream")

# --- management -----------------------------------------------------------------------------

# Any manage/* call: no credential (401), not an organiser (403), too many wrong keys (429),
# storage away (503); with ids, 404 for unknown ones (or another organiser's); with a body or a
# query, 400 naming the field.
_MANAGE_ERRORS = (401, 403, 429, 503)


def manage(
    method: str,
    handler: Handler,
    summary: str,
    *answers: Answer,
    errors: tuple[int, ...] = (),
    **more: Any,
) -> Endpoint:
    """An endpoint whose operationId is its handler's name in camelCase (list_events:
    listEvents)."""
    codes = {*_MANAGE_ERRORS, *errors}
    if more.get("body") or more.get("query"):
        codes.add(400)
    first, *rest = handler.__name__.split("_")
    operation_id = first + "".join(word.title() for word in rest)
    return Endpoint(method, handler, operation_id, summary, answers, tuple(sorted(codes)), **more)


def managed(name: str, path: str, *endpoints: Endpoint) -> Route:
    """The route `manage_<name>` at `manage/<path>`, for organisers and the operator; ids in
    its path answer 404 when unknown (or another organiser's)."""
    if "{" in path:
        endpoints = tuple(replace(e, errors=tuple(sorted({*e.errors, 404}))) for e in endpoints)
    return Route(f"manage_{name}", f"manage/{path}", MANAGER, "management", endpoints)


def ok(model: object, text: str = "OK", status: int = 200) -> Answer:
    return Answer(status, text, model)


NONE = Answer(204, "Done: no content", types=())


def owned(noun: str, *summaries: str, delete_query: tuple[Query, ...] = ()) -> tuple[Route, Route]:
    """The two routes of what organisers own and change (events, resources): `manage/<noun>s`
    (list, create) and `manage/<noun>s/{<noun>_id}` (get, change, delete; 409 while in use).
    Handlers and models go by the noun: http.list_events, models.EventView, EventCreate,
    EventPatch; the summaries in that order: list, create, get, change, delete."""
    lists, creates, gets, changes, deletes = summaries
    view, create, patch = (
        getattr(models, noun.title() + kind) for kind in ("View", "Create", "Patch")
    )
    handler = {
        name: getattr(http, f"{name}_{noun}") for name in ("create", "get", "update", "delete")
    }
    return (
        managed(f"{noun}s", f"{noun}s",
            manage("GET", getattr(http, f"list_{noun}s"), lists, ok(list[view])),
            manage("POST", handler["create"], creates, ok(view, "Created", 201), body=create),
        ),
        managed(noun, f"{noun}s/{{{noun}_id}}",
            manage("GET", handler["get"], gets, ok(view)),
            manage("PATCH", handler["update"], changes, ok(view), body=patch, body_required=False),
            manage("DELETE", handler["delete"], deletes, NONE, errors=(409,), query=delete_query),
        ),
    )  # fmt: skip


def listed(name: str, below: str, handler: Handler, model: object, summary: str) -> Route:
    """A list of the event's (`manage/events/{event_id}/<below>`, GET only): `list[model]`."""
    return managed(
        name, f"events/{{event_id}}/{below}", manage("GET", handler, summary, ok(list[model]))
    )


_FORCE = Query("force", bool, "true also deletes the event's attendees and their keys", False)
_USAGE = (
    Query("group_by", Literal[tuple(GROUPS)], "how to group the totals", "attendee"),
    Query("format", Literal[http.USAGE_FORMATS], "json or csv", "json"),
)

MANAGEMENT: tuple[Route, ...] = (
    *owned("event", "List events (an owner sees its own)", "Create an event", "One event",
           "Change an event", "Delete an event; 409 while it has attendees, unless force=true",
           delete_query=(_FORCE,)),
    *owned("resource", "List resources, never with secrets",
           "Add an upstream deployment; api_key is write-only", "One resource",
           "Change a resource", "Delete a resource; 409 while an event's catalog holds it"),
    listed("event_catalog", "resources", http.list_catalog, models.ResourceView,
           "The event's catalog"),
    managed("event_resource", "events/{event_id}/resources/{resource_id}",
        manage("PUT", http.attach_resource, "Add a resource to the event's catalog",
               ok(models.CatalogEntry)),
        manage("DELETE", http.detach_resource, "Take a resource out of the event's catalog", NONE),
    ),
    managed("attendees", "events/{event_id}/attendees",
        manage("GET", http.list_attendees, "The event's attendees with their totals, without keys",
               ok(list[models.AttendeeWithTotals])),
        manage("POST", http.add_attendee,
               "Issue a key to a user; the same user again gets the same attendee (200), with a "
               "new key if it registered itself with the event's code",
               ok(models.AttendeeWithKeyView, "Created", 201),
               ok(models.AttendeeWithKeyView, "The user already had a key: the same attendee "
                  "and key (a new key if it registered itself with the event's code)"),
               body=models.AttendeeCreate),
    ),
    managed("attendee", "events/{event_id}/attendees/{attendee_id}",
        manage("GET", http.get_attendee, "One attendee, with its key",
               ok(models.AttendeeWithKeyView)),
        manage("DELETE", http.revoke_attendee,
               "Revoke the attendee's key (every instance refuses it within the cache TTL)",
               ok(models.AttendeeView)),
    ),
    managed("attendee_rotate", "events/{event_id}/attendees/{attendee_id}/rotate",
        manage("POST", http.rotate_attendee_key,
               "A new key for the attendee; the old one stops working",
               ok(models.AttendeeWithKeyView)),
    ),
    listed("alerts", "alerts", http.list_alerts, AlertView,
           "The budget thresholds the event reached, each fired once"),
    managed("alert_secret", "events/{event_id}/alerts/secret",
        manage("POST", http.rotate_alert_secret,
               "A new secret signing the event's alert webhooks, shown once",
               ok(models.AlertSecret)),
    ),
    managed("usage", "events/{event_id}/usage",
        manage("GET", http.usage_report, "Usage totals by attendee, deployment, day or hour",
               Answer(200, "The report", UsageReport, ("application/json", "text/csv")),
               query=_USAGE),
    ),
    listed("tool_calls", "toolcalls", http.tool_calls, ToolCalls,
           "MCP tool calls by attendee, server and tool (from the usage records)"),
)  # fmt: skip

# --- proxy: every route that takes an event key --------------------------------------------

# Errors of a proxy call: the proxy's own, or the upstream's (400, 401, 403, 404, 413 may be
# either: shared/management/openapi.py describes both shapes).
PROXY_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)
API_VERSION = Query("api-version", str, "forwarded upstream; the configured default when missing")
_UPSTREAM = Answer(200, "The upstream's answer, passed through", shapes.OpenAIAnswer)
_STREAMED = Answer(200, "The upstream's answer or its event stream", shapes.OpenAIAnswer, STREAMS)


def _query(path: str) -> tuple[Query, ...]:
    """api-version on the AzureOpenAI paths; the OpenAI v1 paths take none."""
    return () if path.startswith("openai/v1/") else (API_VERSION,)


def on_path(kind: pipeline.CallKind, parameter: str = "deployment") -> Handler:
    """A call whose path names the deployment (or search index)."""

    async def handler(request: Request) -> Response:
        return await pipeline.proxy_call(request, kind, request.path_params[parameter])

    return handler


def on_model(kind: pipeline.CallKind) -> Handler:
    """A call on an OpenAI v1 path: the deployment is the body's "model"."""

    async def handler(request: Request) -> Response:
        return await pipeline.proxy_call(request, kind, None)

    return handler


def call(
    name: str,
    path: str,
    handler: Handler,
    operation_id: str,
    summary: str,
    body: type,
    answer: Answer = _UPSTREAM,
    body_type: str = "application/json",
) -> Route:
    """A POST that goes upstream: attendee key; the upstream's answer comes back as it is."""
    endpoint = Endpoint(
        "POST", handler, operation_id, summary, (answer,), PROXY_ERRORS, body=body,
        body_type=body_type, query=_query(path),
    )  # fmt: skip
    return Route(name, path, ATTENDEE, "proxy", (endpoint,))


def responses(v1: bool, action: str | None = None) -> Handler:
    """The Responses API: create (action None), or by id ("" for GET/DELETE, "input_items",
    "cancel"); `v1` is the OpenAI v1 path, else the AzureOpenAI path with api-version."""

    async def handler(request: Request) -> Response:
        if action is None:
            return await pipeline.create_response(request, v1)
        return await pipeline.response_by_id(request, v1, action)

    return handler


def by_id(method: str, path: str, handler: Handler, operation_id: str, summary: str) -> Endpoint:
    """A call on a stored response: attendee key; 404 for an id that is not this key's."""
    streams = method == "GET" and not path.endswith("input_items")
    answer = _STREAMED if streams else _UPSTREAM
    return Endpoint(
        method, handler, operation_id, summary, (answer,), PROXY_ERRORS, query=_query(path)
    )


def response_routes(prefix: str, v1: bool, ids: str) -> tuple[Route, ...]:
    """The Responses API under one prefix: create, and the calls by id."""
    path, name = f"{prefix}responses", ("v1_" if v1 else "") + "response"
    one = f"{path}/{{response_id}}"
    by = "v1" if v1 else ""

    def named(operation_id: str) -> str:
        return by + operation_id[0].upper() + operation_id[1:] if by else operation_id

    return (
        call(name + "s", path, responses(v1), named("createResponse"),
             f"Create a response ({ids})", shapes.ResponseRequest, _STREAMED),
        Route(name, one, ATTENDEE, "proxy", (
            by_id("GET", one, responses(v1, ""), named("getResponse"),
                  "A response, from the member that holds it; ?stream=true replays its events"),
            by_id("DELETE", one, responses(v1, ""), named("deleteResponse"),
                  "Delete a stored response"),
        )),
        Route(name + "_input_items", f"{one}/input_items", ATTENDEE, "proxy", (
            by_id("GET", f"{one}/input_items", responses(v1, "input_items"),
                  named("listInputItems"), "The input items of a response"),
        )),
        Route(name + "_cancel", f"{one}/cancel", ATTENDEE, "proxy", (
            by_id("POST", f"{one}/cancel", responses(v1, "cancel"), named("cancelResponse"),
                  "Cancel a background response"),
        )),
    )  # fmt: skip


async def _one_model(request: Request) -> Response:
    return await pipeline.one_model(request, request.path_params["model"])


def catalog(name: str, path: str, handler: Handler, operation_id: str, summary: str) -> Route:
    """A GET of the event's catalog as models: attendee key; 404 for a model not in it."""
    one = "{" in path
    answer = ok(pipeline.Model if one else pipeline.ModelList)
    errors = (401, 404, 429, 503) if one else (401, 429, 503)
    endpoint = Endpoint(
        "GET", handler, operation_id, summary, (answer,), errors, query=_query(path)
    )
    return Route(name, path, ATTENDEE, "proxy", (endpoint,))


_DEPLOYMENT = "openai/deployments/{deployment}/"
_AZURE = "(Azure OpenAI path)"
_V1 = "(OpenAI v1 path)"
_FORM = "multipart/form-data"

PROXY: tuple[Route, ...] = (
    # Azure OpenAI deployments paths
    call("chat_completions", _DEPLOYMENT + "chat/completions", on_path(pipeline.CHAT),
         "chatCompletions", f"Chat completions {_AZURE}", shapes.ChatCompletionRequest, _STREAMED),
    call("extensions_chat_completions", _DEPLOYMENT + "extensions/chat/completions",
         on_path(pipeline.EXTENSIONS_CHAT), "extensionsChatCompletions",
         "Chat completions on your data (legacy path)", shapes.ChatCompletionRequest, _STREAMED),
    call("completions", _DEPLOYMENT + "completions", on_path(pipeline.COMPLETIONS),
         "completions", f"Completions {_AZURE}", shapes.CompletionRequest, _STREAMED),
    call("embeddings", _DEPLOYMENT + "embeddings", on_path(pipeline.EMBEDDINGS), "embeddings",
         f"Embeddings {_AZURE}", shapes.EmbeddingRequest),
    call("images_generations", _DEPLOYMENT + "images/generations", on_path(pipeline.IMAGES),
         "imageGenerations", f"Image generations {_AZURE}", shapes.ImageRequest),
    call("audio_transcriptions", _DEPLOYMENT + "audio/transcriptions",
         on_path(pipeline.TRANSCRIPTIONS), "audioTranscriptions",
         "Audio transcriptions (multipart), metered in seconds", shapes.TranscriptionRequest,
         body_type=_FORM),
    call("audio_translations", _DEPLOYMENT + "audio/translations",
         on_path(pipeline.TRANSLATIONS), "audioTranslations",
         "Audio translations to English (multipart), metered in seconds",
         shapes.TranscriptionRequest, body_type=_FORM),
    call("audio_speech", _DEPLOYMENT + "audio/speech", on_path(pipeline.SPEECH), "audioSpeech",
         "Text to speech: the audio streamed through, metered in characters",
         shapes.SpeechRequest, Answer(200, "The audio", None, AUDIO)),
    # OpenAI v1 paths, the deployment is the body's "model"
    call("v1_chat_completions", "openai/v1/chat/completions", on_model(pipeline.CHAT),
         "v1ChatCompletions", f"Chat completions {_V1}; model = deployment",
         shapes.ChatCompletionRequest, _STREAMED),
    call("v1_completions", "openai/v1/completions", on_model(pipeline.COMPLETIONS),
         "v1Completions", f"Completions {_V1}", shapes.CompletionRequest, _STREAMED),
    call("v1_embeddings", "openai/v1/embeddings", on_model(pipeline.EMBEDDINGS), "v1Embeddings",
         f"Embeddings {_V1}", shapes.EmbeddingRequest),
    call("v1_images_generations", "openai/v1/images/generations", on_model(pipeline.IMAGES),
         "v1ImageGenerations", f"Image generations {_V1}", shapes.ImageRequest),
    call("v1_audio_transcriptions", "openai/v1/audio/transcriptions",
         on_model(pipeline.TRANSCRIPTIONS), "v1AudioTranscriptions",
         f"Audio transcriptions {_V1}; the form's model = deployment",
         shapes.TranscriptionRequest, body_type=_FORM),
    call("v1_audio_translations", "openai/v1/audio/translations",
         on_model(pipeline.TRANSLATIONS), "v1AudioTranslations", f"Audio translations {_V1}",
         shapes.TranscriptionRequest, body_type=_FORM),
    call("v1_audio_speech", "openai/v1/audio/speech", on_model(pipeline.SPEECH),
         "v1AudioSpeech", f"Text to speech {_V1}", shapes.SpeechRequest,
         Answer(200, "The audio", None, AUDIO)),
    # realtime voice: a WebRTC call's setup (SDP offer in, SDP answer out), client secrets
    call("v1_realtime_calls", "openai/v1/realtime/calls", pipeline.realtime_call,
         "v1RealtimeCalls",
         "Set up a realtime voice call (WebRTC): the SDP offer as multipart (sdp, session) or "
         "application/sdp (?model=); answers 201 with the SDP answer and the call in Location, "
         "metered per response through its sideband",
         shapes.RealtimeCallRequest, Answer(201, "The SDP answer", None, ("application/sdp",)),
         body_type=_FORM),
    call("v1_realtime_client_secrets", "openai/v1/realtime/client_secrets",
         pipeline.realtime_client_secret, "v1RealtimeClientSecrets",
         "An ephemeral key for one realtime session, at most 60 seconds to start it; only the "
         "session's start is counted", shapes.RealtimeClientSecretRequest),
    # the Responses API on both paths; calls by id go to the member that holds the response
    *response_routes("openai/", False, "AzureOpenAI path, api-version 2025-03-01-preview or later"),
    *response_routes("openai/v1/", True, "OpenAI v1 path"),
    # Azure AI Search: the REST path and the OData path the Search SDKs use
    call("search", "indexes/{index}/docs/search", on_path(pipeline.SEARCH, "index"), "search",
         "Azure AI Search query", shapes.SearchRequest),
    call("search_odata", "indexes('{index}')/docs/search.post.search",
         on_path(pipeline.SEARCH, "index"), "searchOData",
         "Azure AI Search query (OData path the Search SDK uses)", shapes.SearchRequest),
    # what the key gives: the event, and its catalog as a model list
    Route("eventinfo", "eventinfo", ATTENDEE, "attendees", (
        # 429: too many wrong keys from the caller's address
        Endpoint("GET", pipeline.event_info, "eventInfo",
                 "The event of this key: window, caps and the deployments it may use",
                 (ok(pipeline.EventInfo),), (401, 429, 503)),
    )),
    catalog("models", "openai/models", pipeline.list_models, "listModels",
            "The event's models (AzureOpenAI client)"),
    catalog("model", "openai/models/{model}", _one_model, "getModel", "One of the event's models"),
    catalog("v1_models", "openai/v1/models", pipeline.list_models, "v1ListModels",
            f"The event's models {_V1}"),
    catalog("v1_model", "openai/v1/models/{model}", _one_model, "v1GetModel",
            "One of the event's models"),
)  # fmt: skip

# --- MCP servers: the streamable HTTP transport (shared/pipeline/mcp.py) --------------------


async def _mcp(request: Request) -> Response:
    return await pipeline.mcp_call(request, request.path_params["name"])


_MCP_NOTE = (
    "MCP's streamable HTTP transport (revisions 2025-03-26 and 2025-06-18): the attendee's key "
    "as `Authorization: Bearer` or `api-key`; `MCP-Protocol-Version`, `Accept` and "
    "`Last-Event-ID` passed through; `Mcp-Session-Id` sealed to the attendee. Refusals are "
    "JSON-RPC errors with the contract's code in `error.data.code`."
)
# Refusals of MCP messages: JSON-RPC errors at the contract's status (docs/api.md#mcp-servers).
_MCP_REFUSALS = tuple(
    Answer(status, text, pipeline.JsonRpcError)
    for status, text in (
        (400, "Not JSON (-32700), a malformed message or a batch (-32600)"),
        (401, "Missing or wrong key (data.code invalid_api_key, key_revoked, invalid_token)"),
        (403, "Outside the event's window, or a tool the event does not allow (-32602)"),
        (404, "No such MCP server in the event's catalog, or a session that is not yours"),
        (413, "A message above 4 MiB"),
        (429, "A daily cap or per-minute limit, counted per tool call; see Retry-After"),
        (502, "The MCP server failed, refused the proxy's credential or may not be called"),
        (503, "Storage unavailable"),
        (504, "The MCP server did not answer in time"),
    )
)


def mcp(method: str, operation_id: str, summary: str, *answers: Answer, **more: Any) -> Endpoint:
    return Endpoint(method, _mcp, operation_id, summary, (*answers, *_MCP_REFUSALS),
                    description=_MCP_NOTE, **more)  # fmt: skip


MCP: tuple[Route, ...] = (
    Route("mcp_server", "mcp/{name}", ATTENDEE, "mcp", (
        mcp("POST", "mcpMessage", "Send one JSON-RPC message to the event's MCP server",
            Answer(200, "The answer, as JSON or as an event stream", pipeline.JsonRpcMessage,
                   STREAMS),
            Answer(202, "Accepted: a notification or a response", None, ()),
            body=pipeline.JsonRpcMessage),
        mcp("GET", "mcpStream", "The server's own event stream (its 405 when it offers none)",
            Answer(200, "The server's event stream", None, ("text/event-stream",))),
        mcp("DELETE", "mcpEndSession", "End the MCP session (Mcp-Session-Id)",
            Answer(200, "The session ended", None, ())),
    )),
)  # fmt: skip

# --- anonymous: attendees, health, the document, pages -------------------------------------


async def _public_event(request: Request) -> Response:
    return await public.event_page_info(get_runtime(), request, request.path_params["event_id"])


async def _health(request: Request) -> Response:
    return await public.health(get_runtime())


async def _register(request: Request) -> Response:
    return await registration.register(get_runtime(), request, request.path_params["event_id"])


async def _openapi(request: Request) -> Response:
    return await openapi.answer(request, ROUTES)


def page(
    function: str, name: str, path: str, operation_id: str, summary: str, **values: str
) -> Route:
    """A web page (pages/`name`.html): anonymous, HTML; `values` name the path parameters the
    page shows."""

    async def handler(request: Request) -> Response:
        shown = {key: request.path_params[parameter] for key, parameter in values.items()}
        return pages.page(request, name, **shown)

    answer = Answer(200, summary, None, ("text/html",))
    endpoint = Endpoint("GET", handler, operation_id, summary, (answer,))
    return Route(function, path, ANONYMOUS, "pages", (endpoint,))


async def _asset(request: Request) -> Response:
    return pages.asset(request, request.path_params["file"])


_REGISTER = (
    "As the event's self_registration allows: a signed-in user (EasyAuth, when the app trusts "
    "it) needs no body; otherwise send the email address and the event's shared code (a body of "
    "at most 16 KiB). A key is given by code once, to the registration that creates the email's "
    "attendee: any later one for that email is 409. Open from the event's creation until it "
    "ends, while it is active."
)

OTHERS: tuple[Route, ...] = (
    Route("public_event", "events/{event_id}", ANONYMOUS, "attendees", (
        Endpoint("GET", _public_event, "publicEvent", "Public registration info of an event",
                 (ok(models.PublicEvent),), (404,)),
    )),
    Route("register", "events/{event_id}/register", ANONYMOUS, "attendees", (
        Endpoint("POST", _register, "register",
                 "Register for an event: signed in, or with email and shared code",
                 (ok(registration.Registered, "Registered: a new attendee and key", 201),
                  ok(registration.Registered,
                     "A signed-in user registered before: its own attendee and key")),
                 (400, 403, 404, 409, 413, 429, 503), body=registration.RegistrationRequest,
                 body_required=False, description=_REGISTER),
    )),
    Route("health", "health", ANONYMOUS, "operations", (
        Endpoint("GET", _health, "health", "200 when storage answers, 503 otherwise",
                 (ok(Health), ok(Health, "Storage is unavailable", 503))),
    )),
    Route("openapi_document", "openapi.json", ANONYMOUS, "operations", (
        Endpoint("GET", _openapi, "openapi", "This document", (Answer(200, "This document"),)),
    )),
    page("playground_page", "playground", "playground", "playgroundPage",
         "The attendee playground: try the event's models"),
    page("registration_page", "register", "register/{event_id}", "registrationPage", "An event's registration page",
         event_id="event_id"),
    page("console_page", "console", "console", "consolePage", "The organiser console"),
    Route("page_asset", "pages/{*file}", ANONYMOUS, "pages", (
        Endpoint("GET", _asset, "pageAsset", "A script, stylesheet or image of the web pages",
                 (Answer(200, "The file", None, ("text/javascript", "text/css", "image/svg+xml")),
                  Answer(304, "Not modified (If-None-Match)", None, ()),
                  Answer(404, "No such file (plain text)", None, ()))),
    )),
)  # fmt: skip

# Every route the app serves, the seed layout's copies under /v1 included.
ROUTES: tuple[Route, ...] = with_seed_copies(MANAGEMENT + PROXY + MCP + OTHERS)

__all__ = ["JSON", "ROUTES", "Route"]
