"""Daily totals per event x attendee x deployment, rolled up from the usage records.

The usage writer marks each 10-minute bucket it writes to in `usagedays` (row key
`day|bucket`, with `last_write`). A rollup recomputes every bucket written to since its last
rollup from that bucket's records alone (a range of row keys), stores the bucket's subtotals
as one entity in `rollupparts`, and sums the day's subtotals (at most 144) into its totals.
So the work follows new traffic, not the size of the day; running it twice gives the same
totals; late records mark their own bucket and are picked up. Retention deletes a bucket's raw
records only once the bucket was rolled up after its last write.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, create_model

from shared.directory.models import UsageNumbers
from shared.governance.caps import COUNTERS_TABLE
from shared.governance.prices import as_amount
from shared.governance.usage import DAYS_TABLE, USAGE_TABLE
from shared.platform.tables import Conflict, Entity, StorageUnavailable, Tables

log = logging.getLogger(__name__)

PARTS_TABLE = "rollupparts"
ROLLUPS_TABLE = "rollups"
# requests, prompt_tokens, ...: UsageNumbers' whole numbers, in its order (its `cost` is
# cost_nano as an amount, worked out when shown)
NUMBERS = tuple(name for name, info in UsageNumbers.model_fields.items() if info.annotation is int)
_TOKEN_FIELDS = NUMBERS[1:]  # what a usage record holds of them (it is one request)
_CHUNK = 30_000  # characters per string property (Table Storage allows 32K)
_SLICE = 200  # records summed between two chances for requests to run (about 0.2 ms)
# After each page of records, rest as long as storage took to serve it. The records share their
# partition with the usage writer's appends (Table Storage targets 2,000 entities/s per
# partition), and a single-threaded emulator serves nothing else while it scans: a rollup
# never takes more than half of what storage gives.
_REST = 1.0
# The rows of one partition whose row keys start with a prefix (see `_prefixed`).
_PREFIX_RANGE = "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high"


def _prefixed(pk: str, prefix: str) -> dict[str, str]:
    """Parameters of `_PREFIX_RANGE`: '~' sorts after every character used in our keys."""
    return {"pk": pk, "low": prefix, "high": prefix + "~"}


def _whole(value: Any) -> int:
    """A stored number: Table Storage answers a 64-bit one (a cost above 2.1 in billionths) as
    a typed property or, without metadata, as a string; a record's `unpriced` is a bool."""
    return int(getattr(value, "value", value) or 0)


class Totals:
    """Sums of the usage NUMBERS, in their order."""

    __slots__ = ("numbers",)

    def __init__(self) -> None:
        self.numbers = [0] * len(NUMBERS)

    def add(self, row: dict[str, Any], requests: int = 1) -> None:
        """A usage record (one request) or a total row (`requests` given): its numbers."""
        self.add_numbers([requests, *(_whole(row.get(name)) for name in _TOKEN_FIELDS)])

    def add_numbers(self, numbers: list[int]) -> None:
        """Numbers in NUMBERS' order (a list stored before a number was added lacks it)."""
        for index, number in enumerate(numbers[: len(NUMBERS)]):
            self.numbers[index] += number

    def as_list(self) -> list[int]:
        return list(self.numbers)

    def as_dict(self) -> dict[str, Any]:
        """The numbers, and the cost as a decimal amount of the currency."""
        numbers: dict[str, Any] = dict(zip(NUMBERS, self.numbers, strict=True))
        numbers["cost"] = as_amount(numbers["cost_nano"])
        return numbers


@dataclass
class RollupResult:
    buckets: int = 0
    days: int = 0
    records: int = 0
    rows: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: RollupResult) -> None:
        self.buckets += other.buckets
        self.days += other.days
        self.records += other.records
        self.rows += other.rows
        self.errors += other.errors


