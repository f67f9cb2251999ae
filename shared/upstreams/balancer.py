"""Choosing a deployment: weighted round-robin within the best priority, with cooldowns."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from shared.directory.catalog import Resource
from shared.platform.background import Background, repeat
from shared.platform.tables import Conflict, StorageUnavailable, Tables

log = logging.getLogger(__name__)

DEFAULT_COOLDOWN_SECONDS = 10.0
MAX_COOLDOWN_SECONDS = 300.0


def _weighted_cycle(members: Sequence[Resource]) -> list[Resource]:
    """A smooth weighted round-robin cycle (weights 1:1:2 give a, c, b, c)."""
    current = {m.id: 0 for m in members}
    total = sum(m.weight for m in members)
    cycle = []
    for _ in range(total):
        for m in members:
            current[m.id] += m.weight
        best = max(members, key=lambda m: current[m.id])
        current[best.id] -= total
        cycle.append(best)
    return cycle


def cooldown_seconds(headers: dict[str, str]) -> float:
    """How long the upstream asked us to wait, from its retry headers; 10 s if it did not say."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return min(max(float(value) * scale, 0.0), MAX_COOLDOWN_SECONDS)
            except ValueError:
                if name == "retry-after":
                    try:
                        delay = parsedate_to_datetime(value).timestamp() - time.time()
                        return min(max(delay, 0.0), MAX_COOLDOWN_SECONDS)
                    except (TypeError, ValueError):
                        pass
    resets = []
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers.get(name)
        if value:
            try:
                resets.append(float(value.rstrip("s")))
            except ValueError:
                pass
    if resets:
        return min(max(resets), MAX_COOLDOWN_SECONDS)
    return DEFAULT_COOLDOWN_SECONDS


CURSORS_TABLE = "cursors"
COOLDOWNS_TABLE = "cooldowns"
# A lease is whole weighted cycles (each fully used lease splits exactly by weight), at least
# this many positions: a lease is two storage calls, so small pools must not lease per request.
LEASE_POSITIONS = 256
# Take the next lease when this share of the current one is left.
LEASE_REFILL_AT = 0.25


@dataclass
class Lease:
    """A block of round-robin positions [next, end) this instance owns, and the next one."""

    next: int
    end: int
    refilling: bool = False
    queued: tuple[int, int] | None = None


