"""A fair share of a deployment near its quota, for everyone who uses it.

A pool (the resources serving one deployment name in an event; counted per set of resources,
so events sharing a deployment share its quota) has a requests and a tokens per minute quota
when every member has one: set on the resource (`quota_requests_per_minute`,
`quota_tokens_per_minute`) or announced by the upstream (`x-ratelimit-limit-*`). The calls
admitted to the pool in the last minute are counted per attendee, here exactly and on other
instances from the rows they publish each sync interval; the upstream's
`x-ratelimit-remaining-*` of the last 10 s, less what was sent since, can only lower what is
left.

Each attendee active in the last minute, and one more who may yet arrive, gets an equal share
of the quota; what light users leave is shared by the others (the water level L at which
sum(min(used, L)) + L = quota). Once half of the quota is used, an attendee who used L or more
this minute is refused with 429 rate_limit_exceeded (`fair_share`) until their calls age out,
so the upstream never has to refuse everyone; below half, no one has reached L. A call that
would pass what is left of the quota is refused for everyone (`deployment_quota`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from shared.directory.catalog import Resource
from shared.errors import ProxyError
from shared.governance.minutes import (
    SLOT_SECONDS,
    WINDOW_SECONDS,
    Call,
    Window,
    seconds_until,
    slot_of,
    whole_seconds,
)
from shared.platform import clock
from shared.platform.background import Background, repeat
from shared.platform.tables import Tables

log = logging.getLogger(__name__)

SHARES_TABLE = "poolshares"
_PARTITION = "pool"
REPORT_SECONDS = 10.0  # how long an upstream's x-ratelimit-remaining-* is taken as true
# The water level is computed again after this long, or once what is to be shared or what was
# used moved by a RESORT_SHARE-th of the quota (near a small quota: at every call).
LEVEL_SECONDS = 0.25
RESORT_SHARE = 50
PUBLISHED_ATTENDEES = 600  # the heaviest, per instance and pool (a row holds 32K characters)
ROW_SECONDS = WINDOW_SECONDS + 5  # a published row counts this long after it was written


def water_level(capacity: float, usages: Iterable[float]) -> float:
    """The level L with sum(min(u, L)) + L = capacity: an equal share for each attendee and
    one newcomer, where those below it leave the rest to the others."""
    used = sorted(u for u in usages if u > 0)
    below = 0.0
    count = len(used)
    for index, value in enumerate(used):
        level = (capacity - below) / (count - index + 1)
        if level <= value:
            return level
        below += value
    return capacity - below


@dataclass
class Report:
    """What a member's last answer said of its quota."""

    limit_requests: int = 0
    limit_tokens: int = 0
    remaining_requests: int = -1
    remaining_tokens: int = -1
    at: float = 0.0
    sent: int = 0  # requests sent to it since


@dataclass
class Remote:
    """Another instance's calls to a pool in the last minute, as it last published them."""

    slots: dict[int, list[int]]
    attendees: dict[str, list[int]]