# This process's roll-ups under way, by loop and event (None: every event): a report that asks
# while one runs waits for it, then finds its buckets rolled up, instead of reading them again
# (the console asks for four reports at once).
_rolling: dict[int, tuple[asyncio.AbstractEventLoop, dict[str | None, asyncio.Lock]]] = {}
# Across instances, an event's roll-up holds a lease: an entity of `rollupleases`, taken by
# insert or, once expired, by an update conditional on its ETag. Two roll-ups of one event at
# once could store the older of their subtotals or day sums last, to stand until the bucket's
# next record.
LEASES_TABLE = "rollupleases"
LEASE_ROW = "rolling"
LEASE_SECONDS = 120.0  # a holder that died frees the lease after this long
LEASE_WAIT_SECONDS = 30.0  # a report waits this long at most, then rolls up alongside
LEASE_POLL_SECONDS = 0.1


async def roll_up(tables: Tables, event_id: str | None = None) -> RollupResult:
    """Recompute the buckets written to since they were last rolled up, then their days: one
    event's (a report's, waiting for another instance's roll-up of it), or every event's (the
    timer's, passing by events another instance is rolling up)."""
    loop = asyncio.get_running_loop()
    held = _rolling.get(id(loop))
    if held is None or held[0] is not loop:
        held = _rolling[id(loop)] = (loop, {})
    lock = held[1].setdefault(event_id, asyncio.Lock())
    async with lock:
        if event_id is not None:
            return await _roll_up_leased(tables, event_id, LEASE_WAIT_SECONDS)
        result = RollupResult()
        markers = await tables.all(DAYS_TABLE)
        for event in sorted({m["PartitionKey"] for m in markers if _dirty(m)}):
            result.add(await _roll_up_leased(tables, event, 0.0))
        return result


def _dirty(marker: Entity) -> bool:
    """A bucket's marker written to since it was last rolled up."""
    return "|" in marker["RowKey"] and float(marker.get("rolled_at", 0)) < float(
        marker.get("last_write", 0)
    )


async def _roll_up_leased(tables: Tables, event_id: str, wait: float) -> RollupResult:
    """The event's roll-up under its lease; waiting `wait` seconds at most for another's to
    end (0: none, and the event is left to it)."""
    holder = secrets.token_hex(8)
    deadline = time.monotonic() + wait
    while not await _take_lease(tables, event_id, holder):
        if not wait:
            return RollupResult()
        if time.monotonic() >= deadline:
            log.warning(
                "rollup: %s has been rolled up elsewhere for %.0f s; rolling up alongside",
                event_id, wait,
            )  # fmt: skip
            return await _roll_up(tables, event_id)
        await asyncio.sleep(LEASE_POLL_SECONDS)
    try:
        return await _roll_up(tables, event_id)
    finally:
        await _release_lease(tables, event_id, holder)


async def _take_lease(tables: Tables, event_id: str, holder: str) -> bool:
    found = await tables.get_versioned(LEASES_TABLE, event_id, LEASE_ROW)
    now = time.time()
    if found is not None and float(found[0].get("until", 0)) > now:
        return False
    lease = {"PartitionKey": event_id, "RowKey": LEASE_ROW, "holder": holder,
             "until": now + LEASE_SECONDS}  # fmt: skip
    return await tables.put_versioned(LEASES_TABLE, lease, found)


async def _release_lease(tables: Tables, event_id: str, holder: str) -> None:
    try:
        found = await tables.get_versioned(LEASES_TABLE, event_id, LEASE_ROW)
        if found is None or found[0].get("holder") != holder:
            return  # it expired, and another took it
        freed = {"PartitionKey": event_id, "RowKey": LEASE_ROW, "holder": "", "until": 0.0}
        await tables.update(LEASES_TABLE, freed, etag=found[1])
    except (Conflict, StorageUnavailable) as exc:
        log.warning("rollup: the lease of %s not given back (it ends by itself): %s",
                    event_id, str(exc)[:200])  # fmt: skip


