"""An event's shared code, checked so that it opens nobody else's account and cannot be guessed.

Wrong codes are limited twice: per event and client address on this instance
(`guard.FailedCodes`), and per event over all instances, in storage: at most
`wrong_codes_per_event_minute` wrong codes are answered in any 60 seconds; past that, wrong
codes get 429 `too_many_failed_keys`. The code is compared first and only wrong ones are
counted or refused, so a correct code always passes whatever others send.

Anybody with the code can create an attendee (a fresh daily quota) for any email, so new
attendees by code are limited per event and client address, in storage too: at most
`new_attendees_per_address_hour` in any hour.

Both count in fixed windows (a row per event, name and window) and refuse on the sum of the
current and the previous window, which bounds any sliding window of that length. A row is
changed with a conditional update, so instances never lose each other's counts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from shared.access.guard import FAILED_CODE_WINDOW_SECONDS, MAX_FAILED_CODES, FailedCodes
from shared.directory.events import Event
from shared.directory.keys import same_secret
from shared.errors import ProxyError
from shared.platform import clock
from shared.platform.settings import Settings
from shared.platform.tables import StorageUnavailable, Tables

log = logging.getLogger(__name__)

ATTEMPTS_TABLE = "attempts"
MINUTE = 60
HOUR = 3600
_TRIES = 8  # conditional updates raced by other instances before a count gives up


class Windows:
    """Counts per (scope, name) in fixed windows, shared by every instance through storage."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def take(self, scope: str, name: str, limit: int, seconds: int) -> int:
        """Count one if the last two windows hold fewer than `limit`; 0 when counted, else the
        seconds until the older window no longer counts."""
        now = clock.now().timestamp()
        window = int(now // seconds)
        wait = max(1, int((window + 1) * seconds - now + 0.999))
        before = await self._tables.get(ATTEMPTS_TABLE, scope, f"{name}-{window - 1}")
        earlier = int(before["count"]) if before else 0
        row = f"{name}-{window}"
        for _ in range(_TRIES):
            found = await self._tables.get_versioned(ATTEMPTS_TABLE, scope, row)
            count = int(found[0]["count"]) if found else 0
            if earlier + count >= limit:
                return wait
            entity = {"PartitionKey": scope, "RowKey": row, "count": count + 1}
            if await self._tables.put_versioned(ATTEMPTS_TABLE, entity, found):
                return 0
            # Another instance counted first: read again.
        return wait  # so contended that the limit is surely near: refuse rather than spin

    async def forget(self, scope: str) -> None:
        """Drop a scope's counts (a deleted event)."""
        for entity in await self._tables.partition(ATTEMPTS_TABLE, scope):
            await self._tables.delete(ATTEMPTS_TABLE, scope, entity["RowKey"])


def _address(client: str) -> str:
    """A client address as a row key: addresses come from a header, keys forbid '/', '#', '?'."""
    return hashlib.sha256(client.encode()).hexdigest()[:16]


class CodeGuard:
    """Shared-code checks and the limits around them, for registration and code keys."""

    def __init__(self, tables: Tables, settings: Settings) -> None:
        self._windows = Windows(tables)
        self._failed = FailedCodes(MAX_FAILED_CODES, FAILED_CODE_WINDOW_SECONDS)
        self.wrong_per_minute = settings.wrong_codes_per_event_minute
        self.new_per_hour = settings.new_attendees_per_address_hour

    async def check(
        self, event: Event, code: str, client: str, wrong: Callable[[], ProxyError]
    ) -> None:
        """Pass the event's code; refuse any other with `wrong()`, or 429 once too many wrong
        ones came from this address or, over all instances, to this event."""
        if same_secret(code, event.shared_code):
            return  # a right code always passes, whatever others sent
        self._failed.check(event.id, client)
        self._failed.record(event.id, client)
        try:
            wait = await self._windows.take(event.id, "wrong", self.wrong_per_minute, MINUTE)
        except StorageUnavailable:
            # Refused anyway; the per-address limit still holds while storage is away.
            log.warning("wrong shared codes of event %s not counted: storage unavailable", event.id)
            wait = 0
        if wait:
            raise ProxyError(
                "too_many_failed_keys",
                f"Too many wrong codes were sent for event '{event.name}' in the last minute. "
                f"Wait {wait} seconds, then try again with the code from the organiser.",
                retry_after=wait,
            )
        raise wrong()

    async def admit_new(self, event: Event, client: str) -> None:
        """Before creating an attendee by code: refused past the address's hourly budget."""
        wait = await self._windows.take(
            event.id, f"new-{_address(client)}", self.new_per_hour, HOUR
        )
        if wait:
            raise ProxyError(
                "rate_limit_exceeded",
                f"Too many new attendees were created for event '{event.name}' from your "
                f"address in the last hour. Retry in {wait} seconds, or ask the organiser to "
                "add you.",
                retry_after=wait,
                reason="new_attendees",
            )

    async def forget(self, event_id: str) -> None:
        await self._windows.forget(event_id)
