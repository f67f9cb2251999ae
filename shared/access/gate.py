"""The attendees' gate: who a proxy call is, from its key, its key made of an event's code, or its
Entra access token, and the events callers name by id.

A known key is answered from the access cache; only names never seen here cost a lookup, and
those meet the guards (shared/access/guard.py). Wrong keys, codes and tokens are counted
against the client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from shared.access.codes import CodeGuard
from shared.access.entra import (
    ATTENDEE_AUDIENCE,
    EVENT_HEADER,
    EntraVerifier,
    choose_event,
    looks_like_jwt,
    refused,
    token_tenant,
)
from shared.access.guard import FailedKeyGuard, client_address
from shared.directory.attendees import CODE_KEY_USER, Attendee, AttendeeStore, attendee_id
from shared.directory.cached import CachedDirectory, cached
from shared.directory.events import Event
from shared.directory.keys import (
    KEY_PREFIX,
    code_key_parts,
    hash_key,
    is_well_formed,
    key_from_headers,
)
from shared.directory.validation import is_email, is_id
from shared.errors import Revoked, WrongCredential
from shared.platform import clock
from shared.platform.cache import Misses, TTLCache

# How long a key that was not found is answered as unknown without a lookup: keys are random
# and never come back, so a miss is remembered long.
UNKNOWN_KEY_SECONDS = 600.0


@dataclass
class Access:
    """Who is calling, for which event."""

    attendee: Attendee
    event: Event


class Gate:
    """Turns a call's credential into its `Access`, or the specific reason it is refused."""

    def __init__(
        self,
        attendees: AttendeeStore,
        directory: CachedDirectory,
        codes: CodeGuard,
        entra: EntraVerifier,
        key_guard: FailedKeyGuard,
        event_guard: FailedKeyGuard,
        ttl: float,
    ) -> None:
        self._attendees = attendees
        self._directory = directory
        self._codes = codes
        self._entra = entra
        self._key_guard = key_guard  # wrong keys, codes and tokens per client
        self._event_guard = event_guard  # unknown event ids per client
        # Misses are kept apart from the cache, so random names cannot push out what is known.
        self._known: TTLCache[str, Attendee | None] = TTLCache(ttl, keep_none=False)
        self._unknown_keys = Misses(UNKNOWN_KEY_SECONDS)

    async def access(
        self, key: str | None, client: str = "", event_id: str | None = None
    ) -> Access:
        """The attendee and event of a key or an Entra access token. `event_id` is the event a
        token is for (header x-aiproxy-event), if named."""
        try:
            if key and looks_like_jwt(key):
                return await self._by_token(key, client, (event_id or "").strip())
            return await self._by_key(key, client)
        except WrongCredential:
            self._key_guard.failed(client)
            raise

    async def of_request(self, headers: Mapping[str, str], peer: tuple[str, int] | None) -> Access:
        """The attendee and event of a proxy request: its key or token (`api-key` or
        `Authorization`), its address, and the event it names (`x-aiproxy-event`)."""
        return await self.access(
            key_from_headers(headers.get("api-key"), headers.get("authorization")),
            client_address(headers, peer),
            headers.get(EVENT_HEADER),
        )

    async def caller_event(self, event_id: str, client: str) -> Event | None:
        """An event a caller names (public page, registration, code key, Entra header).

        A known one always answers: cached, or among the ids of every event (one list read per
        cache TTL, only while unseen ids are asked for). Unknown ids count against the client,
        who may then look up only a few ids it has never named (429 `too_many_failed_keys`):
        an id not in the list is looked up too, for events created since on other instances.
        """
        directory = self._directory
        unseen = not directory.holds_event(event_id) and not directory.missed_event(event_id)
        if unseen and event_id not in await directory.event_ids():
            self._event_guard.check_lookup(client)
        found = await directory.event(event_id)
        if found is None:
            self._event_guard.failed(client)
        return found

    def forget_key(self, key_hash: str) -> None:
        self._known.invalidate(key_hash)

    def forget_attendee(self, attendee: Attendee) -> None:
        """A revoked attendee: its key, and its keys made of the event's code or its token."""
        self._known.invalidate(attendee.key_hash)
        self._known.invalidate(_attendee_key(attendee.event_id, attendee.id))

    async def _by_key(self, key: str | None, client: str) -> Access:
        if not key:
            raise WrongCredential(
                "invalid_api_key",
                "No API key. Send your event key in the 'api-key' header "
                "or as 'Authorization: Bearer <key>'.",
            )
        if not key.startswith(KEY_PREFIX) and "@" in key:
            return await self._by_code(key, client)
        if not is_well_formed(key):
            raise WrongCredential(
                "invalid_api_key",
                "Malformed API key. Event keys look like 'aip-' followed by 32 letters and "
                "digits; copy it again from your registration page or organiser.",
            )
        key_hash = hash_key(key)
        # A key found before is answered from the cache (refreshed behind it when old): only
        # keys never seen here cost a lookup, and only those meet the guard.
        if not self._known.holds(key_hash):
            if key_hash in self._unknown_keys:
                raise unknown_key()
            self._key_guard.check_lookup(client)
        attendee = await cached(
            self._known, key_hash, lambda: self._attendees.find_by_key_hash(key_hash)
        )
        if attendee is None:
            self._unknown_keys.add(key_hash)
            raise unknown_key()
        if not attendee.active:
            raise Revoked(
                "key_revoked",
                "This key was revoked by the event organiser. Ask them for a new one.",
            )
        event = await self._directory.event(attendee.event_id)
        if event is None:
            raise WrongCredential("invalid_api_key", "The event of this key no longer exists.")
        return Access(attendee, event)

    async def _by_code(self, key: str, client: str) -> Access:
        """A `{event_id}@{shared_code}/{email}` key: checked against the event on every call (so
        a changed code takes effect with the event's cache), its attendee created on first use.

        The key itself is kept nowhere: the attendee is cached by event and attendee id. Its
        attendee is never the one issued to, registered or signed in as that email: it is named
        CODE_KEY_USER + email.
        """
        parts = code_key_parts(key)
        if parts is None or not is_id(parts[0]) or not is_email(parts[2]):
            raise WrongCredential(
                "invalid_api_key",
                "Malformed API key. Keys with the event's code look like "
                "'<event id>@<event code>/<your email>'.",
            )
        event_id, code, email = parts
        event = await self.caller_event(event_id, client)
        if event is None or not event.takes_code:
            raise WrongCredential(
                "invalid_api_key",
                "This event takes no keys made of its code. Register on its page, or ask the "
                "organiser for your key.",
            )
        await self._codes.check(
            event,
            code,
            client,
            lambda: WrongCredential(
                "invalid_api_key",
                f"That is not the code of event '{event.name}'. Check it with the organiser "
                "(it is case-sensitive).",
            ),
        )
        return await self._first_use(
            event, CODE_KEY_USER + email, admit=lambda: self._codes.admit_new(event, client)
        )

    async def _by_token(self, token: str, client: str, named: str) -> Access:
        """An Entra access token: verified (tenants some event takes only), then the attendee
        of its object id in the event it is for, created on first use."""
        tenant = token_tenant(token)
        candidates = await self._token_events(tenant, named, client)
        # No guard before verifying: it reads no storage (signing keys are fetched at most once
        # per tenant and refetch floor), and a valid token must always pass. A wrong one from
        # a client over its budget is told to slow down.
        try:
            identity = await self._entra.verify(token, tenant, (ATTENDEE_AUDIENCE,))
        except WrongCredential:
            self._key_guard.check_lookup(client)
            raise
        event = choose_event(candidates, tenant, clock.now())
        if not identity.allowed_by(event.entra_allowed):
            raise refused(
                f"{identity.name} (object id {identity.object_id}) is not among the users, apps "
                f"and groups event '{event.name}' allows. Ask the organiser to add your object "
                "id, or a group of yours, to the event's entra_allowed."
            )
        return await self._first_use(event, identity.user, identity.owner)

    async def _first_use(
        self,
        event: Event,
        user: str,
        identity: str = "",
        admit: Callable[[], Awaitable[None]] | None = None,
    ) -> Access:
        """The attendee of a caller without a key of its own (an event-code key's email, an
        Entra token's identity), from the access cache, created like a registration on first
        use (after `admit`, which may refuse a new one); refused once the organiser revoked
        it."""
        ident = attendee_id(event.id, identity or user)

        async def create() -> Attendee:
            if admit is not None and await self._attendees.get(event.id, ident) is None:
                await admit()
            attendee, _ = await self._attendees.add(
                event.id, user, now=clock.now(), identity=identity
            )
            return attendee

        attendee = await cached(self._known, _attendee_key(event.id, ident), create)
        if attendee is None or not attendee.active:
            raise Revoked(
                "key_revoked",
                "Your access to this event was revoked by the organiser. Ask them about it.",
            )
        return Access(attendee, event)

    async def _token_events(self, tenant: str, named: str, client: str) -> list[Event]:
        """The events a token of this tenant may be for: the one it names, or all that take
        the tenant. Refused when there is none, before its signature is even checked."""
        if named:
            event = await self.caller_event(named, client) if is_id(named) else None
            if event is None or tenant not in event.entra_tenants:
                raise refused(
                    f"Event '{named[:64]}' (header {EVENT_HEADER}) does not exist or takes no "
                    f"tokens of tenant {tenant}. Check the event id with the organiser."
                )
            return [event]
        found = await self._directory.tenant_events(tenant)
        if not found:
            raise refused(
                f"No event takes tokens of tenant {tenant}. Ask the organiser to add the tenant "
                "to the event's entra_tenants, or use your event key."
            )
        return found


def _attendee_key(event_id: str, attendee_id: str) -> str:
    """The access cache's entry of an attendee found without a key of its own (code, token)."""
    return f"attendee:{event_id}:{attendee_id}"


def unknown_key() -> WrongCredential:
    return WrongCredential(
        "invalid_api_key",
        "Unknown API key. Check that you copied the whole key for this event; "
        "a rotated key stops working.",
    )
