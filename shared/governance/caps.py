"""Daily caps per attendee, and for the whole event, that hold across instances.

One counter row per attendee and day (the event's local day) holds `granted` (requests handed
out to instances), `used` (requests admitted) and `tokens` (tokens counted).

Requests: an instance reserves a block of requests from the row with a conditional update
(ETag) and admits locally while it holds some. `granted` never passes the cap, so the request
cap is never overshot while storage answers. A block is 1000 requests, or what this instance
admitted for the attendee in the last `BLOCK_SECONDS` when that is more; blocks shrink as the
cap nears (remaining / 8, at least 1), so the last requests of a day are reserved one by one.
An instance hands back what it did not use after `idle_seconds` without requests. The next
block is reserved in the background when half of the last one is left: calls wait for storage
only when it takes longer than about one second of their traffic to answer.

Tokens are only known after a call: each instance adds what it counted to the row every
`sync_seconds` and reads the row back. A call is refused once the tokens known here reach the
cap, so tokens can overshoot by what was in flight when the cap was crossed plus what other
instances admitted before they saw it (at most one sync interval).

The event-wide caps (`event_daily_request_cap`, `event_daily_token_cap`: all attendees
together) are one more counter row per event and day, `EVENT_ROW`, taken from by the same
admission and with the same bounds: requests never overshoot, tokens by what was in flight
plus what other instances admitted within one sync interval. A call must find room in both.

When storage cannot be reached, an instance keeps admitting on its last view of the row and
records its grants as provisional; they are written once storage answers.

The same writes carry the attendee's calls of the last minute per 5-second slot (`minute`,
for the per-minute limits in shared/governance/ratelimits.py) and how many calls were refused, by reason
(`refused_<reason>`): no write of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.directory.events import Event
from shared.errors import ProxyError, TooManyRequests
from shared.governance.held import HeldRows
from shared.governance.minutes import SharedSlots
from shared.platform import clock
from shared.platform.background import Background
from shared.platform.tables import StorageUnavailable, Tables

log = logging.getLogger(__name__)

COUNTERS_TABLE = "counters"
BLOCK = 1000  # far from the cap, a reservation every 1000 requests at least; near it, one by one
BLOCK_SECONDS = 2.0  # a busier attendee's block covers this long at their recent rate
# Reserve the next block in the background when this share of the last one is left, so calls
# do not wait for storage while the cap is far.
REFILL_AT = 0.5
EVENT_ROW = "_event"  # the whole event's row in each day's partition (attendee ids are hex)


def block_size(remaining: int, recent: int = 0) -> int:
    """The next block: `recent` is what the instance admitted in the last BLOCK_SECONDS."""
    return max(1, min(max(BLOCK, recent), remaining // 8))


@dataclass
class Counter:
    """This instance's view of one attendee's day."""

    partition: str
    attendee_id: str
    allowance: int = 0  # requests reserved here and not used yet
    provisional: int = 0  # requests admitted while storage was down, not yet granted
    granted_seen: int = 0
    used_seen: int = 0
    tokens_seen: int = 0
    used_unflushed: int = 0
    tokens_unflushed: int = 0
    tokens_in_flight: int = 0  # worst-case tokens of calls admitted here and not answered yet
    # In use from its creation: its first call waits here for a block before it is admitted.
    last_used: float = field(default_factory=time.monotonic)
    block: int = 0  # size of the last block reserved
    admitted: int = 0  # calls admitted here, ever
    block_mark: tuple[float, int] = (0.0, 0)  # (when, admitted) as the last block arrived
    refilling: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    minute: SharedSlots = field(default_factory=SharedSlots)  # the last minute, all instances
    refused: dict[str, int] = field(default_factory=dict)  # refusals by reason, not written yet
    # The event's counter of the same day, once the event had event-wide caps: every call of
    # this attendee is counted there too (kept when the caps go, so counts stay whole).
    whole: Counter | None = None

    @property
    def dirty(self) -> bool:
        return bool(
            self.used_unflushed
            or self.tokens_unflushed
            or self.provisional
            or self.refused
            or self.minute.pending
        )

    @property
    def used(self) -> int:
        return self.used_seen + self.used_unflushed

    @property
    def tokens(self) -> int:
        return self.tokens_seen + self.tokens_unflushed


class Caps(HeldRows[Counter]):
    """Admits or refuses calls against the daily caps, and counts what they used."""

    NAME = "caps: counters"

    def __init__(
        self, tables: Tables, sync_seconds: float = 1.0, idle_seconds: float = 5.0
    ) -> None:
        super().__init__(sync_seconds, idle_seconds)
        self._tables = tables
        self._caps: dict[tuple[str, str], int] = {}  # counter -> request cap, for hand-backs
        self._background = Background()

    def _counter(self, event: Event, row: str, now: datetime, cap: int) -> Counter:
        partition = f"{event.id}_{event.local_date(now)}"
        key = (partition, row)
        counter = self._rows.get(key)
        if counter is None:
            counter = self._rows[key] = Counter(partition, row)
        self._caps[key] = cap
        return counter

    def _attendee(self, event: Event, attendee_id: str, now: datetime) -> Counter:
        return self._counter(event, attendee_id, now, event.daily_request_cap)

    def give_back(self, counter: Counter) -> None:
        """A request `admit` took and that was refused after all (a per-minute limit): the
        request goes back to the allowance; its tokens are released by `settle`."""
        for taken in (counter, counter.whole):
            if taken is None:
                continue
            if self._caps.get((taken.partition, taken.attendee_id)):
                taken.allowance += 1
            taken.used_unflushed -= 1
            taken.admitted -= 1

    def count_refusal(self, event: Event, attendee_id: str, now: datetime, reason: str) -> None:
        """A refused call, written with the counter at the next sync (for the reports)."""
        counter = self._attendee(event, attendee_id, now)
        counter.refused[reason] = counter.refused.get(reason, 0) + 1
        self._start()

    async def admit(
        self, event: Event, attendee_id: str, now: datetime, worst_case_tokens: int = 0
    ) -> Counter:
        """Take one request from today's cap, or refuse with the cap's error.

        `worst_case_tokens` stays reserved here until `settle`: calls in flight on this
        instance cannot together pass the token cap.
        """
        self._start()
        counter = self._attendee(event, attendee_id, now)
        event_cap = event.event_daily_request_cap
        whole = None
        if event_cap or event.event_daily_token_cap or counter.whole is not None:
            whole = counter.whole = self._counter(event, EVENT_ROW, now, event_cap)
        self._check_all(counter, whole, event, now)  # fail fast, before waiting for storage
        # Room in both counters; a wait for one can let concurrent calls take the other's.
        while True:
            if counter.allowance == 0:
                await self._reserve(counter, event.daily_request_cap)
                if counter.allowance == 0:
                    raise cap_error(event, now, tokens=False)
            if whole is not None and event_cap and whole.allowance == 0:
                await self._reserve(whole, event_cap)
                if whole.allowance == 0:
                    raise cap_error(event, now, tokens=False, whole=True)
            if counter.allowance and (whole is None or not event_cap or whole.allowance):
                break
        # No await from the check to the reservation: concurrent calls see each other.
        self._check_all(counter, whole, event, now)
        self._take(counter, event.daily_request_cap, worst_case_tokens)
        if whole is not None:
            self._take(whole, event_cap, worst_case_tokens)
        return counter

    def _check_all(
        self, counter: Counter, whole: Counter | None, event: Event, now: datetime
    ) -> None:
        self._check_tokens(counter, event, now, whole=False)
        if whole is not None:
            self._check_tokens(whole, event, now, whole=True)

    def _take(self, counter: Counter, cap: int, worst_case_tokens: int) -> None:
        """One request out of the counter's allowance (when it has a request cap)."""
        if cap:
            counter.allowance -= 1
        counter.used_unflushed += 1
        counter.tokens_in_flight += worst_case_tokens
        counter.admitted += 1
        counter.last_used = time.monotonic()
        if (
            cap
            and counter.allowance < counter.block * REFILL_AT
            and not counter.refilling
            and counter.granted_seen < cap
        ):
            counter.refilling = True
            self._background.spawn(self._reserve_ahead(counter, cap))

    @staticmethod
    def _recent(counter: Counter) -> int:
        """Calls admitted here in the last BLOCK_SECONDS, at the rate since the last block."""
        since, admitted = counter.block_mark
        elapsed = time.monotonic() - since
        if not since or elapsed <= 0:
            return 0
        return int((counter.admitted - admitted) * BLOCK_SECONDS / elapsed)

    @staticmethod
    def _check_tokens(counter: Counter, event: Event, now: datetime, *, whole: bool) -> None:
        """Refuse once the day's tokens plus what calls in flight may still use reach the cap
        (the attendee's, or with `whole` the event's): spent when they are used up or nothing
        runs, else while calls may still use them."""
        cap = getattr(event, _cap_field(tokens=True, whole=whole))
        if not cap or counter.tokens + counter.tokens_in_flight < cap:
            return
        if counter.tokens >= cap or not counter.tokens_in_flight:
            raise cap_error(event, now, tokens=True, whole=whole)
        raise _still_running(event, whole=whole)

    def settle(self, counter: Counter, worst_case_tokens: int, tokens: int) -> None:
        """A call finished: swap its reservation for what it really used."""
        for taken in (counter, counter.whole):
            if taken is not None:
                # At least 0: the event's counter may be linked after this call was admitted.
                taken.tokens_in_flight = max(0, taken.tokens_in_flight - worst_case_tokens)
                taken.tokens_unflushed += tokens

    def charge_unsettled(
        self, partition: str, attendee_id: str, tokens: int, *, whole: bool
    ) -> None:
        """Tokens of a call admitted elsewhere that never settled (its worker is gone), added
        to the attendee's day (and the event's, `whole`) at the next sync."""
        rows = (attendee_id, EVENT_ROW) if whole else (attendee_id,)
        for row in rows:
            counter = self._rows.get((partition, row))
            if counter is None:
                counter = self._rows[(partition, row)] = Counter(partition, row)
            counter.tokens_unflushed += tokens
        self._start()

    def charge(self, event: Event, attendee_id: str, now: datetime, tokens: int) -> None:
        """Tokens used outside a call's admission (a realtime session's responses, metered
        through its sideband), counted like a settled call's."""
        self._start()
        counter = self._attendee(event, attendee_id, now)
        if event.event_daily_request_cap or event.event_daily_token_cap or counter.whole:
            counter.whole = self._counter(event, EVENT_ROW, now, event.event_daily_request_cap)
        self.settle(counter, 0, tokens)

    def check_tokens(self, event: Event, attendee_id: str, now: datetime) -> None:
        """Raise the token cap's error when today's tokens (the attendee's, or the event's) are
        used up: a running realtime session is ended then."""
        counter = self._attendee(event, attendee_id, now)
        self._check_all(counter, counter.whole, event, now)

    async def _reserve_ahead(self, counter: Counter, cap: int) -> None:
        """The next block, before this one runs out (calls only wait when storage is slow)."""
        try:
            async with counter.lock:
                await self._write(counter, cap, reserve=True)
        except StorageUnavailable as exc:
            # Calls reserve for themselves once the allowance is gone.
            log.warning("caps: no block reserved ahead: %s", str(exc)[:200])
        finally:
            counter.refilling = False

    async def _reserve(self, counter: Counter, cap: int) -> None:
        async with counter.lock:
            if counter.allowance > 0:
                return
            try:
                await self._write(counter, cap, reserve=True)
            except StorageUnavailable as exc:
                # Keep serving on the last view of the row; the grant is written later.
                if counter.granted_seen + counter.provisional < cap:
                    counter.provisional += 1
                    counter.allowance += 1
                log.warning(
                    "caps: storage unavailable, admitting on the last view: %s", str(exc)[:200]
                )

    async def _write(
        self, counter: Counter, cap: int, *, reserve: bool, give_back: int = 0
    ) -> None:
        """Merge this instance's deltas into the row (and reserve a block); read it back.

        `give_back` requests were already taken out of the allowance by the caller.
        """
        for _ in range(20):
            used, tokens = counter.used_unflushed, counter.tokens_unflushed
            provisional = counter.provisional
            refused = dict(counter.refused)
            found = await self._tables.get_versioned(
                COUNTERS_TABLE, counter.partition, counter.attendee_id
            )
            row: dict[str, Any] = found[0] if found else {}
            now = clock.time()
            minute, minute_taken = counter.minute.merge(row.get("minute"), now)
            granted = int(row.get("granted", 0)) + provisional - give_back
            block = 0
            if reserve and granted < cap:
                block = block_size(cap - granted, self._recent(counter))
            entity = {
                "PartitionKey": counter.partition,
                "RowKey": counter.attendee_id,
                "granted": granted + block,
                "used": int(row.get("used", 0)) + used,
                "tokens": int(row.get("tokens", 0)) + tokens,
            }
            if minute is not None:
                entity["minute"] = minute
            for reason, count in refused.items():
                entity[f"refused_{reason}"] = int(row.get(f"refused_{reason}", 0)) + count
            changed = used or tokens or provisional or give_back or block or refused
            changed = changed or minute_taken  # else a read is all this sync needed
            if changed and not await self._tables.put_versioned(COUNTERS_TABLE, entity, found):
                continue
            counter.used_unflushed -= used
            counter.tokens_unflushed -= tokens
            counter.provisional -= provisional
            for reason, count in refused.items():
                left = counter.refused.get(reason, 0) - count
                if left > 0:
                    counter.refused[reason] = left
                else:
                    counter.refused.pop(reason, None)
            counter.minute.stored(entity.get("minute", row.get("minute")), minute_taken, now)
            counter.allowance += block
            if block:
                counter.block = block
                counter.block_mark = (time.monotonic(), counter.admitted)
            counter.granted_seen = entity["granted"]
            counter.used_seen = entity["used"]
            counter.tokens_seen = entity["tokens"]
            return
        raise StorageUnavailable(f"counter {counter.partition}/{counter.attendee_id} is contended")

    def _busy(self, row: Counter) -> bool:
        # A call counts on this copy (its tokens, or its wait for a block): nobody else syncs it.
        return bool(row.tokens_in_flight or row.lock.locked())

    async def _write_back(self, key: tuple[str, str], row: Counter, give_back: int) -> None:
        await self._write(row, self._caps.get(key, 0), reserve=False, give_back=give_back)

    async def today(self, event: Event, attendee_id: str, now: datetime) -> tuple[int, int]:
        """(requests used, tokens used) today, as fresh as storage allows."""
        counter = self._attendee(event, attendee_id, now)
        try:
            async with counter.lock:
                await self._write(counter, event.daily_request_cap, reserve=False)
        except StorageUnavailable:
            pass
        return counter.used, counter.tokens

    async def close(self) -> None:
        self._background.cancel()
        await super().close()


