"""Self-registration (API.md section 4): an attendee gets its own key for an event.

Who may register: a signed-in user (trusted EasyAuth principal; user = "<idp>:<name or id>"),
or anybody with an email address and the event's shared code (user = the email, lower-cased).
Registration is open from the event's creation until it ends, while it is active. The same user
registering again gets the same attendee and key back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import orjson
from pydantic import AfterValidator, Field
from starlette.requests import Request
from starlette.responses import Response

from shared.access.guard import client_address, failed_codes
from shared.access.principal import principal
from shared.directory.attendees import Attendee
from shared.directory.events import Event
from shared.directory.keys import same_secret
from shared.directory.models import Body, Filled, problem
from shared.directory.validation import is_email, is_id, json_object, parse
from shared.errors import ProxyError
from shared.pipeline import REQUEST_ID_HEADER, error_response, new_request_id
from shared.platform import clock
from shared.platform.tables import StorageUnavailable
from shared.runtime import Runtime, get_runtime, storage_down
from shared.web.pages import base_path


@dataclass
class Registration:
    """What a registered attendee gets back."""

    attendee: Attendee
    api_key: str
    event: Event
    created: bool

    def to_json(self, endpoint: str) -> dict[str, Any]:
        return {
            "api_key": self.api_key,
            "endpoint": endpoint,
            "attendee_id": self.attendee.id,
            "user": self.attendee.user,
            "event": self.event.public(),
        }


def check_registration_open(event: Event) -> None:
    """Registration runs from the event's creation until its end, while it is switched on."""
    if not event.active:
        raise ProxyError(
            "event_inactive",
            f"Event '{event.name}' is switched off by its organiser and takes no registrations "
            "now. Ask them to activate it.",
        )
    if clock.now() >= event.window_utc()[1]:
        raise ProxyError(
            "event_ended",
            f"Event '{event.name}' has ended, so registration is closed. "
            f"It ran {event.describe_window()}.",
        )


def _email(value: str) -> str:
    address = value.lower()
    if not is_email(address):
        raise problem(
            "must be an email address such as 'ada@example.com'",
            "Send the address you want your key for.",
        )
    return address


class RegistrationRequest(Body):
    """Not needed when signed in (EasyAuth)."""

    noun: ClassVar[str] = "a registration"

    email: Annotated[Filled, AfterValidator(_email)] = Field(
        description="your email address; it becomes your attendee name, lower-cased"
    )
    shared_code: Filled = Field(description="the registration code from the organiser")


def check_shared_code(event: Event, code: str, client: str) -> None:
    """The body's code against the event's, in constant time; wrong codes are counted."""
    if not same_secret(code, event.shared_code):  # a right code always passes
        failed_codes.check(event.id, client)
        failed_codes.record(event.id, client)
        raise ProxyError(
            "registration_refused",
            f"That is not the registration code of event '{event.name}'. Check the code with "
            "the organiser (it is case-sensitive) and try again.",
            param="shared_code",
        )


async def register_user(runtime: Runtime, event: Event, user: str) -> Registration:
    """The user's attendee and key for the event, created on first registration."""
    try:
        found, created = await runtime.attendees.add(event.id, user, now=clock.now())
    except StorageUnavailable as exc:
        raise storage_down() from exc
    if not found.active:
        raise ProxyError(
            "registration_refused",
            f"Your key for event '{event.name}' was revoked by the organiser. "
            "Ask them to issue a new one.",
        )
    return Registration(found, runtime.sealer.unseal(found.key_sealed), event, created)


def endpoint_of(request: Request, route_start: str = "events/") -> str:
    """The proxy's base URL as the caller reached it: <scheme>://<host>/<route prefix>.

    `route_start` is how the called route begins; everything before it is the prefix ('/api').
    """
    headers = request.headers
    scheme = (headers.get("x-forwarded-proto") or request.url.scheme).split(",")[0].strip()
    host = (headers.get("x-forwarded-host") or request.url.netloc).split(",")[0].strip()
    return f"{scheme}://{host}{base_path(request, route_start)}"


async def register(request: Request, event_id: str) -> Response:
    """POST /api/events/{event_id}/register: 201 with a new key, 200 with the same one again."""
    runtime = get_runtime()
    request_id = new_request_id()
    try:
        client = client_address(request.headers, request.client)
        event = await runtime.caller_event(event_id, client) if is_id(event_id) else None
        if event is None:
            raise ProxyError("not_found", f"No event with id '{event_id[:64]}'.")
        check_registration_open(event)
        signed_in = principal(request.headers, runtime.settings)
        if signed_in is not None:
            user = signed_in.user
        elif not event.shared_code:
            how = "Sign in first, or ask" if runtime.settings.trust_easyauth else "Ask"
            raise ProxyError(
                "registration_refused",
                f"Event '{event.name}' does not take registrations with a code. "
                f"{how} the organiser for your key.",
            )
        else:
            body = parse(RegistrationRequest, await json_object(request))
            check_shared_code(event, body.shared_code, client)
            user = body.email
        registration = await register_user(runtime, event, user)
    except ProxyError as error:
        return error_response(error, request_id)
    return Response(
        orjson.dumps(registration.to_json(endpoint_of(request))),
        201 if registration.created else 200,
        {REQUEST_ID_HEADER: request_id, "cache-control": "no-store"},
        media_type="application/json",
    )
