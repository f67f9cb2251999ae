"""The Function app: HTTP and timer triggers, each a thin call into shared/."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, Response

from admin_functions import bp as manage_blueprint
from shared import pipeline, plugins
from shared.management import maintenance, openapi
from shared.platform import telemetry
from shared.runtime import get_runtime
from shared.web import pages, public, registration

telemetry.set_log_levels()
plugins.check()  # a plugin that cannot be loaded stops start-up here, named, with the reason
app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(manage_blueprint)

Handler = Callable[[Request], Awaitable[Response]]


def on_path(operation: pipeline.Operation, parameter: str = "deployment") -> Handler:
    """A call whose path names the deployment (or search index)."""

    async def handler(req: Request) -> Response:
        return await pipeline.proxy(req, operation, req.path_params[parameter])

    return handler


def on_model(operation: pipeline.Operation) -> Handler:
    """A call on an OpenAI v1 path: the deployment is the body's "model"."""

    async def handler(req: Request) -> Response:
        return await pipeline.proxy(req, operation, None)

    return handler


def responses(v1: bool, action: str | None = None) -> Handler:
    """The Responses API: create (action None), or by id ("" for GET/DELETE, "input_items",
    "cancel"); `v1` is the OpenAI v1 path, else the AzureOpenAI path with api-version."""

    async def handler(req: Request) -> Response:
        if action is None:
            return await pipeline.create_response(req, v1)
        return await pipeline.response_by_id(req, v1, action)

    return handler


async def model(req: Request) -> Response:
    return await pipeline.one_model(req, req.path_params["model"])


POST, GET, GET_DELETE = ("POST",), ("GET",), ("GET", "DELETE")

# --- proxy: every route that takes an event key -------------------------------------------
# (function name, route, methods, handler). Each is served under /api and again under the
# seed's /api/v1, so material written for the AI Proxy this replaces works with a new host.
PROXY_ROUTES: tuple[tuple[str, str, tuple[str, ...], Handler], ...] = (
    # Azure OpenAI deployments paths
    ("chat_completions", "openai/deployments/{deployment}/chat/completions", POST,
     on_path(pipeline.CHAT)),
    ("extensions_chat_completions", "openai/deployments/{deployment}/extensions/chat/completions",
     POST, on_path(pipeline.EXTENSIONS_CHAT)),
    ("completions", "openai/deployments/{deployment}/completions", POST,
     on_path(pipeline.COMPLETIONS)),
    ("embeddings", "openai/deployments/{deployment}/embeddings", POST,
     on_path(pipeline.EMBEDDINGS)),
    ("images_generations", "openai/deployments/{deployment}/images/generations", POST,
     on_path(pipeline.IMAGES)),
    ("audio_transcriptions", "openai/deployments/{deployment}/audio/transcriptions", POST,
     on_path(pipeline.TRANSCRIPTIONS)),
    ("audio_translations", "openai/deployments/{deployment}/audio/translations", POST,
     on_path(pipeline.TRANSLATIONS)),
    ("audio_speech", "openai/deployments/{deployment}/audio/speech", POST,
     on_path(pipeline.SPEECH)),
    # OpenAI v1 paths, the deployment is the body's "model"
    ("v1_chat_completions", "openai/v1/chat/completions", POST, on_model(pipeline.CHAT)),
    ("v1_completions", "openai/v1/completions", POST, on_model(pipeline.COMPLETIONS)),
    ("v1_embeddings", "openai/v1/embeddings", POST, on_model(pipeline.EMBEDDINGS)),
    ("v1_images_generations", "openai/v1/images/generations", POST, on_model(pipeline.IMAGES)),
    ("v1_audio_transcriptions", "openai/v1/audio/transcriptions", POST,
     on_model(pipeline.TRANSCRIPTIONS)),
    ("v1_audio_translations", "openai/v1/audio/translations", POST,
     on_model(pipeline.TRANSLATIONS)),
    ("v1_audio_speech", "openai/v1/audio/speech", POST, on_model(pipeline.SPEECH)),
    # the Responses API on both paths; calls by id go to the member that holds the response
    ("responses", "openai/responses", POST, responses(v1=False)),
    ("response", "openai/responses/{response_id}", GET_DELETE, responses(v1=False, action="")),
    ("response_input_items", "openai/responses/{response_id}/input_items", GET,
     responses(v1=False, action="input_items")),
    ("response_cancel", "openai/responses/{response_id}/cancel", POST,
     responses(v1=False, action="cancel")),
    ("v1_responses", "openai/v1/responses", POST, responses(v1=True)),
    ("v1_response", "openai/v1/responses/{response_id}", GET_DELETE, responses(v1=True, action="")),
    ("v1_response_input_items", "openai/v1/responses/{response_id}/input_items", GET,
     responses(v1=True, action="input_items")),
    ("v1_response_cancel", "openai/v1/responses/{response_id}/cancel", POST,
     responses(v1=True, action="cancel")),
    # Azure AI Search: the REST path and the OData path the Search SDKs use
    ("search", "indexes/{index}/docs/search", POST, on_path(pipeline.SEARCH, "index")),
    ("search_odata", "indexes('{index}')/docs/search.post.search", POST,
     on_path(pipeline.SEARCH, "index")),
    # what the key gives: the event, and its catalog as a model list
    ("eventinfo", "eventinfo", GET, pipeline.event_info),
    ("models", "openai/models", GET, pipeline.list_models),
    ("model", "openai/models/{model}", GET, model),
    ("v1_models", "openai/v1/models", GET, pipeline.list_models),
    ("v1_model", "openai/v1/models/{model}", GET, model),
)  # fmt: skip

