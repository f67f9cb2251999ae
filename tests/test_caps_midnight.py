"""Caps reset at the event's local midnight, DST included (the clock is moved, not waited for)."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import httpx
import pytest

from tests.harness import (
    HELLO,
    OPERATOR,
    SIM_KEY,
    App,
    Simulator,
    StandIns,
    unique_prefix,
)
from tests.inprocess import Configured

CHAT = "/openai/deployments/gpt/chat/completions?api-version=2024-10-21"


@pytest.fixture(scope="module")
def app(configured: Configured) -> tuple[App, StandIns]:
    """The app with a clock the tests move."""
    return configured.with_standins("midnight", prefix=unique_prefix("mid"))


@pytest.fixture
async def client(app: tuple[App, StandIns]) -> AsyncIterator[httpx.AsyncClient]:
    host, control = app
    async with httpx.AsyncClient(base_url=host.base, timeout=30) as http:
        yield http
    control.reset()


@pytest.fixture
def travel_to(app: tuple[App, StandIns]) -> Callable[[str], None]:
    """Moves the worker's clock to a UTC time."""
    return app[1].travel_to


async def berlin_event(client: httpx.AsyncClient, sim: Simulator, cap: int, **more: str) -> str:
    manage = OPERATOR
    event = await client.post(
        "/manage/events",
        headers=manage,
        json={"name": "Autumn school", "starts_at": "2026-10-20T00:00:00",
              "ends_at": "2026-10-30T00:00:00", "time_zone": "Europe/Berlin",
              "max_token_cap": 100, "daily_request_cap": cap, **more},
    )  # fmt: skip
    resource = await client.post(
        "/manage/resources",
        headers=manage,
        json={"name": "gpt", "deployment": "gpt", "model_class": "openai-chat",
              "endpoint": sim.url, "api_key": SIM_KEY},
    )  # fmt: skip
    event_id = event.json()["id"]
    await client.put(f"/manage/events/{event_id}/resources/{resource.json()['id']}", headers=manage)
    attendee = await client.post(
        f"/manage/events/{event_id}/attendees", headers=manage, json={"user": "night owl"}
    )
    return attendee.json()["api_key"]


async def test_cap_resets_at_local_midnight_on_the_25_hour_day(
    client: httpx.AsyncClient, sim: Simulator, travel_to: Callable[[str], None]
) -> None:
    # 2026-10-25 in Berlin has 25 hours: CEST (+02:00) until 03:00, then CET (+01:00).
    # The worker's clock runs on from where it was moved to: the seconds this machine takes
    # in between are taken off the wait it answers.
    started = time.monotonic()
    travel_to("2026-10-24T22:10:00")  # 00:10 on the 25th in Berlin
    key = await berlin_event(client, sim, cap=2)
    for _ in range(2):
        assert (await client.post(CHAT, json=HELLO, headers={"api-key": key})).status_code == 200
    refused = await client.post(CHAT, json=HELLO, headers={"api-key": key})
    taken = math.ceil(time.monotonic() - started)
    assert refused.status_code == 429
    # Midnight of the 26th is 23:00 UTC: 24 h 50 min away, one hour more than on a usual day.
    day = 24 * 3600 + 50 * 60
    assert day - taken <= int(refused.headers["retry-after"]) <= day, (refused.headers, taken)

    started = time.monotonic()
    travel_to("2026-10-25T22:59:40")  # 23:59:40 CET, still the 25th
    late = await client.post(CHAT, json=HELLO, headers={"api-key": key})
    taken = math.ceil(time.monotonic() - started)
    assert late.status_code == 429, late.text
    assert 20 - taken <= int(late.headers["retry-after"]) <= 20, (late.headers, taken)

    travel_to("2026-10-25T23:00:01")  # 00:00:01 on the 26th: a new day, a new cap
    for _ in range(2):
        assert (await client.post(CHAT, json=HELLO, headers={"api-key": key})).status_code == 200
    assert (await client.post(CHAT, json=HELLO, headers={"api-key": key})).status_code == 429


async def test_cap_day_follows_the_event_zone_not_utc(
    client: httpx.AsyncClient, sim: Simulator, travel_to: Callable[[str], None]
) -> None:
    travel_to("2026-10-21T21:59:00")  # 23:59 in Berlin (CEST), 21:59 in UTC
    key = await berlin_event(client, sim, cap=1)
    assert (await client.post(CHAT, json=HELLO, headers={"api-key": key})).status_code == 200
    assert (await client.post(CHAT, json=HELLO, headers={"api-key": key})).status_code == 429
    travel_to("2026-10-21T22:00:30")  # past midnight in Berlin, still the 21st in UTC
    assert (await client.post(CHAT, json=HELLO, headers={"api-key": key})).status_code == 200


async def test_a_daily_budget_resets_at_local_midnight(
    client: httpx.AsyncClient, sim: Simulator, travel_to: Callable[[str], None]
) -> None:
    travel_to("2026-10-22T21:00:00")  # 23:00 in Berlin (CEST)
    key = await berlin_event(client, sim, cap=1000, attendee_daily_budget="0.00003")
    codes = []
    for _ in range(30):  # a few calls fit, then the day's budget refuses
        answer = await client.post(CHAT, json=HELLO, headers={"api-key": key})
        codes.append(answer.status_code)
        if answer.status_code == 429:
            break
    assert 200 in codes and codes[-1] == 429, codes
    error = answer.json()["error"]
    assert error["code"] == "attendee_budget_exhausted"
    assert "today's budget of 0.00003 USD" in error["message"]
    assert "midnight Europe/Berlin" in error["message"]
    assert abs(int(answer.headers["retry-after"]) - 3600) <= 5  # midnight CEST is 22:00 UTC
    travel_to("2026-10-22T22:00:30")  # the 23rd in Berlin: a new day, a new budget
    again = await client.post(CHAT, json=HELLO, headers={"api-key": key})
    assert again.status_code == 200, again.text
    assert Decimal(again.headers["x-aiproxy-budget-remaining"]) <= Decimal("0.00003")
