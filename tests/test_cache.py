"""The request-path cache: loads once, refreshes in the background, invalidation always wins."""

from __future__ import annotations

import asyncio

import pytest

from shared.platform.cache import TTLCache


class Outage(Exception):
    pass


async def test_expired_value_is_served_while_one_background_load_replaces_it() -> None:
    cache: TTLCache[str, int] = TTLCache(ttl=0.05)
    loads = []

    async def load() -> int:
        loads.append(1)
        await asyncio.sleep(0.05)
        return len(loads)

    assert await cache.get_or_load("k", load) == 1
    await asyncio.sleep(0.06)
    answers = await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(10)))
    assert answers == [1] * 10  # nobody waited for storage
    await asyncio.sleep(0.1)
    assert len(loads) == 2  # one refresh for ten callers
    assert await cache.get_or_load("k", load) == 2


async def test_invalidation_during_a_refresh_wins_over_what_it_read() -> None:
    cache: TTLCache[str, str] = TTLCache(ttl=0.01)
    gate = asyncio.Event()

    async def slow_old() -> str:
        await gate.wait()
        return "active"

    cache.put("key", "active")
    await asyncio.sleep(0.02)
    assert await cache.get_or_load("key", slow_old) == "active"  # starts a refresh
    cache.invalidate("key")  # revoked while the refresh reads the old row

    async def fresh() -> str:
        return "revoked"

    assert await cache.get_or_load("key", fresh) == "revoked"
    gate.set()
    await asyncio.sleep(0.01)
    assert await cache.get_or_load("key", fresh) == "revoked"  # the late refresh was dropped


async def test_outage_keeps_the_old_value_and_other_errors_drop_it() -> None:
    cache: TTLCache[str, str] = TTLCache(ttl=0.01)
    cache.put("a", "old")
    cache.put("b", "old")
    await asyncio.sleep(0.02)

    async def outage() -> str:
        raise Outage

    async def broken() -> str:
        raise ValueError

    assert await cache.get_or_load("a", outage, (Outage,)) == "old"
    assert await cache.get_or_load("b", broken, (Outage,)) == "old"
    await asyncio.sleep(0.01)
    assert await cache.get_or_load("a", outage, (Outage,)) == "old"
    with pytest.raises(ValueError):
        await cache.get_or_load("b", broken, (Outage,))


async def test_first_load_failure_reaches_the_caller() -> None:
    cache: TTLCache[str, str] = TTLCache(ttl=1)

    async def outage() -> str:
        raise Outage

    with pytest.raises(Outage):
        await cache.get_or_load("missing", outage, (Outage,))