class Balancer:
    """Orders a pool's members for one request: who first, who to fail over to.

    Round-robin positions come from a counter in Table Storage that every instance leases in
    blocks, so instances continue one shared sequence without a write per request. Cooldowns
    are written to Table Storage and read back by every instance about once per
    `sync_seconds`. Storage is never awaited on the request path: while it is slow or down,
    positions continue locally and cooldowns stay local.
    """

    def __init__(self, tables: Tables | None = None, sync_seconds: float = 1.0) -> None:
        self._tables = tables
        self._sync_seconds = sync_seconds
        self._leases: dict[str, Lease] = {}
        self._cycles: dict[str, tuple[tuple[tuple[str, int], ...], list[Resource]]] = {}
        self._cooling: dict[str, float] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._background = Background()

    # --- cooldowns ---------------------------------------------------------------------

    def cool(self, resource_id: str, seconds: float) -> None:
        """Stop using a resource for `seconds`, here at once and on other instances soon."""
        until = time.monotonic() + seconds
        if until > self._cooling.get(resource_id, 0.0):
            self._cooling[resource_id] = until
            if self._tables is not None:
                self._background.spawn(self._publish_cooldown(resource_id, time.time() + seconds))

    def cooling_for(self, resource_id: str) -> float:
        return max(0.0, self._cooling.get(resource_id, 0.0) - time.monotonic())

    def state(self) -> dict[str, Any]:
        """Counts for the health route: how many members are cooling, and for how long."""
        now = time.monotonic()
        cooling = [until - now for until in self._cooling.values() if until > now]
        return {
            "members_cooling": len(cooling),
            "longest_cooldown_seconds": round(max(cooling, default=0.0), 1),
            "pools_in_use": len(self._cycles),
        }

    def soonest(self, members: Sequence[Resource]) -> float:
        """Seconds until the first member of the pool is usable again."""
        return min((self.cooling_for(m.id) for m in members), default=0.0)

    async def _publish_cooldown(self, resource_id: str, until: float) -> None:
        assert self._tables is not None
        entity = {"PartitionKey": "cooldown", "RowKey": resource_id, "until": until}
        try:
            await self._tables.upsert(COOLDOWNS_TABLE, entity, replace=True)
        except StorageUnavailable as exc:
            log.warning("cooldown of %s not shared: %s", resource_id, str(exc)[:200])

    async def sync_cooldowns(self) -> None:
        """Adopt the cooldowns other instances published."""
        assert self._tables is not None
        rows = await self._tables.query(
            COOLDOWNS_TABLE, "PartitionKey eq 'cooldown' and until gt @now", {"now": time.time()}
        )
        now_wall, now_mono = time.time(), time.monotonic()
        for row in rows:
            until = now_mono + (float(row["until"]) - now_wall)
            if until > self._cooling.get(row["RowKey"], 0.0):
                self._cooling[row["RowKey"]] = until

    # --- round-robin positions ------------------------------------------------------------

    def _position(self, key: str, block: int) -> int:
        lease = self._leases.get(key)
        if lease is None:
            # Until the first lease arrives, start anywhere: new instances must not all pick
            # the same member first.
            lease = self._leases[key] = Lease(next=random.randrange(block), end=0)
        if lease.next >= lease.end and lease.queued is not None:
            # Switch leases only at the end of one: a lease is whole cycles, so the sequence
            # stays exactly weighted.
            (lease.next, lease.end), lease.queued = lease.queued, None
        position = lease.next
        lease.next += 1
        if (
            self._tables is not None
            and not lease.refilling
            and lease.queued is None
            and lease.end - lease.next <= block * LEASE_REFILL_AT
        ):
            lease.refilling = True
            self._background.spawn(self._refill(key, lease, block))
        return position

    async def _refill(self, key: str, lease: Lease, block: int) -> None:
        try:
            start = await self.lease(key, block)
            # Used when the current lease runs out; positions handed out past its end while
            # waiting were local extras.
            lease.queued = (start, start + block)
        except StorageUnavailable as exc:
            log.warning("round-robin lease for %s not taken: %s", key, str(exc)[:200])
        finally:
            lease.refilling = False

    async def lease(self, key: str, block: int) -> int:
        """Take `block` positions from the shared counter of `key`; returns the first."""
        assert self._tables is not None
        for _ in range(20):
            found = await self._tables.get_versioned(CURSORS_TABLE, key, "")
            if found is None:
                try:
                    await self._tables.insert(
                        CURSORS_TABLE, {"PartitionKey": key, "RowKey": "", "next": block}
                    )
                    return 0
                except Conflict:
                    continue
            row, etag = found
            start = int(row["next"])
            try:
                await self._tables.update(
                    CURSORS_TABLE,
                    {"PartitionKey": key, "RowKey": "", "next": start + block},
                    etag=etag,
                )
                return start
            except Conflict:
                await asyncio.sleep(random.uniform(0, 0.02))
        raise StorageUnavailable(f"round-robin counter {key} is too contended")

    # --- ordering ------------------------------------------------------------------------------

    def _cycle(self, key: str, members: Sequence[Resource]) -> list[Resource]:
        signature = tuple((m.id, m.weight) for m in members)
        cached = self._cycles.get(key)
        if cached is None or cached[0] != signature:
            cached = (signature, _weighted_cycle(members))
            self._cycles[key] = cached
        return cached[1]

    def order(self, pool: str, members: Sequence[Resource]) -> list[Resource]:
        """Healthy members: the best priority in round-robin order first, then the others."""
        if self._tables is not None and self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(
                repeat(
                    self.sync_cooldowns, self._sync_seconds, "cooldowns", log, first_at_once=True
                )
            )
        now = time.monotonic()
        healthy = [m for m in members if m.active and self._cooling.get(m.id, 0.0) <= now]
        if not healthy:
            return []
        by_priority: dict[int, list[Resource]] = {}
        for member in healthy:
            by_priority.setdefault(member.priority, []).append(member)
        ordered: list[Resource] = []
        for rank, priority in enumerate(sorted(by_priority)):
            group = sorted(by_priority[priority], key=lambda m: m.id)
            if len(group) == 1:
                ordered.append(group[0])
                continue
            key = f"{pool}|{priority}"
            cycle = self._cycle(key, group)
            if rank == 0:
                cycles = max(8, -(-LEASE_POSITIONS // len(cycle)))
                first = cycle[self._position(key, len(cycle) * cycles) % len(cycle)]
            else:
                first = cycle[0]  # fallback groups keep their order; only the first one rotates
            ordered.append(first)
            ordered.extend(m for m in group if m is not first)
        return ordered

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
        self._background.cancel()
