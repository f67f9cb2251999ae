"""The directory as the request path reads it: events, each event's pools and the upstream keys
of resources, cached for the cache TTL and answered from what was cached while storage is down.

Management calls change the directory through the stores and then tell this cache
(`forget_event`, `forget_resource`), so their own instance sees a change at once; others see it
within the TTL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from shared.directory.catalog import CatalogStore, Resource
from shared.directory.events import Event, EventStore
from shared.errors import storage_down
from shared.platform.cache import Misses, TTLCache
from shared.platform.tables import StorageUnavailable
from shared.platform.vault import SecretStore

# Storage outages fall back to what was cached before, however old.
_STALE_ON = (StorageUnavailable,)
# How long an event id that was not found is answered as unknown without a lookup: an id can
# be asked for just before it is created elsewhere (here `forget_event` clears it at once).
UNKNOWN_EVENT_SECONDS = 30.0


async def cached[K, V](cache: TTLCache[K, V], key: K, load: Callable[[], Awaitable[V]]) -> V:
    """`cache.get_or_load`, stale while storage is down; 503 `storage_unavailable` when storage
    is down and nothing was cached."""
    try:
        return await cache.get_or_load(key, load, _STALE_ON)
    except StorageUnavailable as exc:
        raise storage_down() from exc


class CachedDirectory:
    """Cached reads of events, catalogs and upstream keys, shared by every request of a process."""

    def __init__(
        self, events: EventStore, catalog: CatalogStore, secrets: SecretStore, ttl: float
    ) -> None:
        self._events_store = events
        self._catalog = catalog
        self._secrets_store = secrets
        self._unknown_events = Misses(UNKNOWN_EVENT_SECONDS)
        self._events: TTLCache[str, Event | None] = TTLCache(ttl, keep_none=False)
        self._pools: TTLCache[str, dict[str, list[Resource]]] = TTLCache(ttl)
        self._tenants: TTLCache[str, dict[str, list[str]]] = TTLCache(ttl)  # tenant -> events
        self._event_ids: TTLCache[str, frozenset[str]] = TTLCache(ttl)  # every event, by id
        self._secrets: TTLCache[str, str | None] = TTLCache(max(ttl, 300.0))

    def holds_event(self, event_id: str) -> bool:
        """Whether the event is cached (found before, fresh or not)."""
        return self._events.holds(event_id)

    def missed_event(self, event_id: str) -> bool:
        """Whether the id was looked up and not found a moment ago."""
        return event_id in self._unknown_events

    async def event(self, event_id: str) -> Event | None:
        """The event; an id not found is answered None for a while without a lookup."""
        if not self.holds_event(event_id) and self.missed_event(event_id):
            return None
        found = await cached(self._events, event_id, lambda: self._events_store.get(event_id))
        if found is None:
            self._unknown_events.add(event_id)
        return found

    async def event_ids(self) -> frozenset[str]:
        """The id of every event: one list read per TTL."""

        async def load() -> frozenset[str]:
            return frozenset(event.id for event in await self._events_store.list())

        return await cached(self._event_ids, "", load)

    async def tenant_events(self, tenant: str) -> list[Event]:
        """The events taking access tokens of an Entra tenant."""
        index = await cached(self._tenants, "", self._tenant_index)
        events = [await self.event(event_id) for event_id in index.get(tenant, ())]
        return [e for e in events if e is not None and tenant in e.entra_tenants]

    async def _tenant_index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for event in await self._events_store.list():
            for tenant in event.entra_tenants:
                index.setdefault(tenant, []).append(event.id)
        return index

    async def pools(self, event_id: str) -> dict[str, list[Resource]]:
        """The event's catalog: deployment name -> active resources serving it."""

        async def load() -> dict[str, list[Resource]]:
            pools: dict[str, list[Resource]] = {}
            for resource in await self._catalog.event_resources(event_id):
                if resource.active:
                    pools.setdefault(resource.deployment, []).append(resource)
            return pools

        return await cached(self._pools, event_id, load)

    async def upstream_key(self, resource: Resource) -> str | None:
        """The resource's stored API key; None when none is stored."""
        name = resource.secret_name
        return await cached(self._secrets, name, lambda: self._secrets_store.get(name))

    def forget_event(self, event_id: str) -> None:
        """A created, changed or deleted event (its tenants too)."""
        self._events.invalidate(event_id)
        self._unknown_events.discard(event_id)
        self._pools.invalidate(event_id)
        self._tenants.clear()
        self._event_ids.clear()

    def forget_resource(self, resource: Resource) -> None:
        self._pools.clear()
        self._secrets.invalidate(resource.secret_name)