async def _roll_up(tables: Tables, event_id: str) -> RollupResult:
    """The event's buckets written to since they were last rolled up, then their days."""
    result = RollupResult()
    markers = await tables.partition(DAYS_TABLE, event_id)
    days: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
    for marker in markers:
        if not _dirty(marker):
            continue  # rolled up since its last record (or an older layout's day marker)
        event, (day, _, bucket) = marker["PartitionKey"], marker["RowKey"].partition("|")
        if marker.get("pruned"):
            log.warning("rollup: records arrived for %s/%s after it was pruned", event, day)
            continue
        started = time.time()  # records written from now on make the bucket dirty again
        await _roll_up_bucket(tables, event, day, bucket, result)
        days[(event, day)].append((marker["RowKey"], started))
        result.buckets += 1
        await asyncio.sleep(0)  # let requests in between buckets
    for (event, day), rolled in sorted(days.items()):
        await _sum_day(tables, event, day, result)
        result.days += 1
        # Only now are the buckets rolled up: a report that finds them so (another request,
        # another instance, while this one ran) reads totals that hold them. Marked before
        # the day's totals were written, they let such a report read the totals of before.
        for row_key, started in rolled:
            await tables.upsert(
                DAYS_TABLE, {"PartitionKey": event, "RowKey": row_key, "rolled_at": started}
            )
    return result


async def _roll_up_bucket(
    tables: Tables, event_id: str, day: str, bucket: str, result: RollupResult
) -> None:
    groups: dict[str, Totals] = defaultdict(Totals)
    pages = tables.pages(
        USAGE_TABLE,
        _PREFIX_RANGE,
        _prefixed(f"{event_id}_{day}", bucket),
        select=["attendee_id", "deployment", "outcome", *_TOKEN_FIELDS],  # a third of each
    )
    asked = time.monotonic()
    async for page in pages:
        await asyncio.sleep((time.monotonic() - asked) * _REST)
        for start in range(0, len(page), _SLICE):
            for record in page[start : start + _SLICE]:
                # A realtime call is one request (its setup), however many responses it had.
                calls = 0 if record.get("outcome") == "realtime_response" else 1
                groups[f"{record['attendee_id']}|{record['deployment']}"].add(record, calls)
            await asyncio.sleep(0)  # a busy bucket must not hold requests back
        result.records += len(page)
        asked = time.monotonic()
    encoded = orjson.dumps({key: t.as_list() for key, t in groups.items()}).decode()
    part: dict[str, Any] = {"PartitionKey": event_id, "RowKey": f"{day}|{bucket}", "day": day}
    for index in range(0, max(len(encoded), 1), _CHUNK):
        part[f"groups{index // _CHUNK}"] = encoded[index : index + _CHUNK]
    await tables.upsert(PARTS_TABLE, part, replace=True)


async def _sum_day(tables: Tables, event_id: str, day: str, result: RollupResult) -> None:
    parts = await tables.query(
        PARTS_TABLE,
        _PREFIX_RANGE,
        _prefixed(event_id, f"{day}|"),
    )
    totals: dict[str, Totals] = defaultdict(Totals)
    for part in parts:
        chunks = sorted((k for k in part if k.startswith("groups")), key=lambda k: int(k[6:]))
        for key, numbers in orjson.loads("".join(part[k] for k in chunks) or "{}").items():
            totals[key].add_numbers(numbers)
    rows = []
    for key, t in totals.items():
        attendee, _, deployment = key.partition("|")
        rows.append(
            {
                "PartitionKey": event_id,
                "RowKey": f"{day}|{attendee}|{deployment}",
                "day": day,
                "attendee_id": attendee,
                "deployment": deployment,
                **t.as_dict(),
            }
        )
    for start in range(0, len(rows), 100):
        await tables.upsert_batch(ROLLUPS_TABLE, rows[start : start + 100])
    result.rows += len(rows)


async def prune(tables: Tables, retention_days: int, now: datetime) -> int:
    """Delete raw records of buckets older than the retention, once they are rolled up."""
    cutoff = (now - timedelta(days=retention_days)).strftime("%Y%m%d")
    deleted = 0
    for marker in await tables.all(DAYS_TABLE):
        day, _, bucket = marker["RowKey"].partition("|")
        if not bucket or day >= cutoff or marker.get("pruned"):
            continue
        if float(marker.get("rolled_at", 0)) < float(marker.get("last_write", 0)):
            continue  # not rolled up since its last record: keep the records
        partition = f"{marker['PartitionKey']}_{day}"
        rows = await tables.query(
            USAGE_TABLE,
            _PREFIX_RANGE,
            _prefixed(partition, bucket),
        )
        for row in rows:
            await tables.delete(USAGE_TABLE, partition, row["RowKey"])
        deleted += len(rows)
        await tables.upsert(
            DAYS_TABLE,
            {"PartitionKey": marker["PartitionKey"], "RowKey": marker["RowKey"], "pruned": True},
        )
    return deleted


