"""The request-path cache: loads once, refreshes in the background, invalidation always wins."""

from __future__ import annotations

import asyncio

import pytest

from shared.platform.cache import TTLCache


class Outage(Exception):
    pass


class Held[V]:
    """A load that answers `value` (or raises it, an exception) once released: a storage read
    still under way while other callers ask. `calls` counts the loads."""

    def __init__(self, value: V | Exception) -> None:
        self.value, self.calls, self.release = value, 0, asyncio.Event()

    async def __call__(self) -> V:
        self.calls += 1
        await self.release.wait()
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


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


async def test_callers_asking_while_a_first_load_runs_share_it() -> None:
    cache: TTLCache[str, int] = TTLCache(ttl=60)
    load = Held(7)
    waiting = [asyncio.create_task(cache.get_or_load("event", load)) for _ in range(10)]
    await asyncio.sleep(0)
    load.release.set()
    assert await asyncio.gather(*waiting) == [7] * 10
    assert load.calls == 1
    assert await cache.get_or_load("event", load) == 7 and load.calls == 1  # kept


async def test_a_shared_first_load_fails_for_all_and_the_next_caller_reads_again() -> None:
    cache: TTLCache[str, int] = TTLCache(ttl=60)
    outage: Held[int] = Held(Outage())
    waiting = [asyncio.create_task(cache.get_or_load("event", outage)) for _ in range(3)]
    await asyncio.sleep(0)
    outage.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [type(r) for r in results] == [Outage] * 3 and outage.calls == 1
    back = Held(8)
    back.release.set()
    assert await cache.get_or_load("event", back) == 8


async def test_a_caller_that_gives_up_does_not_end_the_load_for_the_others() -> None:
    cache: TTLCache[str, int] = TTLCache(ttl=60)
    load = Held(9)
    first = asyncio.create_task(cache.get_or_load("event", load))
    second = asyncio.create_task(cache.get_or_load("event", load))
    await asyncio.sleep(0)
    first.cancel()  # its caller hung up
    load.release.set()
    assert await second == 9
    with pytest.raises(asyncio.CancelledError):
        await first
    assert cache.get("event") == (True, 9)


async def test_a_caller_after_an_invalidation_does_not_join_the_load_before_it() -> None:
    cache: TTLCache[str, str] = TTLCache(ttl=60)
    before_revoke, after_revoke = Held("active"), Held("revoked")
    after_revoke.release.set()
    early = asyncio.create_task(cache.get_or_load("key", before_revoke))
    await asyncio.sleep(0)
    cache.invalidate("key")  # revoked while the first read was under way
    assert await cache.get_or_load("key", after_revoke) == "revoked"
    before_revoke.release.set()
    assert await early == "active"  # it asked before the revoke
    assert await cache.get_or_load("key", before_revoke) == "revoked"  # not written over
