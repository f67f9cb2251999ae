"""Small in-memory caches for lookups on the request path: values with a time to live, and
names known not to exist."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from shared.platform.background import Background


class TTLCache[K, V]:
    """Values kept for `ttl` seconds; `invalidate` drops one at once (revoke, rotate, edit).

    With `keep_none=False` a load answering None is not kept (and drops what was): callers
    that remember misses on their own keep a flood of unknown names from pushing out what
    is known."""

    def __init__(self, ttl: float, max_entries: int = 100_000, *, keep_none: bool = True) -> None:
        self.ttl = ttl
        self._max = max_entries
        self._keep_none = keep_none
        self._entries: dict[K, tuple[float, V]] = {}
        self._refreshing: set[K] = set()
        # First loads under way, one per key (and event loop): callers asking meanwhile wait
        # for it rather than each reading storage.
        self._loading: dict[K, tuple[asyncio.AbstractEventLoop, asyncio.Task[V]]] = {}
        self._generation = 0  # bumped by every invalidation
        self._background = Background()

    def get(self, key: K) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return False, None  # an expired entry stays, as a fallback for get_or_load
        return True, entry[1]

    def holds(self, key: K) -> bool:
        """Whether a value is kept, fresh or expired: `get_or_load` answers it without waiting."""
        return key in self._entries

    def put(self, key: K, value: V) -> None:
        if len(self._entries) >= self._max:
            self._evict()
        self._entries[key] = (time.monotonic() + self.ttl, value)

    async def get_or_load(
        self,
        key: K,
        load: Callable[[], Awaitable[V]],
        stale_on: tuple[type[BaseException], ...] = (),
    ) -> V:
        """The cached value; a load only when there is none.

        An expired value is still answered while one background load replaces it, so the
        request path waits for storage only the first time a key is seen. A failed background
        load keeps the old value (and is tried again by the next request) when it fails with
        `stale_on` (storage outages); any other failure drops the entry.

        The first time, callers asking for a key while it loads wait for that one load (a
        burst on a cold instance reads each event once, not once a call); it fails for all of
        them alike, and a caller that gives up does not end it for the others.
        """
        entry = self._entries.get(key)
        if entry is None:
            return await asyncio.shield(self._first_load(key, load))
        if entry[0] < time.monotonic() and key not in self._refreshing:
            self._refreshing.add(key)
            generation = self._generation
            self._background.spawn(self._refresh(key, load, stale_on, generation))
        return entry[1]

    def _first_load(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        loop = asyncio.get_running_loop()
        under_way = self._loading.get(key)
        if under_way is not None and under_way[0] is loop:
            return under_way[1]
        task = loop.create_task(self._load_first(key, load, self._generation))
        self._loading[key] = (loop, task)
        task.add_done_callback(lambda done: self._loaded(key, done))
        return task

    async def _load_first(self, key: K, load: Callable[[], Awaitable[V]], generation: int) -> V:
        value = await load()
        # Kept unless an invalidation came while it loaded (a revoke, an edit): then the next
        # caller reads again.
        if generation == self._generation and (value is not None or self._keep_none):
            self.put(key, value)
        return value

    def _loaded(self, key: K, done: asyncio.Task[V]) -> None:
        under_way = self._loading.get(key)
        if under_way is not None and under_way[1] is done:
            del self._loading[key]
        if not done.cancelled():
            done.exception()  # retrieved: its callers may all have given up

    async def _refresh(
        self,
        key: K,
        load: Callable[[], Awaitable[V]],
        stale_on: tuple[type[BaseException], ...],
        generation: int,
    ) -> None:
        try:
            value = await load()
        except stale_on:
            return
        except Exception:
            self._entries.pop(key, None)
            return
        finally:
            self._refreshing.discard(key)
        # An invalidation while loading (a revoke, an edit) wins over what was read before it.
        if key in self._entries and generation == self._generation:
            if value is None and not self._keep_none:
                del self._entries[key]
            else:
                self.put(key, value)

    def invalidate(self, key: K) -> None:
        self._entries.pop(key, None)
        self._refreshing.discard(key)
        self._loading.pop(key, None)  # who asks from now on reads what is stored now
        self._generation += 1

    def clear(self) -> None:
        self._entries.clear()
        self._refreshing.clear()
        self._loading.clear()
        self._generation += 1

    def _evict(self) -> None:
        now = time.monotonic()
        for key in [k for k, (expires, _) in self._entries.items() if expires < now]:
            del self._entries[key]
        if len(self._entries) >= self._max:
            # Still full of live entries: drop the oldest tenth.
            for key in list(self._entries)[: self._max // 10]:
                del self._entries[key]


class Misses:
    """Names looked up and not found, remembered for `ttl` seconds so that asking again reads
    no storage; at most `max_entries` (a flood of new names forgets the oldest)."""

    def __init__(self, ttl: float, max_entries: int = 20_000) -> None:
        self.ttl = ttl
        self._max = max_entries
        self._until: dict[str, float] = {}

    def __contains__(self, name: str) -> bool:
        until = self._until.get(name)
        if until is None:
            return False
        if until < time.monotonic():
            del self._until[name]
            return False
        return True

    def add(self, name: str) -> None:
        now = time.monotonic()
        if len(self._until) >= self._max:
            for stale in [n for n, until in self._until.items() if until < now]:
                del self._until[stale]
            if len(self._until) >= self._max:
                for oldest in list(self._until)[: self._max // 10]:
                    del self._until[oldest]
        self._until.pop(name, None)  # to the end: the newest is forgotten last
        self._until[name] = now + self.ttl

    def discard(self, name: str) -> None:
        """A name that exists now (an event just created here)."""
        self._until.pop(name, None)