GROUPS = {
    "attendee": ("attendee_id",),
    "deployment": ("deployment",),
    "day": ("day",),
    "hour": ("hour",),
}
# Why calls were refused (429), as the counter rows count them: the per-minute limits, a fair
# share or the quota of a deployment, the daily caps, every deployment busy.
REFUSALS = (
    "requests_per_minute",
    "tokens_per_minute",
    "fair_share",
    "deployment_quota",
    "daily_request_cap",
    "daily_token_cap",
    "event_daily_request_cap",
    "event_daily_token_cap",
    "attendee_budget",
    "event_budget",
    "no_capacity",
)


# --- the report's shape -----------------------------------------------------------------------


def _only_some(spec: dict[str, Any]) -> None:
    spec.pop("default", None)  # absent, never null: the field belongs to some groupings only


def _some(description: str) -> Any:
    return Field(None, description=description, json_schema_extra=_only_some)


Refused = create_model(
    "Refused",
    __doc__="group_by=attendee and day: calls refused (429) by reason",
    **{
        r: (int, Field(ge=0, description=f"calls refused: {r.replace('_', ' ')}")) for r in REFUSALS
    },
)


class UsageTotals(UsageNumbers):
    """The totals of a report: its numbers, and what its grouping adds."""

    refused: Refused | None = _some("group_by=attendee and day: calls refused (429) by reason")
    active_attendees: int | None = _some("group_by=hour: attendees who made calls in the hour")
    new_attendees: int | None = _some("group_by=hour: attendees whose first call was in the hour")


class UsageRow(UsageTotals):
    """One group of a report: its key (the fields of its grouping) and its totals."""

    attendee_id: str | None = _some("group_by=attendee")
    user: str | None = _some("group_by=attendee")
    deployment: str | None = _some("group_by=deployment")
    day: str | None = _some("group_by=day: YYYY-MM-DD in the event's time zone")
    hour: str | None = Field(
        None,
        description="group_by=hour: the hour's start, UTC",
        json_schema_extra=lambda spec: (_only_some(spec), spec.update(format="date-time")),
    )


class UsageReport(BaseModel):
    """An event's usage totals, grouped (`report`)."""

    event_id: str = Field(description="the event")
    group_by: Literal["attendee", "deployment", "day", "hour"]
    rows: list[UsageRow]
    totals: UsageTotals


async def refusals(tables: Tables, event_id: str) -> dict[tuple[str, str], dict[str, int]]:
    """Refused calls by reason per (day, attendee), as the instances last wrote them."""
    rows = await tables.query(
        COUNTERS_TABLE,
        "PartitionKey ge @low and PartitionKey lt @high",
        {"low": f"{event_id}_", "high": f"{event_id}_~"},
    )
    found: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        counts = {
            reason: int(row.get(f"refused_{reason}", 0))
            for reason in REFUSALS
            if row.get(f"refused_{reason}")
        }
        if counts:
            day = row["PartitionKey"].rpartition("_")[2]
            found[(day, row["RowKey"])] = counts
    return found


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for reason, count in counts.items():
        into[reason] = into.get(reason, 0) + count