@dataclass
class Pool:
    """One deployment of one event: its quota and the calls of the last minute."""

    key: str
    deployment: str
    quota: tuple[int, int] = (0, 0)  # requests, tokens per minute; 0: not known
    members: tuple[str, ...] = ()
    window: Window = field(default_factory=lambda: Window(per_key=True))
    slots: dict[int, list[int]] = field(default_factory=dict)  # this instance's, per slot
    remote: dict[str, Remote] = field(default_factory=dict)  # instance -> its counts
    # The water levels (requests, tokens), computed again after LEVEL_SECONDS or once what
    # is to be shared or what was used moved by a RESORT_SHARE-th of the quota (an attendee's
    # own use is always current); when, what was shared, and what was used then.
    levels: tuple[float, float] = (math.inf, math.inf)
    level_at: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)
    active: int = 0  # attendees active in the last minute, as of the levels
    waits: dict[str, tuple[float, float]] = field(default_factory=dict)  # refused: when, wait
    published: tuple[int, int] = (0, 0)
    changed: bool = False

    def used(self, now: float) -> tuple[int, int]:
        """Requests and tokens of the last minute, every instance's."""
        requests, tokens = self.window.requests, self.window.tokens
        first = slot_of(now - WINDOW_SECONDS)
        for remote in self.remote.values():
            for slot, (r, t) in remote.slots.items():
                if slot >= first:
                    requests += r
                    tokens += t
        return requests, tokens

    def used_by(self, attendee_id: str) -> tuple[int, int]:
        mine = (self.window.by_key or {}).get(attendee_id)
        requests, tokens = (mine[0], mine[1]) if mine else (0, 0)
        for remote in self.remote.values():
            theirs = remote.attendees.get(attendee_id)
            if theirs:
                requests += theirs[0]
                tokens += theirs[1]
        return requests, tokens

    def usages(self) -> dict[str, list[int]]:
        merged = {k: list(v) for k, v in (self.window.by_key or {}).items()}
        for remote in self.remote.values():
            for attendee, (r, t) in remote.attendees.items():
                counts = merged.setdefault(attendee, [0, 0])
                counts[0] += r
                counts[1] += t
        return merged

    def take(self, attendee_id: str, tokens: int, now: float) -> Call:
        call = self.window.add(now, tokens, attendee_id)
        counts = self.slots.setdefault(slot_of(now), [0, 0])
        counts[0] += 1
        counts[1] += tokens
        self.changed = True
        return call

    def settle(self, call: Call, tokens: int) -> None:
        delta = tokens - call.tokens
        self.window.settle(call, tokens)
        counts = self.slots.get(slot_of(call.time))
        if counts is not None:
            counts[1] += delta
        self.changed = True

    def cancel(self, call: Call) -> None:
        if call.counted:
            counts = self.slots.get(slot_of(call.time))
            if counts is not None:
                counts[0] -= 1
                counts[1] -= call.tokens
        self.window.cancel(call)
        self.changed = True

    def leaving(self, now: float) -> list[tuple[float, int, int]]:
        leaving = self.window.leaving(now)
        first = slot_of(now - WINDOW_SECONDS)
        for remote in self.remote.values():
            for slot, (r, t) in remote.slots.items():
                if slot >= first:
                    leaving.append(((slot + 1) * SLOT_SECONDS + WINDOW_SECONDS - now, r, t))
        return leaving