# The seed's layout: the same routes under this prefix, function names with this prefix.
SEED_ROUTE_PREFIX = "v1/"
SEED_NAME_PREFIX = "seed_"


def serve(name: str, route: str, methods: tuple[str, ...], handler: Handler) -> None:
    async def function(req: Request) -> Response:
        return await handler(req)

    app.function_name(name)(app.route(route=route, methods=list(methods))(function))


for _name, _route, _methods, _handler in PROXY_ROUTES:
    serve(_name, _route, _methods, _handler)
    serve(SEED_NAME_PREFIX + _name, SEED_ROUTE_PREFIX + _route, _methods, _handler)


# --- attendees and health -----------------------------------------------------------------


@app.route(route="events/{event_id}", methods=["GET"])
async def public_event(req: Request) -> Response:
    return await public.event_page_info(get_runtime(), req, req.path_params["event_id"])


@app.route(route="health", methods=["GET"])
async def health(req: Request) -> Response:
    return await public.health(get_runtime())


# --- timers: usage rollups and retention --------------------------------------------------


@app.timer_trigger(schedule="%AIPROXY_ROLLUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def rollup_usage(timer: func.TimerRequest) -> None:
    await maintenance.roll_up_usage(get_runtime())


@app.timer_trigger(schedule="%AIPROXY_RETENTION_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def prune_usage(timer: func.TimerRequest) -> None:
    await maintenance.prune_usage(get_runtime())


# --- self-registration and the API description -------------------------------------------


@app.route(route="events/{event_id}/register", methods=["POST"])
async def register(req: Request) -> Response:
    return await registration.register(get_runtime(), req, req.path_params["event_id"])


@app.route(route="openapi.json", methods=["GET"])
async def openapi_document(req: Request) -> Response:
    return await openapi.answer(req)


# --- web pages: playground, registration, console, and the files they load ---------------


@app.route(route="playground", methods=["GET"])
async def playground_page(req: Request) -> Response:
    return pages.page(req, "playground")


@app.route(route="register/{event_id}", methods=["GET"])
async def registration_page(req: Request) -> Response:
    return pages.page(req, "register", event_id=req.path_params["event_id"])


@app.route(route="console", methods=["GET"])
async def console_page(req: Request) -> Response:
    return pages.page(req, "console")


@app.route(route="pages/{*file}", methods=["GET"])
async def page_asset(req: Request) -> Response:
    return pages.asset(req, req.path_params["file"])
