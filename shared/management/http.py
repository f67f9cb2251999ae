"""The management routes' handlers (docs/api.md#management): HTTP in, shared.management.manage,
JSON out. The route table (shared/management/routes.py) says which path and method each serves.

Every handler first learns who calls (shared/access/callers.py): the host lets manage/* through
without a function key, and a function key alone grants nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from shared.access.callers import Caller
from shared.access.guard import client_address
from shared.directory import Event, Resource
from shared.directory.validation import json_object
from shared.errors import ProxyError
from shared.governance.rollups import to_csv
from shared.management import manage, reports
from shared.pipeline import error_response, new_request_id
from shared.platform.tables import StorageUnavailable
from shared.runtime import Runtime, get_runtime

log = logging.getLogger(__name__)

Work = Callable[[Runtime, Caller, Request], Awaitable[Response]]
Handler = Callable[[Request], Awaitable[Response]]


def _json(data: Any, status: int = 200) -> Response:
    """JSON of plain values, and of the pydantic answer models among them."""
    return Response(orjson.dumps(data, default=_plain), status, media_type="application/json")


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    raise TypeError(f"{type(value).__name__} is not JSON")


def managed(work: Work) -> Handler:
    """A handler that runs `work` for the proven caller, and answers its refusals as errors."""

    async def handler(request: Request) -> Response:
        try:
            runtime = get_runtime()
            client = client_address(request.headers, request.client)
            caller = await runtime.callers.caller(request.headers, client, request.method)
            return await work(runtime, caller, request)
        except ProxyError as error:
            return error_response(error, new_request_id())
        except StorageUnavailable as exc:
            error = ProxyError(
                "storage_unavailable", "Storage is not reachable. Retry in a few seconds."
            )
            request_id = new_request_id()
            # The caller learns to retry; the operator's log says what storage answered.
            log.warning("%s %s (%s): storage unavailable: %s", request.method,
                        request.url.path, request_id, str(exc)[:500])  # fmt: skip
            return error_response(error, request_id)

    handler.__name__ = handler.__qualname__ = work.__name__
    handler.__doc__ = work.__doc__
    return handler


def _param(request: Request, name: str) -> str:
    return request.path_params[name]


# --- events and resources ------------------------------------------------------------------


def _owned[R: (Event, Resource)](
    noun: str,
    listed: Callable[[Runtime, Caller], Awaitable[list[R]]],
    create: Callable[[Runtime, Caller, dict[str, Any]], Awaitable[R]],
    find: Callable[[Runtime, Caller, str], Awaitable[R]],
    update: Callable[[Runtime, Caller, str, dict[str, Any]], Awaitable[R]],
) -> tuple[Handler, Handler, Handler, Handler]:
    """The list, create, get and update handlers of what organisers own (events, resources),
    over manage's functions for it; the id is the path's `<noun>_id`."""

    async def list_all(runtime: Runtime, caller: Caller, request: Request) -> Response:
        return _json([item.to_json() for item in await listed(runtime, caller)])

    async def create_one(runtime: Runtime, caller: Caller, request: Request) -> Response:
        created = await create(runtime, caller, await json_object(request))
        return _json(created.to_json(), 201)

    async def get_one(runtime: Runtime, caller: Caller, request: Request) -> Response:
        return _json((await find(runtime, caller, _param(request, f"{noun}_id"))).to_json())

    async def update_one(runtime: Runtime, caller: Caller, request: Request) -> Response:
        ident, body = _param(request, f"{noun}_id"), await json_object(request)
        return _json((await update(runtime, caller, ident, body)).to_json())

    names = (f"list_{noun}s", f"create_{noun}", f"get_{noun}", f"update_{noun}")
    for work, name in zip((list_all, create_one, get_one, update_one), names, strict=True):
        work.__name__ = work.__qualname__ = name
    return managed(list_all), managed(create_one), managed(get_one), managed(update_one)


list_events, create_event, get_event, update_event = _owned(
    "event", manage.list_events, manage.create_event, manage.event, manage.update_event
)
list_resources, create_resource, get_resource, update_resource = _owned(
    "resource",
    manage.list_resources,
    manage.create_resource,
    manage.resource,
    manage.update_resource,
)


@managed
async def delete_event(runtime: Runtime, caller: Caller, request: Request) -> Response:
    force = request.query_params.get("force", "").lower() == "true"
    await manage.delete_event(runtime, caller, _param(request, "event_id"), force=force)
    return Response(status_code=204)


@managed
async def delete_resource(runtime: Runtime, caller: Caller, request: Request) -> Response:
    await manage.delete_resource(runtime, caller, _param(request, "resource_id"))
    return Response(status_code=204)


# --- catalogs -----------------------------------------------------------------------------


@managed
async def list_catalog(runtime: Runtime, caller: Caller, request: Request) -> Response:
    found = await manage.event_catalog(runtime, caller, _param(request, "event_id"))
    return _json([r.to_json() for r in found])


@managed
async def attach_resource(runtime: Runtime, caller: Caller, request: Request) -> Response:
    event_id, resource_id = _param(request, "event_id"), _param(request, "resource_id")
    attached = await manage.attach(runtime, caller, event_id, resource_id)
    return _json({"event_id": event_id, "resource": attached.to_json()})  # CatalogEntry


@managed
async def detach_resource(runtime: Runtime, caller: Caller, request: Request) -> Response:
    event_id, resource_id = _param(request, "event_id"), _param(request, "resource_id")
    await manage.detach(runtime, caller, event_id, resource_id)
    return Response(status_code=204)


# --- attendees and usage ------------------------------------------------------------------


@managed
async def list_attendees(runtime: Runtime, caller: Caller, request: Request) -> Response:
    event_id = _param(request, "event_id")
    return _json(await reports.attendees_with_totals(runtime, caller, event_id))


@managed
async def add_attendee(runtime: Runtime, caller: Caller, request: Request) -> Response:
    event_id = _param(request, "event_id")
    found, created = await manage.add_attendee(
        runtime, caller, event_id, await json_object(request)
    )
    return _json(found.to_json(runtime.sealer), 201 if created else 200)


@managed
async def get_attendee(runtime: Runtime, caller: Caller, request: Request) -> Response:
    event_id, attendee_id = _param(request, "event_id"), _param(request, "attendee_id")
    found = await manage.attendee(runtime, caller, event_id, attendee_id)
    return _json(found.to_json(runtime.sealer))


@managed
async def revoke_attendee(runtime: Runtime, caller: Caller, request: Request) -> Response:
    event_id, attendee_id = _param(request, "event_id"), _param(request, "attendee_id")
    return _json((await manage.revoke(runtime, caller, event_id, attendee_id)).to_json())


@managed
async def rotate_attendee_key(runtime: Runtime, caller: Caller, request: Request) -> Response:
    event_id, attendee_id = _param(request, "event_id"), _param(request, "attendee_id")
    key = await manage.rotate(runtime, caller, event_id, attendee_id)
    found = await manage.attendee(runtime, caller, event_id, attendee_id)
    return _json({**found.to_json(), "api_key": key})


@managed
async def list_alerts(runtime: Runtime, caller: Caller, request: Request) -> Response:
    return _json(await manage.alerts(runtime, caller, _param(request, "event_id")))


@managed
async def rotate_alert_secret(runtime: Runtime, caller: Caller, request: Request) -> Response:
    secret = await manage.new_alert_secret(runtime, caller, _param(request, "event_id"))
    return _json({"secret": secret})


USAGE_FORMATS = ("json", "csv")


@managed
async def tool_calls(runtime: Runtime, caller: Caller, request: Request) -> Response:
    return _json(await reports.tool_calls(runtime, caller, _param(request, "event_id")))


@managed
async def usage_report(runtime: Runtime, caller: Caller, request: Request) -> Response:
    event_id = _param(request, "event_id")
    group_by = request.query_params.get("group_by", "attendee")
    answer_format = request.query_params.get("format", "json")
    if answer_format not in USAGE_FORMATS:
        raise ProxyError("invalid_request", "Query 'format' must be json or csv.", param="format")
    report = await reports.usage_report(runtime, caller, event_id, group_by)
    if answer_format == "csv":
        return Response(
            to_csv(report),
            media_type="text/csv",
            headers={
                "content-disposition": f'attachment; filename="usage-{event_id}-{group_by}.csv"'
            },
        )
    return _json(report)
