"""Budgets: money an event, or each attendee of it, may spend, held across instances.

An event may name a `budget` (all attendees together, over the whole event), an
`attendee_budget` (each attendee, over the whole event) and an `attendee_daily_budget` (each
attendee per day of the event's time zone), in its currency. Each is one row in `budgets`
(partition: the event; row: `_event`, the attendee's id, or `<attendee id>|YYYYMMDD`) holding
`granted` (billionths handed out to instances) and `spent` (billionths spent).

The caps' way with requests (shared/governance/caps.py), applied to money: an instance
reserves a block of a budget from its row with a conditional update (ETag) and admits calls
locally against what it holds. A call is admitted against its worst case (its input as if
every byte were a token, plus the most output it may ask for, at the prices of the members of
its pool) and settled at its exact cost: the difference goes back to the instance's
allowance. `granted` never passes the budget, so while storage answers, the calls admitted
by all instances together can never cost more than the budget, on any number of instances.
The overshoot is bounded by what calls cost beyond their worst case, which only happens
where a worst case cannot be known before the call (the length of an uploaded recording);
unpriced calls are not counted. Blocks are an eighth of what is left (at least the call's
worst case); an instance hands back what it holds after `idle_seconds` without calls, and
writes what it spent every `sync_seconds`.

While storage cannot be reached, an instance admits on its last view of the row (what it
saw left, less what runs here); its grants are written once storage answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from shared.directory.events import Event
from shared.errors import ProxyError
from shared.governance.alerts import Alerts
from shared.governance.held import HeldRows
from shared.governance.prices import NANO, as_amount
from shared.platform.tables import StorageUnavailable, Tables

log = logging.getLogger(__name__)

BUDGETS_TABLE = "budgets"
EVENT_ROW = "_event"


def nano_of(amount: str) -> int:
    """An amount of the currency ('12.5') in billionths; '' is 0 (no budget)."""
    return int(Decimal(amount or "0") * NANO)


@dataclass
class Pot:
    """This instance's view of one budget row."""

    partition: str
    row: str
    limit: int  # billionths
    kind: str  # "event", "attendee" or "daily"
    event: Event  # as last seen by a call (for its alerts)
    allowance: int = 0  # granted here, not held by a call
    in_flight: int = 0  # worst cases of calls admitted here and not settled
    spent_unflushed: int = 0
    overdrawn: int = 0  # spent here beyond the worst cases granted: added to `granted`
    provisional: int = 0  # granted here while storage was down, not written yet
    granted_seen: int = 0
    spent_seen: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def left(self) -> int:
        """What is left as this instance knows it: spent, and calls running here, taken off."""
        return self.limit - self.spent_seen - self.spent_unflushed - self.in_flight

    @property
    def dirty(self) -> bool:
        return bool(self.spent_unflushed or self.overdrawn or self.provisional)


@dataclass
class Hold:
    """A call's worst case, taken from each of its budgets until it settles."""

    pots: list[Pot]
    worst: int


