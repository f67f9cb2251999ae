"""Management routes (docs/api.md#management): HTTP in, calls into shared.management.manage, JSON out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import azure.functions as func
import orjson
from azurefunctions.extensions.http.fastapi import Request, Response
from starlette.responses import Response as StarletteResponse

from shared.access.callers import Caller
from shared.access.guard import client_address
from shared.directory.validation import json_object
from shared.errors import ProxyError
from shared.management import manage
from shared.pipeline import error_response, new_request_id
from shared.platform.tables import StorageUnavailable
from shared.runtime import get_runtime

bp = func.Blueprint()

# The app is the gate of every management route (shared/access/callers.py): the host lets
# calls through without a function key, and a function key alone grants nothing.
_APP = func.AuthLevel.ANONYMOUS


def _json(data: Any, status: int = 200) -> StarletteResponse:
    return StarletteResponse(orjson.dumps(data), status, media_type="application/json")


async def _caller(req: Any) -> Caller:
    """The operator or organiser the call's credentials prove; refused (401/403) otherwise."""
    client = client_address(req.headers, req.client)
    return await get_runtime().callers.caller(req.headers, client, req.method)


async def _answer(work: Callable[[], Awaitable[StarletteResponse]]) -> StarletteResponse:
    try:
        return await work()
    except ProxyError as error:
        return error_response(error, new_request_id())
    except StorageUnavailable:
        error = ProxyError(
            "storage_unavailable", "Storage is not reachable. Retry in a few seconds."
        )
        return error_response(error, new_request_id())


@bp.route(route="manage/events", methods=["GET", "POST"], auth_level=_APP)
async def manage_events(req: Request) -> Response:
    async def work() -> StarletteResponse:
        runtime, caller = get_runtime(), await _caller(req)
        if req.method == "POST":
            created = await manage.create_event(runtime, caller, await json_object(req))
            return _json(created.to_json(), 201)
        return _json([e.to_json() for e in await manage.list_events(runtime, caller)])

    return await _answer(work)


@bp.route(route="manage/events/{event_id}", methods=["GET", "PATCH", "DELETE"], auth_level=_APP)
async def manage_event(req: Request) -> Response:
    event_id = req.path_params["event_id"]

    async def work() -> StarletteResponse:
        runtime, caller = get_runtime(), await _caller(req)
        if req.method == "PATCH":
            changed = await manage.update_event(runtime, caller, event_id, await json_object(req))
            return _json(changed.to_json())
        if req.method == "DELETE":
            force = req.query_params.get("force", "").lower() == "true"
            await manage.delete_event(runtime, caller, event_id, force=force)
            return StarletteResponse(status_code=204)
        return _json((await manage.event(runtime, caller, event_id)).to_json())

    return await _answer(work)


@bp.route(route="manage/resources", methods=["GET", "POST"], auth_level=_APP)
async def manage_resources(req: Request) -> Response:
    async def work() -> StarletteResponse:
        runtime, caller = get_runtime(), await _caller(req)
        if req.method == "POST":
            created = await manage.create_resource(runtime, caller, await json_object(req))
            return _json(created.to_json(), 201)
        return _json([r.to_json() for r in await manage.list_resources(runtime, caller)])

    return await _answer(work)


@bp.route(
    route="manage/resources/{resource_id}", methods=["GET", "PATCH", "DELETE"], auth_level=_APP
)
async def manage_resource(req: Request) -> Response:
    resource_id = req.path_params["resource_id"]

    async def work() -> StarletteResponse:
        runtime, caller = get_runtime(), await _caller(req)
        if req.method == "PATCH":
            changed = await manage.update_resource(
                runtime, caller, resource_id, await json_object(req)
            )
            return _json(changed.to_json())
        if req.method == "DELETE":
            await manage.delete_resource(runtime, caller, resource_id)
            return StarletteResponse(status_code=204)
        return _json((await manage.resource(runtime, caller, resource_id)).to_json())

    return await _answer(work)


