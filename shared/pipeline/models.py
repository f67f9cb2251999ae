"""The models list: the event's catalog in OpenAI's list shape, for the key that asks.

GET /openai/v1/models (OpenAI client) and /openai/models (AzureOpenAI client) answer the same
list: one model per deployment name this key may call, Azure AI Search indexes left out. Like
/eventinfo it answers outside the event's window too, so a front end can show what will work.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from shared.directory.catalog import Resource
from shared.directory.models import ModelClass
from shared.errors import ProxyError
from shared.pipeline.answers import REQUEST_ID_HEADER, error_response, new_request_id
from shared.runtime import Access, get_runtime

# Azure's model list names what each model can do; the same flags, from the model class.
_CAPABILITIES: dict[str, dict[str, bool]] = {
    "openai-chat": {"chat_completion": True, "responses": True},
    "openai-completions": {"completion": True},
    "openai-embeddings": {"embeddings": True},
    "openai-images": {"image_generation": True},
    "openai-audio": {"audio": True},
    "openai-realtime": {"realtime": True},
}


class Model(BaseModel):
    """A deployment of the event's catalog, as OpenAI lists a model."""

    id: str = Field(description="the deployment name to send as model")
    object: Literal["model"]
    created: int = Field(ge=0, description="when its first resource was added, Unix seconds")
    owned_by: str = Field(description="always aiproxy")
    model_class: ModelClass = Field(description="what it serves (the first, if several)")
    capabilities: dict[str, bool] = Field(description="what it can do")


class ModelList(BaseModel):
    """The event's models, in OpenAI's list shape."""

    object: Literal["list"]
    data: list[Model]


# Both are built as plain dicts per call (the proxy's hot path); tests check them against the
# models above.


def _created(members: list[Resource]) -> int:
    times = []
    for member in members:
        try:
            times.append(int(datetime.fromisoformat(member.created_at).timestamp()))
        except ValueError:
            continue
    return min(times, default=0)


def catalog_models(pools: dict[str, list[Resource]]) -> dict[str, dict[str, Any]]:
    """Deployment name -> its model object, for every deployment that is a model."""
    models = {}
    for name, members in sorted(pools.items()):
        classes = sorted({m.model_class for m in members if m.model_class in _CAPABILITIES})
        if not classes:
            continue
        capabilities = {flag: False for flags in _CAPABILITIES.values() for flag in flags}
        for model_class in classes:
            capabilities.update(_CAPABILITIES[model_class])
        models[name] = {
            "id": name,
            "object": "model",
            "created": _created(members),
            "owned_by": "aiproxy",
            "model_class": classes[0],
            "capabilities": capabilities,
        }
    return models


async def _models_of(request: Request) -> dict[str, dict[str, Any]]:
    runtime = get_runtime()
    access: Access = await runtime.gate.of_request(request.headers, request.client)
    return catalog_models(await runtime.directory.pools(access.event.id))


def _json(data: Any, request_id: str) -> Response:
    headers = {REQUEST_ID_HEADER: request_id}
    return Response(orjson.dumps(data), 200, headers, media_type="application/json")


async def list_models(request: Request) -> Response:
    """GET …/models: {"object": "list", "data": [model, …]}."""
    request_id = new_request_id()
    try:
        models = await _models_of(request)
    except ProxyError as error:
        return error_response(error, request_id)
    return _json({"object": "list", "data": list(models.values())}, request_id)


async def one_model(request: Request, model: str) -> Response:
    """GET …/models/{model}: one model, or 404 deployment_not_found naming the others."""
    request_id = new_request_id()
    try:
        models = await _models_of(request)
        if model not in models:
            listing = ", ".join(models) or "none"
            raise ProxyError(
                "deployment_not_found",
                f"Model '{model[:100]}' is not in this event's catalog. Models you can use: "
                f"{listing}.",
            )
    except ProxyError as error:
        return error_response(error, request_id)
    return _json(models[model], request_id)