def _cap_field(*, tokens: bool, whole: bool) -> str:
    """The event's field holding a daily cap: of requests or tokens, per attendee or (whole) of
    all attendees together; its refusal's code is the field's name and '_exceeded'."""
    return f"{'event_' if whole else ''}daily_{'token' if tokens else 'request'}_cap"


def cap_error(event: Event, now: datetime, *, tokens: bool, whole: bool = False) -> ProxyError:
    """The refusal of a daily cap used up, until the event's midnight."""
    name = _cap_field(tokens=tokens, whole=whole)
    spent = f"{'used' if tokens else 'made'} today's {getattr(event, name)} "
    spent += "tokens" if tokens else "requests"
    if whole:
        said = f"Event '{event.name}' has {spent}, the total for all its attendees together. It"
    else:
        said = f"You have {spent} for '{event.name}'. The cap"
    wait = event.seconds_to_local_midnight(now)
    return TooManyRequests(
        f"{name}_exceeded",
        f"{said} resets at midnight {event.time_zone} (in {wait} seconds).",
        retry_after=wait,
    )


def _still_running(event: Event, *, whole: bool) -> ProxyError:
    """The refusal of a token cap that calls in flight may still use up: retry once they end."""
    name = _cap_field(tokens=True, whole=whole)
    rest = f"may use the rest of today's {getattr(event, name)} tokens"
    if whole:
        said = f"Calls still running in '{event.name}' {rest} for all its attendees together."
    else:
        said = f"Calls of yours still running {rest} for '{event.name}'."
    return TooManyRequests(
        f"{name}_exceeded", f"{said} Retry when they have finished.", retry_after=5
    )
