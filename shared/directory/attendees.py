"""Attendees of an event and their keys, found by a hash of the key."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from shared.directory.keys import hash_key, new_key
from shared.directory.models import AttendeeView
from shared.directory.records import from_entity, record, to_entity
from shared.platform.tables import Conflict, Tables
from shared.platform.vault import Sealer

ATTENDEES_TABLE = "attendees"
KEYS_TABLE = "keys"
# The user name of a key made of the event's code: its own attendee, apart from the same email's
# issued, registered or signed-in one (organisers' and registrants' names hold no ':').
CODE_KEY_USER = "code:"


@record(
    AttendeeView,
    defaults={"active": True, "created_at": "", "revoked_at": "", "self_registered": False},
    partition_key="event_id",
)
class Attendee:
    """One person's access to one event: AttendeeView's fields (shared/directory/models.py),
    and its key's hash and the key sealed."""

    key_hash: str
    key_sealed: str

    def to_json(self, sealer: Sealer | None = None) -> dict[str, Any]:
        """What its organiser sees; with `sealer`, its key too."""
        data = {name: getattr(self, name) for name in AttendeeView.model_fields}
        if sealer is not None:
            data["api_key"] = sealer.unseal(self.key_sealed)
        return data


def attendee_id(event_id: str, user: str) -> str:
    """Stable per (event, user), so adding the same user twice finds the same attendee."""
    return hashlib.sha256(f"{event_id}\n{user.strip().lower()}".encode()).hexdigest()[:16]


class AttendeeStore:
    """Attendees in Table Storage, plus a key-hash index for the proxy's lookups."""

    def __init__(self, tables: Tables, sealer: Sealer) -> None:
        self._tables = tables
        self._sealer = sealer

    async def add(
        self,
        event_id: str,
        user: str,
        *,
        now: datetime,
        identity: str = "",
        self_registered: bool = False,
    ) -> tuple[Attendee, bool]:
        """The attendee for this user, created with a fresh key if new; True when created.

        `identity`, when given, is what makes the attendee (an Entra object id, where names
        change); otherwise the user name does. `self_registered`: made by a registration with
        the event's code, whose key whoever registered has seen.
        """
        ident = attendee_id(event_id, identity or user)
        existing = await self.get(event_id, ident)
        if existing is not None:
            return existing, False
        key = new_key()
        attendee = Attendee(
            id=ident,
            event_id=event_id,
            user=user.strip(),
            key_hash=hash_key(key),
            key_sealed=self._sealer.seal(key),
            created_at=now.isoformat(),
            self_registered=self_registered,
        )
        # The index row goes first: an attendee row never points at a key nobody can find.
        await self._index(attendee)
        try:
            await self._tables.insert(ATTENDEES_TABLE, to_entity(attendee))
        except Conflict:
            await self._tables.delete(KEYS_TABLE, attendee.key_hash, "")
            raced = await self.get(event_id, attendee.id)
            assert raced is not None
            return raced, False
        return attendee, True

    async def _index(self, attendee: Attendee) -> None:
        entity = {
            "PartitionKey": attendee.key_hash,
            "RowKey": "",
            "event_id": attendee.event_id,
            "attendee_id": attendee.id,
        }
        await self._tables.upsert(KEYS_TABLE, entity, replace=True)

    async def get(self, event_id: str, attendee_id: str) -> Attendee | None:
        entity = await self._tables.get(ATTENDEES_TABLE, event_id, attendee_id)
        return None if entity is None else from_entity(Attendee, entity)

    async def list(self, event_id: str) -> list[Attendee]:
        entities = await self._tables.partition(ATTENDEES_TABLE, event_id)
        return [from_entity(Attendee, e) for e in entities]

    async def find_by_key_hash(self, key_hash: str) -> Attendee | None:
        """The attendee holding this key now; None for unknown or rotated-away keys."""
        index = await self._tables.get(KEYS_TABLE, key_hash, "")
        if index is None:
            return None
        attendee = await self.get(index["event_id"], index["attendee_id"])
        if attendee is None or attendee.key_hash != key_hash:
            return None
        return attendee

    async def revoke(self, attendee: Attendee, *, now: datetime) -> None:
        attendee.active = False
        attendee.revoked_at = now.isoformat()
        await self._tables.upsert(ATTENDEES_TABLE, to_entity(attendee), replace=True)

    async def rotate(self, attendee: Attendee) -> str:
        """Give the attendee a new key, which only its organiser sees; the old one stops
        working."""
        old_hash = attendee.key_hash
        key = new_key()
        attendee.key_hash = hash_key(key)
        attendee.key_sealed = self._sealer.seal(key)
        attendee.self_registered = False
        await self._index(attendee)
        await self._tables.upsert(ATTENDEES_TABLE, to_entity(attendee), replace=True)
        await self._tables.delete(KEYS_TABLE, old_hash, "")
        return key

    async def delete_event(self, event_id: str) -> None:
        for attendee in await self.list(event_id):
            await self._tables.delete(KEYS_TABLE, attendee.key_hash, "")
            await self._tables.delete(ATTENDEES_TABLE, event_id, attendee.id)
