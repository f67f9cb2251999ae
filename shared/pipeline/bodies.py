"""Reading a call's body: within the size limit, as a JSON object where one is expected, and
the deployment it names."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from shared.directory.catalog import valid_deployment_name
from shared.errors import CallerGone, ProxyError


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        "payload_too_large",
        f"The request body is larger than this proxy accepts ({limit} bytes). Send less.",
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise CallerGone from None
    return b"".join(chunks)


def parse_json_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    if content_type and "json" not in content_type.lower():
        raise ProxyError(
            "invalid_request",
            f"Content type {content_type!r} is not accepted here: send 'application/json'.",
        )
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(
            "invalid_request", f"The request body is not valid JSON ({exc.msg})."
        ) from exc
    if not isinstance(payload, dict):
        raise ProxyError("invalid_request", "The request body must be a JSON object.")
    return payload


def deployment_named(payload: dict[str, Any], deployment: str | None) -> str:
    """The deployment the path names, or else the body's `model`."""
    if deployment is None:
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise ProxyError(
                "invalid_request",
                "Field 'model' is required: name one of the event's deployments.",
                param="model",
            )
        deployment = model
    if not valid_deployment_name(deployment):
        raise ProxyError(
            "deployment_not_found",
            "Deployment names hold letters, digits, '.', '_' and '-' (at most 64).",
        )
    return deployment