class FairShare:
    """The pools with a known quota, their counts across instances, and the check per call."""

    def __init__(self, tables: Tables | None = None, sync_seconds: float = 1.0) -> None:
        self._tables = tables
        self._sync_seconds = sync_seconds
        self._pools: dict[str, Pool] = {}
        self._reports: dict[str, Report] = {}
        self.instance = secrets.token_hex(6)
        self._task: asyncio.Task[None] | None = None
        self._background = Background()

    # --- what the upstream says ----------------------------------------------------------

    def observe(self, resource: Resource, headers: dict[str, str]) -> None:
        """Take in an answer's x-ratelimit-limit-* and x-ratelimit-remaining-* headers."""
        limit_requests = _number(headers.get("x-ratelimit-limit-requests"))
        limit_tokens = _number(headers.get("x-ratelimit-limit-tokens"))
        report = self._reports.get(resource.id)
        if (
            report is None
            and limit_requests < 0
            and limit_tokens < 0
            and not (resource.quota_requests_per_minute or resource.quota_tokens_per_minute)
        ):
            return  # no quota known: its remaining alone says nothing of how near it is
        remaining_requests = _number(headers.get("x-ratelimit-remaining-requests"))
        remaining_tokens = _number(headers.get("x-ratelimit-remaining-tokens"))
        if report is None:
            report = self._reports[resource.id] = Report()
        if limit_requests > 0:
            report.limit_requests = limit_requests
        if limit_tokens > 0:
            report.limit_tokens = limit_tokens
        report.remaining_requests = remaining_requests
        report.remaining_tokens = remaining_tokens
        report.at = clock.time()
        report.sent = 0

    def sending(self, resource: Resource) -> None:
        report = self._reports.get(resource.id)
        if report is not None:
            report.sent += 1

    # --- the check -----------------------------------------------------------------------

    def pool(self, deployment: str, members: Sequence[Resource]) -> Pool | None:
        """The pool's state when its quota is known (every member has one), else None."""
        requests = tokens = 0
        known_requests = known_tokens = True
        for member in members:
            report = self._reports.get(member.id)
            r = member.quota_requests_per_minute or (report.limit_requests if report else 0)
            t = member.quota_tokens_per_minute or (report.limit_tokens if report else 0)
            known_requests = known_requests and r > 0
            known_tokens = known_tokens and t > 0
            requests += r
            tokens += t
        quota = (requests if known_requests else 0, tokens if known_tokens else 0)
        if quota == (0, 0):
            return None
        # Counted per set of resources, not per event: events sharing a deployment share its
        # quota.
        key = ",".join(sorted(m.id for m in members))
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(key, deployment)
            self._start()
        pool.quota = quota
        pool.members = tuple(m.id for m in members)
        return pool

    def _left_by_upstream(self, pool: Pool, now: float) -> tuple[float, float]:
        """What the members' recent answers say is left, less what was sent since (inf: no
        word from one of them)."""
        requests = tokens = 0.0
        for member in pool.members:
            report = self._reports.get(member)
            if report is None or now - report.at > REPORT_SECONDS:
                return math.inf, math.inf
            requests += (
                report.remaining_requests - report.sent
                if report.remaining_requests >= 0
                else math.inf
            )
            tokens += report.remaining_tokens if report.remaining_tokens >= 0 else math.inf
        return requests, tokens

    def check(self, pool: Pool, attendee_id: str, tokens: int, now: float) -> None:
        """Refuse a call the pool's quota cannot take, or one of an attendee above their share."""
        pool.window.prune(now)
        quota_requests, quota_tokens = pool.quota
        used_requests, used_tokens = pool.used(now)
        upstream_requests, upstream_tokens = self._left_by_upstream(pool, now)
        left_requests = min(quota_requests - used_requests, upstream_requests)
        left_tokens = min(quota_tokens - used_tokens, upstream_tokens)
        cost = min(tokens, quota_tokens)
        if (quota_requests and left_requests < 1) or (quota_tokens and left_tokens < cost):
            need_requests = 1 - left_requests if quota_requests else 0
            need_tokens = cost - left_tokens if quota_tokens else 0
            wait = seconds_until(
                pool.leaving(now),
                int(min(need_requests, quota_requests)),
                int(min(need_tokens, quota_tokens)),
            )
            if left_requests == upstream_requests or left_tokens == upstream_tokens:
                wait = min(wait, REPORT_SECONDS)  # the upstream's word is taken only so long
            raise self._refusal(pool, "deployment_quota", wait, left_requests, left_tokens)
        # Used, all told: what the counts say, or more when the upstream says less is left.
        near_requests = quota_requests and 2 * (quota_requests - left_requests) >= quota_requests
        near_tokens = quota_tokens and 2 * (quota_tokens - left_tokens) >= quota_tokens
        if not (near_requests or near_tokens):
            return
        capacity_requests = _capacity(quota_requests, used_requests, left_requests)
        capacity_tokens = _capacity(quota_tokens, used_tokens, left_tokens)
        at = (now, capacity_requests, capacity_tokens, used_requests, used_tokens)
        moved = now - pool.level_at[0] > LEVEL_SECONDS
        for index, quota in enumerate((quota_requests, quota_tokens) * 2, 1):
            if quota and abs(at[index] - pool.level_at[index]) * RESORT_SHARE >= quota:
                moved = True
        if moved:
            usages = pool.usages().values()
            pool.levels = (
                water_level(capacity_requests, (u[0] for u in usages)),
                water_level(capacity_tokens, (u[1] for u in usages)),
            )
            pool.level_at = at
            pool.active = len(usages)
        level_requests, level_tokens = pool.levels
        mine_requests, mine_tokens = pool.used_by(attendee_id)
        over_requests = near_requests and mine_requests >= level_requests
        over_tokens = near_tokens and mine_tokens >= level_tokens
        if over_requests or over_tokens:
            known = pool.waits.get(attendee_id)
            if known is None or now - known[0] > LEVEL_SECONDS:  # refusals come in floods
                wait = max(
                    self._until_below(pool, attendee_id, now, mine_requests, level_requests, 0)
                    if over_requests
                    else 0.0,
                    self._until_below(pool, attendee_id, now, mine_tokens, level_tokens, 1)
                    if over_tokens
                    else 0.0,
                )
                pool.waits[attendee_id] = known = (now, wait)
            raise self._refusal(
                pool,
                "fair_share",
                known[1] - (now - known[0]),
                max(0.0, level_requests - mine_requests),
                max(0.0, level_tokens - mine_tokens),
                shared_by=pool.active,
            )

    @staticmethod
    def _until_below(
        pool: Pool, attendee_id: str, now: float, mine: int, level: float, which: int
    ) -> float:
        """Seconds until the attendee's calls that leave take them below the level."""
        need = math.floor(mine - level) + 1
        leaving = [(e, (r, t)[which]) for e, r, t in pool.window.leaving(now, attendee_id)]
        freed = 0
        for ends, amount in leaving:  # oldest first
            freed += amount
            if freed >= need:
                return ends
        # The rest are other instances' calls, of unknown age: as if spread over the minute.
        return WINDOW_SECONDS * min(1.0, need / max(mine, 1))

    @staticmethod
    def _refusal(
        pool: Pool,
        reason: str,
        wait: float,
        left_requests: float,
        left_tokens: float,
        shared_by: int = 0,
    ) -> ProxyError:
        seconds = whole_seconds(wait)
        quota_requests, quota_tokens = pool.quota
        headers = {"Retry-After": str(seconds), "retry-after-ms": str(max(1, int(wait * 1000)))}
        if quota_requests:
            headers["x-ratelimit-limit-requests"] = str(quota_requests)
            headers["x-ratelimit-remaining-requests"] = str(_whole(left_requests))
            headers["x-ratelimit-reset-requests"] = str(seconds)
        if quota_tokens:
            headers["x-ratelimit-limit-tokens"] = str(quota_tokens)
            headers["x-ratelimit-remaining-tokens"] = str(_whole(left_tokens))
            headers["x-ratelimit-reset-tokens"] = str(seconds)
        quota = " and ".join(
            text
            for text in (
                f"{quota_requests} requests" if quota_requests else "",
                f"{quota_tokens} tokens" if quota_tokens else "",
            )
            if text
        )
        if reason == "fair_share":
            message = (
                f"Deployment '{pool.deployment}' is near its quota of {quota} per minute, "
                f"shared by {shared_by} attendees active this minute, and you have used your "
                f"share of it. Retry after {seconds} seconds."
            )
        else:
            message = (
                f"Deployment '{pool.deployment}' has used its quota of {quota} per minute. "
                f"Retry after {seconds} seconds."
            )
        return ProxyError("rate_limit_exceeded", message, headers=headers, reason=reason)

    # --- across instances ----------------------------------------------------------------

    def _start(self) -> None:
        if self._tables is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(
                repeat(self.sync, self._sync_seconds, "fair share: counts", log)
            )

    async def sync(self) -> None:
        """Publish this instance's counts of each pool that changed; read the others'."""
        assert self._tables is not None
        now = clock.time()
        first = slot_of(now - WINDOW_SECONDS)
        for key, pool in list(self._pools.items()):
            pool.window.prune(now)
            for old in [s for s in pool.slots if s < first]:
                del pool.slots[old]
            totals = (pool.window.requests, pool.window.tokens)
            if not pool.changed and totals == pool.published:
                if not totals[0] and not pool.remote and not pool.slots:
                    del self._pools[key]  # quiet everywhere: forget it
                continue
            heaviest = sorted(
                (pool.window.by_key or {}).items(), key=lambda item: item[1][0], reverse=True
            )[:PUBLISHED_ATTENDEES]
            entity = {
                "PartitionKey": _PARTITION,
                "RowKey": f"{key}|{self.instance}",
                "until": now + ROW_SECONDS,
                "slots": orjson.dumps({str(s): c for s, c in pool.slots.items()}).decode(),
                "attendees": orjson.dumps(dict(heaviest)).decode(),
            }
            pool.changed = False
            await self._tables.upsert(SHARES_TABLE, entity, replace=True)
            pool.published = totals
        rows = await self._tables.query(
            SHARES_TABLE,
            "PartitionKey eq @pk and until gt @now",
            {"pk": _PARTITION, "now": now},
        )
        seen: dict[str, dict[str, Remote]] = {}
        for row in rows:
            key, _, instance = row["RowKey"].rpartition("|")
            if instance == self.instance or key not in self._pools:
                continue
            try:
                slots = {int(s): c for s, c in orjson.loads(row.get("slots") or "{}").items()}
                attendees = orjson.loads(row.get("attendees") or "{}")
            except (orjson.JSONDecodeError, ValueError, AttributeError):
                continue
            seen.setdefault(key, {})[instance] = Remote(slots, attendees)
        for key, pool in self._pools.items():
            pool.remote = seen.get(key, {})
            pool.level_at = (0.0, 0.0, 0.0, 0.0, 0.0)  # new counts: new levels
            pool.waits.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._background.cancel()


def _capacity(quota: int, counted: int, left: float) -> float:
    """The quota to share among the attendees counted, in their units.

    When the upstream says less is left than the counts imply, the calls it counted and they
    do not (another instance's, not published yet, or another client's) are taken to be the
    attendees' in proportion to their counted use, as calls spread over instances are: the
    quota is scaled down by the same factor instead of scaling every use up.
    """
    used = quota - left  # all told
    if counted <= 0 or used <= counted:
        return min(quota, counted + left)
    return quota * counted / used


def _number(value: str | None) -> int:
    """A header's whole number, or -1 when it is missing or not one (Azure sends -1 at times)."""
    if not value:
        return -1
    try:
        return int(float(value))
    except ValueError:
        return -1


def _whole(value: float) -> int:
    return 0 if math.isinf(value) or value < 0 else int(value)
