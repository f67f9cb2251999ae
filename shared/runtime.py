"""The long-lived objects of one process, and the cached lookups on the request path.

Created on first use inside the running event loop (the Functions worker's or the dev
host's), closed by `shutdown()`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from shared.access.callers import Callers
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
from shared.access.guard import FailedKeyGuard, Misses
from shared.directory.attendees import Attendee, AttendeeStore, attendee_id
from shared.directory.catalog import CatalogStore, Resource
from shared.directory.events import Event, EventStore
from shared.directory.keys import KEY_PREFIX, code_key_parts, hash_key, is_well_formed
from shared.directory.validation import is_email, is_id
from shared.errors import ProxyError
from shared.governance.caps import Caps
from shared.governance.fairshare import FairShare
from shared.governance.ratelimits import RateLimits
from shared.governance.usage import UsageWriter
from shared.platform import clock, hosting
from shared.platform import settings as settings_module
from shared.platform.cache import TTLCache
from shared.platform.settings import Settings
from shared.platform.tables import StorageUnavailable, Tables
from shared.platform.vault import Sealer, SecretStore, secret_store
from shared.plugins import Plugins
from shared.plugins import load as load_plugins
from shared.upstreams.affinity import AffinitySeal
from shared.upstreams.balancer import Balancer
from shared.upstreams.client import UpstreamClient

log = logging.getLogger(__name__)

# Storage outages fall back to what was cached before, however old.
_STALE_ON = (StorageUnavailable,)
# How long a key or an event id that was not found is answered as unknown without a lookup.
# Keys are random and never come back, so a miss is remembered long; an event id can be
# asked for just before it is created (elsewhere: here `forget_event` clears it at once).
UNKNOWN_KEY_SECONDS = 600.0
UNKNOWN_EVENT_SECONDS = 30.0


@dataclass
class Access:
    """Who is calling, for which event."""

    attendee: Attendee
    event: Event


class Runtime:
    """Stores, caches and clients shared by every request of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.plugins: Plugins = load_plugins(settings)  # first: one that fails leaves nothing open
        self.pruning: asyncio.Task[None] | None = None  # the worker runtime's leak (hosting)
        self.tables = Tables(settings)
        self.sealer = Sealer(settings.encryption_key)
        self.affinity = AffinitySeal(settings.encryption_key)
        self.secrets: SecretStore = secret_store(settings, self.tables, self.sealer)
        self.events = EventStore(self.tables)
        self.catalog = CatalogStore(self.tables)
        self.attendees = AttendeeStore(self.tables, self.sealer)
        self.upstream = UpstreamClient(settings)
        self.balancer = Balancer(self.tables, settings.sync_seconds)
        self.caps = Caps(self.tables, settings.sync_seconds)
        self.limits = RateLimits(self.caps, FairShare(self.tables, settings.sync_seconds))
        spill_dir = Path(
            settings.usage_spill_dir
            or Path(tempfile.gettempdir()) / f"aiproxy-usage-{settings.table_prefix}"
        )
        self.usage = UsageWriter(
            self.tables, settings.usage_flush_seconds, spill_dir, observer=self.plugins.observer
        )
        # Wrong keys and unknown event ids per client address (shared/access/guard.py). Misses
        # are kept apart from the caches, so random names cannot push out what is known.
        self.guard = FailedKeyGuard()
        self.event_guard = FailedKeyGuard(wrong="event ids")
        self.unknown_keys = Misses(UNKNOWN_KEY_SECONDS)
        self.unknown_events = Misses(UNKNOWN_EVENT_SECONDS)
        self.codes = CodeGuard(self.tables, settings)
        self.entra = EntraVerifier(settings)
        self.callers = Callers(settings, self.entra, self.guard)  # who manages: manage/*
        ttl = settings.cache_ttl_seconds
        self._access: TTLCache[str, Attendee | None] = TTLCache(ttl, keep_none=False)
        self._events: TTLCache[str, Event | None] = TTLCache(ttl, keep_none=False)
        self._pools: TTLCache[str, dict[str, list[Resource]]] = TTLCache(ttl)
        self._tenants: TTLCache[str, dict[str, list[str]]] = TTLCache(ttl)  # tenant -> events
        self._event_ids: TTLCache[str, frozenset[str]] = TTLCache(ttl)  # every event, by id
        self._secrets: TTLCache[str, str | None] = TTLCache(max(ttl, 300.0))

    async def access(
        self, key: str | None, client: str = "", event_id: str | None = None
    ) -> Access:
        """The attendee and event of a key or an Entra access token, or the specific reason it
        is refused. `event_id` is the event a token is for (header x-aiproxy-event), if named."""
        try:
            if key and looks_like_jwt(key):
                return await self._token_access(key, client, (event_id or "").strip())
            return await self._access_of(key, client)
        except ProxyError as error:
            if error.code in ("invalid_api_key", "invalid_token"):
                self.guard.failed(client)
            raise

    async def _access_of(self, key: str | None, client: str) -> Access:
        if not key:
            raise ProxyError(
                "invalid_api_key",
                "No API key. Send your event key in the 'api-key' header "
                "or as 'Authorization: Bearer <key>'.",
            )
        if not key.startswith(KEY_PREFIX) and "@" in key:
            return await self._code_access(key, client)
        if not is_well_formed(key):
            raise ProxyError(
                "invalid_api_key",
                "Malformed API key. Event keys look like 'aip-' followed by 32 letters and "
                "digits; copy it again from your registration page or organiser.",
            )
        key_hash = hash_key(key)
        # A key found before is answered from the cache (refreshed behind it when old): only
        # keys never seen here cost a lookup, and only those meet the guard.
        if not self._access.holds(key_hash):
            if key_hash in self.unknown_keys:
                raise unknown_key()
            self.guard.check_lookup(client)
        try:
            attendee = await self._access.get_or_load(
                key_hash, lambda: self.attendees.find_by_key_hash(key_hash), _STALE_ON
            )
        except StorageUnavailable as exc:
            raise storage_down() from exc
        if attendee is None:
            self.unknown_keys.add(key_hash)
            raise unknown_key()
        if not attendee.active:
            raise ProxyError(
                "key_revoked",
                "This key was revoked by the event organiser. Ask them for a new one.",
            )
        event = await self.event(attendee.event_id)
        if event is None:
            raise ProxyError("invalid_api_key", "The event of this key no longer exists.")
        return Access(attendee, event)

    async def _code_access(self, key: str, client: str) -> Access:
        """A `{event_id}@{shared_code}/{email}` key: checked against the event on every call (so
        a changed code takes effect with the event's cache), its attendee created on first use.

        The key itself is kept nowhere: the attendee is cached by event and attendee id. Its
        attendee is never the one issued to, registered or signed in as that email: it is named
        'code:<email>' (organisers' and registrants' names hold no ':').
        """
        parts = code_key_parts(key)
        if parts is None or not is_id(parts[0]) or not is_email(parts[2]):
            raise ProxyError(
                "invalid_api_key",
                "Malformed API key. Keys with the event's code look like "
                "'<event id>@<event code>/<your email>'.",
            )
        event_id, code, email = parts
        event = await self.caller_event(event_id, client)
        if event is None or not event.takes_code:
            raise ProxyError(
                "invalid_api_key",
                "This event takes no keys made of its code. Register on its page, or ask the "
                "organiser for your key.",
            )
        await self.codes.check(
            event,
            code,
            client,
            lambda: ProxyError(
                "invalid_api_key",
                f"That is not the code of event '{event.name}'. Check it with the organiser "
                "(it is case-sensitive).",
            ),
        )
        return await self._attendee_access(
            event, CODE_KEY_USER + email, admit=lambda: self.codes.admit_new(event, client)
        )

    async def _token_access(self, token: str, client: str, named: str) -> Access:
        """An Entra access token: verified (tenants some event takes only), then the attendee
        of its object id in the event it is for, created on first use."""
        tenant = token_tenant(token)
        candidates = await self._token_events(tenant, named, client)
        # No guard before verifying: it reads no storage (signing keys are fetched at most once
        # per tenant and refetch floor), and a valid token must always pass. A wrong one from
        # a client over its budget is told to slow down.
        try:
            identity = await self.entra.verify(token, tenant, (ATTENDEE_AUDIENCE,))
        except ProxyError as error:
            if error.code == "invalid_token":
                self.guard.check_lookup(client)
            raise
        event = choose_event(candidates, tenant, clock.now())
        if not identity.allowed_by(event.entra_allowed):
            raise refused(
                f"{identity.name} (object id {identity.object_id}) is not among the users, apps "
                f"and groups event '{event.name}' allows. Ask the organiser to add your object "
                "id, or a group of yours, to the event's entra_allowed."
            )
        return await self._attendee_access(event, identity.user, identity.owner)

    async def _attendee_access(
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

        async def first_use() -> Attendee:
            if admit is not None and await self.attendees.get(event.id, ident) is None:
                await admit()
            attendee, _ = await self.attendees.add(
                event.id, user, now=clock.now(), identity=identity
            )
            return attendee

        cache_key = _attendee_key(event.id, ident)
        try:
            attendee = await self._access.get_or_load(cache_key, first_use, _STALE_ON)
        except StorageUnavailable as exc:
            raise storage_down() from exc
        if attendee is None or not attendee.active:
            raise ProxyError(
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
        try:
            index = await self._tenants.get_or_load("", self._tenant_index, _STALE_ON)
        except StorageUnavailable as exc:
            raise storage_down() from exc
        events = [await self.event(event_id) for event_id in index.get(tenant, ())]
        found = [e for e in events if e is not None and tenant in e.entra_tenants]
        if not found:
            raise refused(
                f"No event takes tokens of tenant {tenant}. Ask the organiser to add the tenant "
                "to the event's entra_tenants, or use your event key."
            )
        return found

    async def _all_event_ids(self) -> frozenset[str]:
        return frozenset(event.id for event in await self.events.list())

    async def _tenant_index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for event in await self.events.list():
            for tenant in event.entra_tenants:
                index.setdefault(tenant, []).append(event.id)
        return index

    async def event(self, event_id: str) -> Event | None:
        """The event, from the cache; an id not found is answered None for a while without a
        lookup."""
        if not self._events.holds(event_id) and event_id in self.unknown_events:
            return None
        try:
            found = await self._events.get_or_load(
                event_id, lambda: self.events.get(event_id), _STALE_ON
            )
        except StorageUnavailable as exc:
            raise storage_down() from exc
        if found is None:
            self.unknown_events.add(event_id)
        return found

    async def caller_event(self, event_id: str, client: str) -> Event | None:
        """An event a caller names (public page, registration, code key, Entra header).

        A known one always answers: cached, or among the ids of every event (one list read per
        cache TTL, only while unseen ids are asked for). Unknown ids count against the client,
        who may then look up only a few ids it has never named (429 `too_many_failed_keys`):
        an id not in the list is looked up too, for events created since on other instances.
        """
        if not self._events.holds(event_id) and event_id not in self.unknown_events:
            try:
                known = await self._event_ids.get_or_load("", self._all_event_ids, _STALE_ON)
            except StorageUnavailable as exc:
                raise storage_down() from exc
            if event_id not in known:
                self.event_guard.check_lookup(client)
        found = await self.event(event_id)
        if found is None:
            self.event_guard.failed(client)
        return found

    async def pools(self, event_id: str) -> dict[str, list[Resource]]:
        """The event's catalog: deployment name -> active resources serving it."""

        async def load() -> dict[str, list[Resource]]:
            pools: dict[str, list[Resource]] = {}
            for resource in await self.catalog.event_resources(event_id):
                if resource.active:
                    pools.setdefault(resource.deployment, []).append(resource)
            return pools

        try:
            return await self._pools.get_or_load(event_id, load, _STALE_ON)
        except StorageUnavailable as exc:
            raise storage_down() from exc

    async def upstream_key(self, resource: Resource) -> str | None:
        name = resource.secret_name
        try:
            return await self._secrets.get_or_load(name, lambda: self.secrets.get(name), _STALE_ON)
        except StorageUnavailable as exc:
            raise storage_down() from exc

    def forget_key(self, key_hash: str) -> None:
        self._access.invalidate(key_hash)

    def forget_attendee(self, attendee: Attendee) -> None:
        """A revoked attendee: its key, and its keys made of the event's code or its token."""
        self._access.invalidate(attendee.key_hash)
        self._access.invalidate(_attendee_key(attendee.event_id, attendee.id))

    def forget_event(self, event_id: str) -> None:
        """A created, changed or deleted event (its tenants too)."""
        self._events.invalidate(event_id)
        self.unknown_events.discard(event_id)
        self._pools.invalidate(event_id)
        self._tenants.clear()
        self._event_ids.clear()

    def forget_resource(self, resource: Resource) -> None:
        self._pools.clear()
        self._secrets.invalidate(resource.secret_name)

    async def close(self) -> None:
        if self.pruning is not None:
            self.pruning.cancel()
        await self.balancer.close()
        await self.limits.close()
        await self.caps.close()
        await self.usage.close()
        await self.plugins.close()
        await self.upstream.close()
        await self.entra.close()
        await self.tables.close()


# The user name of a key made of the event's code: its own attendee, apart from the same email's
# issued, registered or signed-in one.
CODE_KEY_USER = "code:"


def _attendee_key(event_id: str, attendee_id: str) -> str:
    """The access cache's entry of an attendee found without a key of its own (code, token)."""
    return f"attendee:{event_id}:{attendee_id}"


def unknown_key() -> ProxyError:
    return ProxyError(
        "invalid_api_key",
        "Unknown API key. Check that you copied the whole key for this event; "
        "a rotated key stops working.",
    )


def storage_down() -> ProxyError:
    return ProxyError(
        "storage_unavailable",
        "The proxy cannot reach its storage right now and has no cached answer. "
        "Retry in a few seconds.",
        headers={"Retry-After": "5"},
    )


_runtime: Runtime | None = None
_loop: asyncio.AbstractEventLoop | None = None


def get_runtime() -> Runtime:
    """This process's runtime, created in the current event loop on first use."""
    global _runtime, _loop
    loop = asyncio.get_running_loop()
    if _runtime is None or _loop is not loop:
        from shared.platform import telemetry

        telemetry.configure(settings_module.get())
        _runtime = Runtime(settings_module.get())
        _runtime.usage.start()  # records a killed worker left on this disk are written now
        _runtime.pruning = loop.create_task(hosting.keep_pruning())
        # Modules, settings and clients live as long as the process: keep them out of the
        # collector's full passes, which otherwise stall requests for milliseconds.
        gc.freeze()
        _loop = loop
    return _runtime


async def shutdown() -> None:
    """Flush usage and close clients. Tests call it between runs; the Functions runtime offers
    no shutdown hook (a worker is killed), so nothing depends on it: see UsageWriter and Journal."""
    global _runtime
    if _runtime is not None:
        await _runtime.close()
        _runtime = None
