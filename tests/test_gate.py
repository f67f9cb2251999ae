"""The attendees' gate on its own: built from the stores, guards and directory it is handed
(no runtime, no storage), it answers known keys from its cache, remembers unknown ones, counts
wrong ones against the client and keeps answering what it knew while storage is down."""

from __future__ import annotations

from datetime import datetime

import pytest

from shared.access import Access, FailedKeyGuard, Gate
from shared.directory import Attendee, CachedDirectory, Event
from shared.directory.keys import hash_key, new_key
from shared.errors import (
    Revoked,
    StorageUnavailable,
    TooManyRequests,
    Unavailable,
    WrongCredential,
)

EVENT = Event(
    id="ev1",
    name="Gate test",
    starts_at=datetime(2000, 1, 1),
    ends_at=datetime(2999, 1, 1),
    time_zone="UTC",
    max_token_cap=100,
    daily_request_cap=10,
)


class Store:
    """Attendees and events in a dict, counting reads; `down` makes every read fail."""

    def __init__(self) -> None:
        self.attendees: dict[str, Attendee] = {}
        self.reads = 0
        self.down = False

    def _read(self) -> None:
        self.reads += 1
        if self.down:
            raise StorageUnavailable("injected")

    async def find_by_key_hash(self, key_hash: str) -> Attendee | None:
        self._read()
        return self.attendees.get(key_hash)

    async def get(self, event_id: str) -> Event | None:
        self._read()
        return EVENT if event_id == EVENT.id else None

    async def list(self) -> list[Event]:
        self._read()
        return [EVENT]


def gate(store: Store, guard: FailedKeyGuard) -> Gate:
    directory = CachedDirectory(store, None, None, ttl=60.0)  # type: ignore[arg-type]
    return Gate(
        store,  # type: ignore[arg-type]
        directory,
        codes=None,  # type: ignore[arg-type]  # no key made of a code is sent here
        entra=None,  # type: ignore[arg-type]  # nor any token
        key_guard=guard,
        event_guard=FailedKeyGuard(wrong="event ids"),
        ttl=60.0,
    )


def attendee(store: Store, active: bool = True) -> str:
    key = new_key()
    store.attendees[hash_key(key)] = Attendee(
        id=f"a{len(store.attendees)}",
        event_id=EVENT.id,
        user="ada@example.com",
        key_hash=hash_key(key),
        key_sealed="",
        active=active,
    )
    return key


async def test_a_known_key_is_answered_from_the_cache_even_while_its_address_is_locked_out():
    store, guard = Store(), FailedKeyGuard(threshold=3, lookups_per_second=0.001)
    door = gate(store, guard)
    key = attendee(store)
    assert await door.access(key, "10.0.0.1") == Access(store.attendees[hash_key(key)], EVENT)
    reads = store.reads

    # Three wrong keys, then one lookup per 1000 s: the fourth is looked up, the fifth is not.
    for _ in range(4):
        with pytest.raises(WrongCredential, match="Unknown API key"):
            await door.access(new_key(), "10.0.0.1")
    with pytest.raises(TooManyRequests, match="Too many wrong keys"):
        await door.access(new_key(), "10.0.0.1")
    assert (await door.access(key, "10.0.0.1")).event is EVENT
    assert store.reads == reads + 4
    # Another address is not slowed down.
    with pytest.raises(WrongCredential):
        await door.access(new_key(), "10.0.0.2")


async def test_an_unknown_key_sent_again_is_refused_without_a_lookup():
    store = Store()
    door = gate(store, FailedKeyGuard())
    unknown = new_key()
    with pytest.raises(WrongCredential):
        await door.access(unknown, "c")
    reads = store.reads
    with pytest.raises(WrongCredential, match="Unknown API key"):
        await door.access(unknown, "c")
    assert store.reads == reads


async def test_a_revoked_key_is_refused_once_the_gate_forgets_it():
    store = Store()
    door = gate(store, FailedKeyGuard())
    key = attendee(store)
    await door.access(key, "c")
    found = store.attendees[hash_key(key)]
    found.active = False
    door.forget_attendee(found)
    with pytest.raises(Revoked, match="revoked"):
        await door.access(key, "c")


async def test_storage_down_answers_what_was_cached_and_503_for_the_rest():
    store = Store()
    door = gate(store, FailedKeyGuard())
    key = attendee(store)
    await door.access(key, "c")
    store.down = True
    assert (await door.access(key, "c")).event is EVENT
    with pytest.raises(Unavailable) as refused:
        await door.access(new_key(), "c")
    assert refused.value.code == "storage_unavailable"
    assert refused.value.headers == {"Retry-After": "5"}
