"""Event windows are wall-clock times in the event's zone, DST included."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from shared.directory.events import new_event
from shared.errors import ProxyError

BASE = {"name": "E", "max_token_cap": 100, "daily_request_cap": 10}


def event(starts: str, ends: str, zone: str):
    return new_event(
        {**BASE, "starts_at": starts, "ends_at": ends, "time_zone": zone},
        owner="",
        now=datetime.now(UTC),
    )


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_window_converts_through_a_spring_dst_change() -> None:
    e = event("2026-03-29T01:00:00", "2026-03-29T05:00:00", "Europe/Berlin")
    start, end = e.window_utc()
    assert start == at("2026-03-29T00:00:00")  # CET
    assert end == at("2026-03-29T03:00:00")  # CEST: only 3 real hours


def test_open_closed_and_inactive() -> None:
    e = event("2026-05-04T09:00:00", "2026-05-04T17:00:00", "America/New_York")
    with pytest.raises(ProxyError) as early:
        e.check_open(at("2026-05-04T12:59:59"))
    assert early.value.code == "event_not_started"
    assert "2026-05-04T13:00:00Z" in early.value.message
    e.check_open(at("2026-05-04T13:00:00"))
    with pytest.raises(ProxyError) as late:
        e.check_open(at("2026-05-04T21:00:00"))
    assert late.value.code == "event_ended"
    e.active = False
    with pytest.raises(ProxyError) as off:
        e.check_open(at("2026-05-04T14:00:00"))
    assert off.value.code == "event_inactive"


def test_offset_times_are_converted_into_the_zone() -> None:
    e = event("2026-07-01T08:00:00+00:00", "2026-07-01T16:00:00Z", "Europe/Berlin")
    assert e.starts_at.isoformat() == "2026-07-01T10:00:00"


def test_local_date_and_midnight_follow_the_zone_across_dst() -> None:
    e = event("2026-10-24T00:00:00", "2026-10-27T00:00:00", "Europe/Berlin")
    # 22:30 UTC on the 24th is already the 25th in Berlin (CEST, +02:00).
    assert e.local_date(at("2026-10-24T22:30:00")) == "20261025"
    # The night of the 25th has 25 hours: midnight in Berlin is 23:00 UTC (CET, +01:00).
    assert e.seconds_to_local_midnight(at("2026-10-25T22:00:00")) == 3600


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/Santiago", "Pacific/Apia", "UTC"])
def test_the_remembered_local_date_changes_exactly_at_local_midnight(zone: str) -> None:
    """One event asked again and again, minute by minute across DST changes and backwards,
    answers as a fresh computation would."""
    e = event("2026-01-01T00:00:00", "2027-01-01T00:00:00", zone)
    starts = [at("2026-03-28T20:00:00"), at("2026-04-04T20:00:00"), at("2026-09-05T20:00:00"),
              at("2026-10-24T20:00:00"), at("2026-12-31T20:00:00")]  # fmt: skip
    for start in starts:
        for step in [*range(0, 60 * 30, 7), *range(60 * 30, 0, -11)]:  # minutes on, then back
            now = start + timedelta(minutes=step)
            assert e.local_date(now) == now.astimezone(ZoneInfo(zone)).strftime("%Y%m%d"), now
