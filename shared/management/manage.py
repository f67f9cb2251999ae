"""What organisers can do: events, resources, catalogs and attendees (docs/api.md#management).

Each function takes the runtime, the caller and plain values, and returns plain data or raises
ProxyError; the HTTP side lives in shared/management/http.py.

Organisers see and change only what they own. The operator's powers stay the operator's: every
event and resource, the app's managed identity, and letting any Entra tenant into an event.
"""

from __future__ import annotations

from typing import Any

from shared.access.callers import Caller
from shared.directory.attendees import Attendee
from shared.directory.catalog import Resource, new_resource, patch_resource
from shared.directory.events import Event, new_event, patch_event
from shared.directory.models import AttendeeCreate
from shared.directory.records import Rows
from shared.directory.validation import is_id, parse
from shared.errors import ProxyError
from shared.governance.alerts import AlertView
from shared.platform import clock
from shared.runtime import Runtime


def _not_found(kind: str, ident: str) -> ProxyError:
    return ProxyError("not_found", f"No {kind} with id '{ident[:64]}'.")


def _check_tenants(caller: Caller, tenants: list[str], already: list[str]) -> None:
    """An organiser may let in only tenants it signed in from; ones already there may stay."""
    foreign = [t for t in tenants if t not in already and not caller.may_name_tenant(t)]
    if foreign:
        yours = ", ".join(sorted(caller.tenants)) or "none: you did not sign in with Entra ID"
        raise ProxyError(
            "forbidden",
            f"You may not let tenant {foreign[0]} into an event: organisers may add only the "
            f"tenants they belong to (yours: {yours}). Ask the operator to add it.",
            param="entra_tenants",
        )


def _check_managed_identity(caller: Caller, resource: Resource) -> None:
    """The app's own identity reaches whatever the operator granted it: operators' only."""
    if resource.auth == "managed_identity" and not caller.operator:
        raise ProxyError(
            "forbidden",
            "Only the operator may set up resources that call with the app's managed identity. "
            "Use auth 'key' with the deployment's api_key.",
            param="auth",
        )


async def _find[R: (Event, Resource)](rows: Rows[R], caller: Caller, ident: str, noun: str) -> R:
    """An event or a resource by id, if this caller may see it; 404 for others' and unknown."""
    found = await rows.get(ident) if is_id(ident) else None
    if found is None or not caller.may_see(found.owner):
        raise _not_found(noun, ident)
    return found


async def _visible[R: (Event, Resource)](rows: Rows[R], caller: Caller) -> list[R]:
    """The events or resources this caller may see."""
    return [item for item in await rows.list() if caller.may_see(item.owner)]


async def event(runtime: Runtime, caller: Caller, event_id: str) -> Event:
    return await _find(runtime.events, caller, event_id, "event")


async def resource(runtime: Runtime, caller: Caller, resource_id: str) -> Resource:
    return await _find(runtime.catalog.resources, caller, resource_id, "resource")


async def list_events(runtime: Runtime, caller: Caller) -> list[Event]:
    return await _visible(runtime.events, caller)


async def list_resources(runtime: Runtime, caller: Caller) -> list[Resource]:
    return await _visible(runtime.catalog.resources, caller)


async def create_event(runtime: Runtime, caller: Caller, body: dict[str, Any]) -> Event:
    created = new_event(body, owner=caller.owner, now=clock.now())
    _check_tenants(caller, created.entra_tenants, [])
    await runtime.events.create(created)
    runtime.directory.forget_event(created.id)  # the tenants it takes tokens of
    return created


async def update_event(
    runtime: Runtime, caller: Caller, event_id: str, body: dict[str, Any]
) -> Event:
    found = await event(runtime, caller, event_id)
    before = list(found.entra_tenants)
    patch_event(found, body)
    _check_tenants(caller, found.entra_tenants, before)
    await runtime.events.save(found)
    runtime.directory.forget_event(event_id)
    return found


async def delete_event(runtime: Runtime, caller: Caller, event_id: str, *, force: bool) -> None:
    found = await event(runtime, caller, event_id)
    attendees = await runtime.attendees.list(found.id)
    if attendees and not force:
        raise ProxyError(
            "conflict",
            f"Event '{found.name}' has {len(attendees)} attendees. "
            "Delete it with ?force=true to remove them and their keys too.",
        )
    for attendee in attendees:
        runtime.gate.forget_key(attendee.key_hash)
    await runtime.attendees.delete_event(found.id)
    for resource_id in await runtime.catalog.resource_ids(found.id):
        await runtime.catalog.detach(found.id, resource_id)
    await runtime.events.delete(found.id)
    await runtime.codes.forget(found.id)  # its counts of wrong codes and new attendees
    runtime.directory.forget_event(found.id)


async def create_resource(runtime: Runtime, caller: Caller, body: dict[str, Any]) -> Resource:
    created, api_key = new_resource(body, owner=caller.owner, now=clock.now())
    _check_managed_identity(caller, created)
    if api_key is not None:
        await runtime.secrets.put(created.secret_name, api_key)
        created.has_api_key = True
    await runtime.catalog.resources.save(created)
    return created


