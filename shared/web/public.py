"""Anonymous routes: public event info for registration, and health."""

from __future__ import annotations

import logging
from typing import Literal

import orjson
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from shared.access.guard import client_address
from shared.directory.validation import is_id
from shared.errors import ProxyError
from shared.pipeline import error_response, new_request_id
from shared.platform import clock
from shared.platform.tables import StorageUnavailable
from shared.runtime import Runtime

log = logging.getLogger(__name__)


class Health(BaseModel):
    """Whether the app can serve: storage answers."""

    status: Literal["ok", "degraded"]
    storage: Literal["ok", "unavailable", "error"] = Field(
        description="'ok'; 'unavailable' when storage does not answer, 'error' when the check "
        "failed otherwise (the reason is in the app's log)"
    )
    usage_pending: int = Field(ge=0, description="usage records waiting to be written")


async def event_page_info(runtime: Runtime, request: Request, event_id: str) -> Response:
    client = client_address(request.headers, request.client)
    try:
        found = await runtime.gate.caller_event(event_id, client) if is_id(event_id) else None
    except ProxyError as error:
        return error_response(error, new_request_id())
    if found is None:
        return error_response(
            ProxyError("not_found", f"No event with id '{event_id[:64]}'."), new_request_id()
        )
    _, ends = found.window_utc()
    by_code = found.takes_code  # whether a code is asked for, never the code
    by_sign_in = runtime.settings.trust_easyauth and found.takes_sign_in
    registration = {
        "open": found.active and clock.now() < ends,  # the page's "closed" or "paused"
        "shared_code": by_code,
        "sign_in": by_sign_in,
    }
    body = {**found.public(), "registration": registration}
    return Response(orjson.dumps(body), media_type="application/json")


async def health(runtime: Runtime) -> Response:
    """200 when storage answers, 503 otherwise. Anyone may call it, so it says only a stable
    word about storage; why it is unavailable goes to the log."""
    try:
        await runtime.events.list()
        status, storage = 200, "ok"
    except StorageUnavailable as exc:
        log.warning("health: storage unavailable: %s", exc)
        status, storage = 503, "unavailable"
    except Exception:
        log.exception("health: storage check failed")
        status, storage = 503, "error"
    body = Health(
        status="ok" if status == 200 else "degraded",
        storage=storage,
        usage_pending=runtime.usage.pending,
    )
    return Response(body.model_dump_json(), status, media_type="application/json")