async def report(
    tables: Tables, event_id: str, group_by: str, users: dict[str, str]
) -> dict[str, Any]:
    """Totals of an event grouped by attendee, deployment, day or hour, fresh as of now.

    By attendee and by day, each row also counts the calls refused, by reason (`refused`);
    by hour, the attendees active in that hour and those active for the first time.
    """
    await roll_up(tables, event_id)
    if group_by == "hour":
        return await _by_hour(tables, event_id)
    grouped: dict[str, Totals] = defaultdict(Totals)
    overall = Totals()
    for row in await tables.partition(ROLLUPS_TABLE, event_id):
        key = row[GROUPS[group_by][0]]
        grouped[key].add(row, int(row.get("requests", 0)))
        overall.add(row, int(row.get("requests", 0)))
    refused: dict[str, dict[str, int]] = defaultdict(dict)
    refused_overall: dict[str, int] = {}
    if group_by in ("attendee", "day"):
        for (day, attendee), counts in (await refusals(tables, event_id)).items():
            key = attendee if group_by == "attendee" else day
            _add(refused[key], counts)
            _add(refused_overall, counts)
            grouped.setdefault(key, Totals())  # refused every time: still a row
    rows = []
    for key in sorted(grouped):
        if group_by == "attendee":
            head: dict[str, Any] = {"attendee_id": key, "user": users.get(key, "")}
        elif group_by == "day":
            head = {"day": f"{key[:4]}-{key[4:6]}-{key[6:]}"}
        else:
            head = {"deployment": key}
        row = {**head, **grouped[key].as_dict()}
        if group_by in ("attendee", "day"):
            row["refused"] = {reason: refused[key].get(reason, 0) for reason in REFUSALS}
        rows.append(row)
    totals: dict[str, Any] = overall.as_dict()
    if group_by in ("attendee", "day"):
        totals["refused"] = {reason: refused_overall.get(reason, 0) for reason in REFUSALS}
    return {"event_id": event_id, "group_by": group_by, "rows": rows, "totals": totals}


async def _by_hour(tables: Tables, event_id: str) -> dict[str, Any]:
    """Per UTC hour: totals, the attendees active in it, and those active for the first time."""
    hours: dict[str, Totals] = defaultdict(Totals)
    active: dict[str, set[str]] = defaultdict(set)
    overall = Totals()
    for part in await tables.partition(PARTS_TABLE, event_id):
        bucket = part["RowKey"].partition("|")[2]  # YYYYMMDDTHHM, UTC
        chunks = sorted((k for k in part if k.startswith("groups")), key=lambda k: int(k[6:]))
        hour = bucket[:11]
        for key, numbers in orjson.loads("".join(part[k] for k in chunks) or "{}").items():
            hours[hour].add_numbers(numbers)
            overall.add_numbers(numbers)
            active[hour].add(key.partition("|")[0])
    seen: set[str] = set()
    rows = []
    for hour in sorted(hours):
        new = active[hour] - seen
        seen |= active[hour]
        rows.append(
            {
                "hour": f"{hour[:4]}-{hour[4:6]}-{hour[6:8]}T{hour[9:11]}:00:00Z",
                **hours[hour].as_dict(),
                "active_attendees": len(active[hour]),
                "new_attendees": len(new),
            }
        )
    totals = {**overall.as_dict(), "active_attendees": len(seen), "new_attendees": len(seen)}
    return {"event_id": event_id, "group_by": "hour", "rows": rows, "totals": totals}


# What makes a spreadsheet read a cell as a formula (OWASP "CSV injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, quoted with a leading "'";
    numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def to_csv(report_data: dict[str, Any]) -> str:
    """The report as CSV; text that organisers do not control (attendees' names) cannot act as
    a formula in a spreadsheet."""
    group_by = report_data["group_by"]
    heads = ["attendee_id", "user"] if group_by == "attendee" else [group_by]
    extra: list[str] = []
    if group_by in ("attendee", "day"):
        extra = [f"refused_{reason}" for reason in REFUSALS]
    elif group_by == "hour":
        extra = ["active_attendees", "new_attendees"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*heads, *NUMBERS, "cost", *extra])
    for row in report_data["rows"]:
        values = [row[n] for n in (*heads, *NUMBERS, "cost")]
        if group_by == "hour":
            values += [row["active_attendees"], row["new_attendees"]]
        elif extra:
            values += [row["refused"][reason] for reason in REFUSALS]
        writer.writerow([_cell(value) for value in values])
    return out.getvalue()


async def attendee_totals(tables: Tables, event_id: str) -> dict[str, dict[str, int]]:
    """All-time totals per attendee of an event."""
    await roll_up(tables, event_id)
    totals: dict[str, Totals] = defaultdict(Totals)
    for row in await tables.partition(ROLLUPS_TABLE, event_id):
        totals[row["attendee_id"]].add(row, int(row.get("requests", 0)))
    return {attendee: t.as_dict() for attendee, t in totals.items()}
