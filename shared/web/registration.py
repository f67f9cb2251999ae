"""Self-registration: an attendee gets its own key for an event, as the event allows
(`Event.takes_code`, `Event.takes_sign_in`).

Who may register: a signed-in user (trusted EasyAuth principal; user = "<idp>:<name or id>"),
or anybody with an email address and the event's shared code (user = the email, lower-cased).
Registration is open from the event's creation until it ends, while it is active.

A signed-in user registering again gets its own key back: the principal proves who it is. The
code proves nothing about the email, so a key is handed out by code once, to the registration
that creates the attendee; any later one for that email (the organiser's attendee, another
registrant's) is refused with 409, never answered with that attendee's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import orjson
from pydantic import AfterValidator, BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from shared.access.guard import client_address
from shared.access.principal import Principal, principal
from shared.directory.attendees import CODE_KEY_USER, Attendee, attendee_id
from shared.directory.events import Event
from shared.directory.models import Body, Filled, PublicEventFields, problem
from shared.directory.validation import is_email, is_id, json_object_of, parse
from shared.errors import CallerGone, ProxyError, StorageUnavailable, storage_down
from shared.pipeline import REQUEST_ID_HEADER, error_response, new_request_id
from shared.pipeline.bodies import read_body
from shared.platform import clock
from shared.runtime import Runtime
from shared.web.pages import base_path

# A registration body holds an email and a code: anything bigger is refused while it is read.
BODY_LIMIT = 16 * 1024


class Registered(BaseModel):
    """The answer to a registration: the key, and where and for what to use it."""

    api_key: str = Field(description="your key for this event")
    endpoint: str = Field(
        description="the base URL for the SDKs (azure_endpoint)",
        json_schema_extra={"format": "uri"},
    )
    attendee_id: str = Field(description="your attendee id")
    user: str = Field(description="your attendee name")
    event: PublicEventFields = Field(description="the event")


@dataclass
class Registration:
    """What a registered attendee gets back."""

    attendee: Attendee
    api_key: str
    event: Event
    created: bool

    def to_json(self, endpoint: str) -> dict[str, Any]:
        """The answer, a `Registered`."""
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
    if ":" in address:
        raise problem(
            "must not hold ':' (names like 'aad:…' are those of signed-in attendees)",
            "Send your plain email address.",
        )
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


async def check_shared_code(runtime: Runtime, event: Event, code: str, client: str) -> None:
    """The body's code against the event's, in constant time; wrong codes are counted."""
    await runtime.codes.check(
        event,
        code,
        client,
        lambda: ProxyError(
            "registration_refused",
            f"That is not the registration code of event '{event.name}'. Check the code with "
            "the organiser (it is case-sensitive) and try again.",
            param="shared_code",
        ),
    )


def _revoked(event: Event) -> ProxyError:
    return ProxyError(
        "registration_refused",
        f"Your key for event '{event.name}' was revoked by the organiser. "
        "Ask them to issue a new one.",
    )


async def register_user(runtime: Runtime, event: Event, signed_in: Principal) -> Registration:
    """A signed-in user's attendee and key for the event, created on first registration.

    The attendee is the user's stable id at its provider (`owner`), never its name: a name can
    change hands (a renamed GitHub login, a reassigned UPN), and its next holder must not get
    the key. An Entra sign-in and an Entra token of the same person are one attendee."""
    try:
        found, created = await runtime.attendees.add(
            event.id, signed_in.user, now=clock.now(), identity=signed_in.owner
        )
    except StorageUnavailable as exc:
        raise storage_down() from exc
    if not found.active:
        raise _revoked(event)
    return Registration(found, runtime.sealer.unseal(found.key_sealed), event, created)


async def register_email(
    runtime: Runtime, event: Event, email: str, client: str, sign_in: bool
) -> Registration:
    """A new attendee for an email that holds the event's code; refused if it exists."""

    def taken(found: Attendee) -> ProxyError:
        if not found.active:
            return _revoked(event)
        other = " or sign in and register again" if sign_in else ""
        return ProxyError(
            "conflict",
            f"'{email}' is already registered for event '{event.name}', and a key is shown "
            "only once, to whoever registered first. If that was you and you lost the key, "
            f"ask the organiser to rotate it (they give you the new one){other}.",
            param="email",
        )

    try:
        found = await runtime.attendees.get(event.id, attendee_id(event.id, email))
        if found is not None:
            raise taken(found)
        await runtime.codes.admit_new(event, client)
        found, created = await runtime.attendees.add(
            event.id, email, now=clock.now(), self_registered=True
        )
    except StorageUnavailable as exc:
        raise storage_down() from exc
    if not created:  # another registration for the same email won the race
        raise taken(found)
    return Registration(found, runtime.sealer.unseal(found.key_sealed), event, created)


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, read up to BODY_LIMIT bytes (413 past it, unread)."""
    try:
        raw = await read_body(request, BODY_LIMIT)
    except CallerGone:
        raise ProxyError("invalid_request", "The body ended before it was complete.") from None
    return json_object_of(raw)


def endpoint_of(request: Request, route_start: str = "events/") -> str:
    """The proxy's base URL as the caller reached it: <scheme>://<host>/<route prefix>.

    `route_start` is how the called route begins; everything before it is the prefix ('/api').
    """
    headers = request.headers
    scheme = (headers.get("x-forwarded-proto") or request.url.scheme).split(",")[0].strip()
    host = (headers.get("x-forwarded-host") or request.url.netloc).split(",")[0].strip()
    return f"{scheme}://{host}{base_path(request, route_start)}"


async def register(runtime: Runtime, request: Request, event_id: str) -> Response:
    """POST /api/events/{event_id}/register: 201 with a new key; 200 with the same one again
    for a signed-in user; 409 for an email registered before."""
    request_id = new_request_id()
    try:
        client = client_address(request.headers, request.client)
        event = await runtime.gate.caller_event(event_id, client) if is_id(event_id) else None
        if event is None:
            raise ProxyError("not_found", f"No event with id '{event_id[:64]}'.")
        check_registration_open(event)
        sign_in = runtime.settings.trust_easyauth and event.takes_sign_in
        signed_in = principal(request.headers, runtime.settings)
        if signed_in is not None and sign_in:
            if signed_in.user.startswith(CODE_KEY_USER):  # a provider the operator named 'code'
                raise ProxyError(
                    "registration_refused",
                    "Sign-in with a provider named 'code' cannot register: its users would be "
                    "the attendees of keys made of the event's code. Ask the operator.",
                )
            registration = await register_user(runtime, event, signed_in)
        elif event.takes_code:
            body = parse(RegistrationRequest, await read_json(request))
            await check_shared_code(runtime, event, body.shared_code, client)
            registration = await register_email(runtime, event, body.email, client, sign_in)
        elif sign_in:
            raise ProxyError(
                "registration_refused",
                f"Event '{event.name}' takes registrations of signed-in users only. "
                "Sign in first, or ask the organiser for your key.",
            )
        else:
            raise ProxyError(
                "registration_refused",
                f"Event '{event.name}' takes no self-registration"
                + (" by sign-in" if signed_in is not None else "")
                + ". Ask the organiser for your key.",
            )
    except ProxyError as error:
        return error_response(error, request_id)
    return Response(
        orjson.dumps(registration.to_json(endpoint_of(request))),
        201 if registration.created else 200,
        {REQUEST_ID_HEADER: request_id, "cache-control": "no-store"},
        media_type="application/json",
    )