async def update_resource(
    runtime: Runtime, caller: Caller, resource_id: str, body: dict[str, Any]
) -> Resource:
    found = await resource(runtime, caller, resource_id)
    api_key = patch_resource(found, body)
    _check_managed_identity(caller, found)
    if found.auth in ("managed_identity", "none"):
        if found.has_api_key:  # a key unused from now on is not kept
            await runtime.secrets.delete(found.secret_name)
            found.has_api_key = False
    elif api_key is not None:
        await runtime.secrets.put(found.secret_name, api_key)
        found.has_api_key = True
    await runtime.catalog.resources.save(found)
    runtime.directory.forget_resource(found)
    return found


async def delete_resource(runtime: Runtime, caller: Caller, resource_id: str) -> None:
    found = await resource(runtime, caller, resource_id)
    users = await runtime.catalog.events_using(found.id)
    if users:
        # Name only the events this caller may see; an owner learns nothing of others' events.
        visible = [e.id for e in await list_events(runtime, caller) if e.id in users]
        named = f" ({', '.join(visible[:5])})" if visible else ""
        others = len(users) - len(visible)
        hidden = f" {others} of them are not yours: ask an operator." if others else ""
        raise ProxyError(
            "conflict",
            f"Resource '{found.name}' is in the catalog of {len(users)} event(s){named}. "
            f"Detach it from them first.{hidden}",
        )
    await runtime.secrets.delete(found.secret_name)
    await runtime.catalog.resources.delete(found.id)
    runtime.directory.forget_resource(found)


async def attach(runtime: Runtime, caller: Caller, event_id: str, resource_id: str) -> Resource:
    found_event = await event(runtime, caller, event_id)
    found = await resource(runtime, caller, resource_id)
    await runtime.catalog.attach(found_event.id, found.id)
    runtime.directory.forget_event(found_event.id)
    return found


async def detach(runtime: Runtime, caller: Caller, event_id: str, resource_id: str) -> None:
    found_event = await event(runtime, caller, event_id)
    if resource_id not in await runtime.catalog.resource_ids(found_event.id):
        raise ProxyError(
            "not_found", f"Resource '{resource_id[:64]}' is not in this event's catalog."
        )
    await runtime.catalog.detach(found_event.id, resource_id)
    runtime.directory.forget_event(found_event.id)


async def event_catalog(runtime: Runtime, caller: Caller, event_id: str) -> list[Resource]:
    found_event = await event(runtime, caller, event_id)
    return await runtime.catalog.event_resources(found_event.id)


async def add_attendee(
    runtime: Runtime, caller: Caller, event_id: str, body: dict[str, Any]
) -> tuple[Attendee, bool]:
    found_event = await event(runtime, caller, event_id)
    user = parse(AttendeeCreate, body).user
    found, created = await runtime.attendees.add(found_event.id, user, now=clock.now())
    if found.self_registered:
        # Whoever registered with the event's code saw that key, and may not be this user: the
        # organiser hands out a key nobody else has seen.
        old_hash = found.key_hash
        await runtime.attendees.rotate(found)
        runtime.gate.forget_key(old_hash)
    return found, created


async def attendee(runtime: Runtime, caller: Caller, event_id: str, attendee_id: str) -> Attendee:
    found_event = await event(runtime, caller, event_id)
    found = await runtime.attendees.get(found_event.id, attendee_id) if is_id(attendee_id) else None
    if found is None:
        raise _not_found("attendee", attendee_id)
    return found


async def list_attendees(runtime: Runtime, caller: Caller, event_id: str) -> list[Attendee]:
    found_event = await event(runtime, caller, event_id)
    return await runtime.attendees.list(found_event.id)


async def revoke(runtime: Runtime, caller: Caller, event_id: str, attendee_id: str) -> Attendee:
    found = await attendee(runtime, caller, event_id, attendee_id)
    await runtime.attendees.revoke(found, now=clock.now())
    runtime.gate.forget_attendee(found)
    return found


async def rotate(runtime: Runtime, caller: Caller, event_id: str, attendee_id: str) -> str:
    found = await attendee(runtime, caller, event_id, attendee_id)
    old_hash = found.key_hash
    key = await runtime.attendees.rotate(found)
    runtime.gate.forget_key(old_hash)
    return key


async def alerts(runtime: Runtime, caller: Caller, event_id: str) -> list[AlertView]:
    """The budget thresholds the event has reached, each fired once."""
    found = await event(runtime, caller, event_id)
    return await runtime.alerts.fired(found.id)


async def new_alert_secret(runtime: Runtime, caller: Caller, event_id: str) -> str:
    """A new key for signing the event's alert webhooks (shown once)."""
    found = await event(runtime, caller, event_id)
    return await runtime.alerts.new_secret(found.id)