@bp.route(route="manage/events/{event_id}/resources", methods=["GET"], auth_level=_APP)
async def manage_event_catalog(req: Request) -> Response:
    event_id = req.path_params["event_id"]

    async def work() -> StarletteResponse:
        found = await manage.event_catalog(get_runtime(), await _caller(req), event_id)
        return _json([r.to_json() for r in found])

    return await _answer(work)


@bp.route(
    route="manage/events/{event_id}/resources/{resource_id}",
    methods=["PUT", "DELETE"],
    auth_level=_APP,
)
async def manage_event_resource(req: Request) -> Response:
    event_id, resource_id = req.path_params["event_id"], req.path_params["resource_id"]

    async def work() -> StarletteResponse:
        runtime, caller = get_runtime(), await _caller(req)
        if req.method == "DELETE":
            await manage.detach(runtime, caller, event_id, resource_id)
            return StarletteResponse(status_code=204)
        attached = await manage.attach(runtime, caller, event_id, resource_id)
        return _json({"event_id": event_id, "resource": attached.to_json()})

    return await _answer(work)


@bp.route(route="manage/events/{event_id}/attendees", methods=["GET", "POST"], auth_level=_APP)
async def manage_attendees(req: Request) -> Response:
    event_id = req.path_params["event_id"]

    async def work() -> StarletteResponse:
        runtime, caller = get_runtime(), await _caller(req)
        if req.method == "POST":
            found, created = await manage.add_attendee(
                runtime, caller, event_id, await json_object(req)
            )
            return _json(found.to_json(runtime.sealer), 201 if created else 200)
        return _json(await manage.attendees_with_totals(runtime, caller, event_id))

    return await _answer(work)


@bp.route(
    route="manage/events/{event_id}/attendees/{attendee_id}",
    methods=["GET", "DELETE"],
    auth_level=_APP,
)
async def manage_attendee(req: Request) -> Response:
    event_id, attendee_id = req.path_params["event_id"], req.path_params["attendee_id"]

    async def work() -> StarletteResponse:
        runtime, caller = get_runtime(), await _caller(req)
        if req.method == "DELETE":
            revoked = await manage.revoke(runtime, caller, event_id, attendee_id)
            return _json(revoked.to_json())
        found = await manage.attendee(runtime, caller, event_id, attendee_id)
        return _json(found.to_json(runtime.sealer))

    return await _answer(work)


@bp.route(
    route="manage/events/{event_id}/attendees/{attendee_id}/rotate",
    methods=["POST"],
    auth_level=_APP,
)
async def manage_attendee_rotate(req: Request) -> Response:
    event_id, attendee_id = req.path_params["event_id"], req.path_params["attendee_id"]

    async def work() -> StarletteResponse:
        runtime, caller = get_runtime(), await _caller(req)
        key = await manage.rotate(runtime, caller, event_id, attendee_id)
        found = await manage.attendee(runtime, caller, event_id, attendee_id)
        return _json({**found.to_json(), "api_key": key})

    return await _answer(work)


@bp.route(route="manage/events/{event_id}/usage", methods=["GET"], auth_level=_APP)
async def manage_usage(req: Request) -> Response:
    event_id = req.path_params["event_id"]

    async def work() -> StarletteResponse:
        group_by = req.query_params.get("group_by", "attendee")
        answer_format = req.query_params.get("format", "json")
        if answer_format not in ("json", "csv"):
            raise ProxyError(
                "invalid_request", "Query 'format' must be json or csv.", param="format"
            )
        report = await manage.usage_report(get_runtime(), await _caller(req), event_id, group_by)
        if answer_format == "csv":
            from shared.governance.rollups import to_csv

            return StarletteResponse(
                to_csv(report),
                media_type="text/csv",
                headers={
                    "content-disposition": f'attachment; filename="usage-{event_id}-{group_by}.csv"'
                },
            )
        return _json(report)

    return await _answer(work)
