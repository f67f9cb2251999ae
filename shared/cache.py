"""A small in-memory cache with a time to live, for lookups on the request path."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """Values kept for `ttl` seconds; `invalidate` drops one at once (revoke, rotate, edit)."""

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self._max = max_entries
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return False, None  # an expired entry stays, as a fallback for get_or_load
        return True, entry[1]

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
        """The cached value, else a fresh load; if loading fails with `stale_on`, the expired
        value when there is one (keeps requests flowing while storage is down)."""
        found, value = self.get(key)
        if found:
            return value  # type: ignore[return-value]
        try:
            value = await load()
        except stale_on:
            entry = self._entries.get(key)
            if entry is None:
                raise
            return entry[1]
        self.put(key, value)
        return value

    def invalidate(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def _evict(self) -> None:
        now = time.monotonic()
        for key in [k for k, (expires, _) in self._entries.items() if expires < now]:
            del self._entries[key]
        if len(self._entries) >= self._max:
            # Still full of live entries: drop the oldest tenth.
            for key in list(self._entries)[: self._max // 10]:
                del self._entries[key]
