"""Daily totals per event x attendee x deployment, rolled up from the usage records.

The usage writer marks each (event, day) it writes to in `usagedays` with `last_write`. A
rollup recomputes every day written to since its last rollup from that day's records and
replaces its totals, so running it twice gives the same totals and late records are picked up.
Retention deletes a day's raw records only once the day was rolled up after its last write.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared.tables import Tables
from shared.usage import DAYS_TABLE, USAGE_TABLE

log = logging.getLogger(__name__)

ROLLUPS_TABLE = "rollups"
NUMBERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "units")


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    units: int = 0

    def add(self, row: dict[str, Any], requests: int = 1) -> None:
        self.requests += requests
        self.prompt_tokens += int(row.get("prompt_tokens", 0))
        self.completion_tokens += int(row.get("completion_tokens", 0))
        self.total_tokens += int(row.get("total_tokens", 0))
        self.units += int(row.get("units", 0))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in NUMBERS}


@dataclass
class RollupResult:
    days: int = 0
    records: int = 0
    rows: int = 0
    errors: list[str] = field(default_factory=list)


async def roll_up(tables: Tables, event_id: str | None = None) -> RollupResult:
    """Recompute the totals of every day written to since it was last rolled up."""
    result = RollupResult()
    if event_id is None:
        days = await tables.all(DAYS_TABLE)
    else:
        days = await tables.partition(DAYS_TABLE, event_id)
    for day in days:
        if float(day.get("rolled_at", 0)) >= float(day.get("last_write", 0)):
            continue
        started = time.time()  # records written from now on make the day dirty again
        await _roll_up_day(tables, day["PartitionKey"], day["RowKey"], result)
        await tables.upsert(
            DAYS_TABLE,
            {"PartitionKey": day["PartitionKey"], "RowKey": day["RowKey"], "rolled_at": started},
        )
        result.days += 1
    return result


async def _roll_up_day(tables: Tables, event_id: str, day: str, result: RollupResult) -> None:
    totals: dict[tuple[str, str], Totals] = defaultdict(Totals)
    async for record in tables.iter_query(
        USAGE_TABLE, "PartitionKey eq @pk", {"pk": f"{event_id}_{day}"}
    ):
        totals[(record["attendee_id"], record["deployment"])].add(record)
        result.records += 1
    rows = [
        {
            "PartitionKey": event_id,
            "RowKey": f"{day}|{attendee}|{deployment}",
            "day": day,
            "attendee_id": attendee,
            "deployment": deployment,
            **t.as_dict(),
        }
        for (attendee, deployment), t in totals.items()
    ]
    for start in range(0, len(rows), 100):
        await tables.upsert_batch(ROLLUPS_TABLE, rows[start : start + 100])
    result.rows += len(rows)


async def prune(tables: Tables, retention_days: int, now: datetime) -> int:
    """Delete raw records of days older than the retention, once they are rolled up."""
    cutoff = (now - timedelta(days=retention_days)).strftime("%Y%m%d")
    deleted = 0
    for day in await tables.all(DAYS_TABLE):
        if day["RowKey"] >= cutoff or day.get("pruned"):
            continue
        if float(day.get("rolled_at", 0)) < float(day.get("last_write", 0)):
            continue  # not rolled up since its last record: keep the records
        partition = f"{day['PartitionKey']}_{day['RowKey']}"
        rows = await tables.partition(USAGE_TABLE, partition)
        for row in rows:
            await tables.delete(USAGE_TABLE, partition, row["RowKey"])
        deleted += len(rows)
        await tables.upsert(
            DAYS_TABLE,
            {"PartitionKey": day["PartitionKey"], "RowKey": day["RowKey"], "pruned": True},
        )
    return deleted


GROUPS = {
    "attendee": ("attendee_id",),
    "deployment": ("deployment",),
    "day": ("day",),
}


async def report(
    tables: Tables, event_id: str, group_by: str, users: dict[str, str]
) -> dict[str, Any]:
    """Totals of an event grouped by attendee, deployment or day, fresh as of now."""
    await roll_up(tables, event_id)
    grouped: dict[str, Totals] = defaultdict(Totals)
    overall = Totals()
    for row in await tables.partition(ROLLUPS_TABLE, event_id):
        key = row[GROUPS[group_by][0]]
        grouped[key].add(row, int(row.get("requests", 0)))
        overall.add(row, int(row.get("requests", 0)))
    rows = []
    for key in sorted(grouped):
        if group_by == "attendee":
            head: dict[str, Any] = {"attendee_id": key, "user": users.get(key, "")}
        elif group_by == "day":
            head = {"day": f"{key[:4]}-{key[4:6]}-{key[6:]}"}
        else:
            head = {"deployment": key}
        rows.append({**head, **grouped[key].as_dict()})
    return {"event_id": event_id, "group_by": group_by, "rows": rows, "totals": overall.as_dict()}


def to_csv(report_data: dict[str, Any]) -> str:
    group_by = report_data["group_by"]
    heads = ["attendee_id", "user"] if group_by == "attendee" else [group_by]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*heads, *NUMBERS])
    for row in report_data["rows"]:
        writer.writerow([row[h] for h in heads] + [row[n] for n in NUMBERS])
    return out.getvalue()


async def attendee_totals(tables: Tables, event_id: str) -> dict[str, dict[str, int]]:
    """All-time totals per attendee of an event."""
    await roll_up(tables, event_id)
    totals: dict[str, Totals] = defaultdict(Totals)
    for row in await tables.partition(ROLLUPS_TABLE, event_id):
        totals[row["attendee_id"]].add(row, int(row.get("requests", 0)))
    return {attendee: t.as_dict() for attendee, t in totals.items()}