class Budgets(HeldRows[Pot]):
    """Admits calls against the event's budgets and counts what they cost."""

    NAME = "budgets"

    def __init__(
        self,
        tables: Tables,
        sync_seconds: float = 1.0,
        idle_seconds: float = 5.0,
        alerts: Alerts | None = None,
    ) -> None:
        super().__init__(sync_seconds, idle_seconds)
        self._tables = tables
        self._alerts = alerts

    def pots(self, event: Event, attendee_id: str, now: datetime) -> list[Pot]:
        """The budgets a call of this attendee takes from (none when the event has none)."""
        found = []
        for kind, amount, row in (
            ("daily", event.attendee_daily_budget, f"{attendee_id}|{event.local_date(now)}"),
            ("attendee", event.attendee_budget, attendee_id),
            ("event", event.budget, EVENT_ROW),
        ):
            if not amount:
                continue
            key = (event.id, row)
            pot = self._rows.get(key)
            if pot is None:
                pot = self._rows[key] = Pot(event.id, row, nano_of(amount), kind, event)
            pot.limit, pot.event = nano_of(amount), event  # the organiser may change them
            found.append(pot)
        return found

    async def admit(self, event: Event, attendee_id: str, now: datetime, worst: int) -> Hold | None:
        """Take the call's worst case (billionths) from each budget, or refuse with the first
        budget that cannot hold it."""
        pots = self.pots(event, attendee_id, now)
        if not pots:
            return None
        self._start()
        while True:
            for pot in pots:
                pot.last_used = time.monotonic()
                if pot.allowance < worst:
                    await self._reserve(pot, worst)
                    if pot.allowance < worst:
                        if pot.kind == "event" and self._alerts is not None:
                            self._alerts.spent(event, pot.spent_seen, pot.limit, exhausted=True)
                        raise budget_error(event, pot, worst, now)
            # No await from here on: concurrent calls see each other's takings.
            if all(pot.allowance >= worst for pot in pots):
                break
        for pot in pots:
            pot.allowance -= worst
            pot.in_flight += worst
        return Hold(pots, worst)

    def settle(self, hold: Hold | None, cost: int) -> None:
        """The call finished: its worst case swapped for what it cost (0: it failed first)."""
        if hold is None:
            return
        for pot in hold.pots:
            pot.in_flight -= hold.worst
            pot.spent_unflushed += cost
            if cost <= hold.worst:
                pot.allowance += hold.worst - cost
            else:
                pot.overdrawn += cost - hold.worst
        hold.pots = []  # settled once

    def charge(self, event: Event, attendee_id: str, now: datetime, cost: int) -> None:
        """Spending no admitted worst case held: a realtime call's responses, priced as the
        sideband reports them. Added to the budgets' rows at the next sync (or `check`)."""
        pots = self.pots(event, attendee_id, now)
        if pots and cost > 0:
            self._start()
            for pot in pots:
                # Out of what this instance holds first (granted already), the rest overdrawn.
                taken = min(max(pot.allowance, 0), cost)
                pot.allowance -= taken
                pot.spent_unflushed += cost
                pot.overdrawn += cost - taken

    def count_lost(self, event: Event, attendee_id: str, when: datetime, cost: int) -> None:
        """A call admitted elsewhere whose worker was lost, recorded at its worst case: its
        cost is added to what the budgets have spent at the next sync. What it held stays
        granted (its instance never handed it back), so the grants do not move."""
        pots = self.pots(event, attendee_id, when)
        if pots and cost > 0:
            self._start()
            for pot in pots:
                pot.spent_unflushed += cost

    async def check(self, event: Event, attendee_id: str, now: datetime) -> None:
        """Raise the refusal of the first budget that is spent, as storage has it now (what
        this instance spent written first): a running realtime call ends on it."""
        await self.refresh(event, attendee_id, now)
        for pot in self.pots(event, attendee_id, now):
            if pot.left <= 0:
                raise budget_error(event, pot, 0, now)

    async def refresh(self, event: Event, attendee_id: str, now: datetime) -> None:
        """Read the attendee's budget rows now (what other instances spent)."""
        for pot in self.pots(event, attendee_id, now):
            try:
                async with pot.lock:
                    await self._write(pot)
            except StorageUnavailable:
                pass

    def remaining(self, event: Event, attendee_id: str, now: datetime) -> str | None:
        """What is left of the attendee's tightest budget, as this instance knows it."""
        own = [pot for pot in self.pots(event, attendee_id, now) if pot.kind != "event"]
        if not own:
            return None
        return as_amount(max(0, min(pot.left for pot in own)))

    async def _reserve(self, pot: Pot, need: int) -> None:
        """Make the allowance here `need` at least, if the budget has room for it."""
        async with pot.lock:
            if pot.allowance >= need:
                return
            try:
                await self._write(pot, reserve=need - pot.allowance)
            except StorageUnavailable as exc:
                # Admit on the last view of the row; the grant is written once storage answers.
                short = need - pot.allowance
                if pot.left - pot.allowance >= short:
                    pot.allowance += short
                    pot.provisional += short
                log.warning("budgets: storage unavailable, on the last view: %s", str(exc)[:200])

    async def _write(self, pot: Pot, *, reserve: int = 0, give_back: int = 0) -> None:
        """Merge this instance's spending into the row (and reserve `reserve` at least, or
        nothing when less is left); read it back."""
        for _ in range(20):
            spent, overdrawn, provisional = pot.spent_unflushed, pot.overdrawn, pot.provisional
            found = await self._tables.get_versioned(BUDGETS_TABLE, pot.partition, pot.row)
            row: dict[str, Any] = found[0] if found else {}
            granted = int(row.get("granted") or 0) + overdrawn + provisional - give_back
            block = 0
            free = pot.limit - granted
            if reserve and free >= reserve:
                block = max(reserve, free // 8)
            entity = {
                "PartitionKey": pot.partition,
                "RowKey": pot.row,
                # Strings: billionths pass 2**31 soon, and the rows are read back as they went.
                "granted": str(granted + block),
                "spent": str(int(row.get("spent") or 0) + spent),
            }
            changed = spent or overdrawn or provisional or give_back or block  # else a read
            if changed and not await self._tables.put_versioned(BUDGETS_TABLE, entity, found):
                continue
            pot.spent_unflushed -= spent
            pot.overdrawn -= overdrawn
            pot.provisional -= provisional
            pot.allowance += block
            pot.granted_seen = int(entity["granted"])
            pot.spent_seen = int(entity["spent"])
            if pot.kind == "event" and self._alerts is not None:
                self._alerts.spent(pot.event, pot.spent_seen, pot.limit)
            return
        raise StorageUnavailable(f"budget {pot.partition}/{pot.row} is contended")

    def _busy(self, row: Pot) -> bool:
        return bool(row.in_flight)

    def _may_give_back(self, row: Pot) -> bool:
        # A call running here settles into the allowance: it is handed back once none runs.
        return not row.in_flight

    async def _write_back(self, key: tuple[str, str], row: Pot, give_back: int) -> None:
        await self._write(row, give_back=give_back)


def budget_error(event: Event, pot: Pot, worst: int, now: datetime) -> ProxyError:
    """The refusal of a call its budget cannot hold: which budget, what is left, and when a
    daily one starts again (`worst` 0: a running call ended because the budget is spent)."""
    limit, left = as_amount(pot.limit), as_amount(max(0, pot.left))
    cur = event.currency
    # What the caller can do: ask for less, or ask the organiser (a running call that ended
    # can only do the latter).
    lower = (
        f" This call may cost up to {as_amount(worst)} {cur}; ask for fewer output tokens "
        "(max_tokens) or a cheaper deployment"
        if worst
        else ""
    )
    ask = ", or ask" if worst else " Ask"
    if pot.kind == "event":
        return ProxyError(
            "event_budget_exhausted",
            f"Event '{event.name}' has spent its budget of {limit} {cur} for all attendees "
            f"together ({left} {cur} left, not held by calls running now).{lower}{ask} the "
            "organiser to raise the budget.",
            headers={"Retry-After": "60"},
            reason="event_budget",
        )
    if pot.kind == "daily":
        wait = event.seconds_to_local_midnight(now)
        return ProxyError(
            "attendee_budget_exhausted",
            f"You have spent today's budget of {limit} {cur} for '{event.name}' ({left} {cur} "
            f"left).{lower}{'.' if worst else ''} The daily budget resets at midnight "
            f"{event.time_zone} (in {wait} seconds).",
            headers={"Retry-After": str(wait)},
            reason="attendee_budget",
        )
    return ProxyError(
        "attendee_budget_exhausted",
        f"You have spent your budget of {limit} {cur} for '{event.name}' ({left} {cur} left)."
        f"{lower}{ask} the organiser to raise it.",
        reason="attendee_budget",
    )
