"""The Function app: HTTP and timer triggers, each a thin call into shared/."""

from __future__ import annotations

import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, Response, StreamingResponse

from admin_functions import bp as manage_blueprint
from shared import maintenance, openapi, pages, pipeline, public, registration, telemetry

telemetry.set_log_levels()
app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(manage_blueprint)


# --- proxy: Azure OpenAI deployments paths ------------------------------------------------


@app.route(route="openai/deployments/{deployment}/chat/completions", methods=["POST"])
async def chat_completions(req: Request) -> StreamingResponse:
    return await pipeline.proxy(req, pipeline.CHAT, req.path_params["deployment"])


@app.route(route="openai/deployments/{deployment}/extensions/chat/completions", methods=["POST"])
async def extensions_chat_completions(req: Request) -> StreamingResponse:
    return await pipeline.proxy(req, pipeline.EXTENSIONS_CHAT, req.path_params["deployment"])


@app.route(route="openai/deployments/{deployment}/completions", methods=["POST"])
async def completions(req: Request) -> StreamingResponse:
    return await pipeline.proxy(req, pipeline.COMPLETIONS, req.path_params["deployment"])


@app.route(route="openai/deployments/{deployment}/embeddings", methods=["POST"])
async def embeddings(req: Request) -> Response:
    return await pipeline.proxy(req, pipeline.EMBEDDINGS, req.path_params["deployment"])


# --- proxy: OpenAI v1 paths, the deployment is the body's "model" -------------------------


@app.route(route="openai/v1/chat/completions", methods=["POST"])
async def v1_chat_completions(req: Request) -> StreamingResponse:
    return await pipeline.proxy(req, pipeline.CHAT, None)


@app.route(route="openai/v1/completions", methods=["POST"])
async def v1_completions(req: Request) -> StreamingResponse:
    return await pipeline.proxy(req, pipeline.COMPLETIONS, None)


@app.route(route="openai/v1/embeddings", methods=["POST"])
async def v1_embeddings(req: Request) -> Response:
    return await pipeline.proxy(req, pipeline.EMBEDDINGS, None)


# --- attendees and health -----------------------------------------------------------------


@app.route(route="eventinfo", methods=["GET"])
async def eventinfo(req: Request) -> Response:
    return await pipeline.event_info(req)


@app.route(route="events/{event_id}", methods=["GET"])
async def public_event(req: Request) -> Response:
    return await public.event_page_info(req.path_params["event_id"])


@app.route(route="health", methods=["GET"])
async def health(req: Request) -> Response:
    return await public.health()


# --- images, audio, Azure AI Search ------------------------------------------------------


@app.route(route="openai/deployments/{deployment}/images/generations", methods=["POST"])
async def images_generations(req: Request) -> Response:
    return await pipeline.proxy(req, pipeline.IMAGES, req.path_params["deployment"])


@app.route(route="openai/v1/images/generations", methods=["POST"])
async def v1_images_generations(req: Request) -> Response:
    return await pipeline.proxy(req, pipeline.IMAGES, None)


@app.route(route="openai/deployments/{deployment}/audio/transcriptions", methods=["POST"])
async def audio_transcriptions(req: Request) -> Response:
    return await pipeline.proxy(req, pipeline.TRANSCRIPTIONS, req.path_params["deployment"])


@app.route(route="indexes/{index}/docs/search", methods=["POST"])
async def search(req: Request) -> Response:
    return await pipeline.proxy(req, pipeline.SEARCH, req.path_params["index"])


@app.route(route="indexes('{index}')/docs/search.post.search", methods=["POST"])
async def search_odata(req: Request) -> Response:
    return await pipeline.proxy(req, pipeline.SEARCH, req.path_params["index"])


# --- timers: usage rollups and retention --------------------------------------------------


@app.timer_trigger(schedule="%AIPROXY_ROLLUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def rollup_usage(timer: func.TimerRequest) -> None:
    await maintenance.roll_up_usage()


@app.timer_trigger(schedule="%AIPROXY_RETENTION_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def prune_usage(timer: func.TimerRequest) -> None:
    await maintenance.prune_usage()


# --- self-registration and the API description -------------------------------------------


@app.route(route="events/{event_id}/register", methods=["POST"])
async def register(req: Request) -> Response:
    return await registration.register(req, req.path_params["event_id"])


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
