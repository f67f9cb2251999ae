"""Budgets in money: an attendee's (per day and in all) and the event's, admitted against each
call's worst case and settled at its cost; never overspent while storage answers, on one
instance or two; refused with codes of their own; what is left in a header of each answer."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.harness import (
    CHAT,
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    burst,
    chat,
    wait_until,
)

SMALL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
MINI = (150, 600)  # gpt-4o-mini, billionths of a dollar per input and per output token


def cost_of_small(host: AppHost, sim: Simulator) -> int:
    """One SMALL call's cost, by hand from the usage the simulator reports."""
    probe = EventSetup(host, sim)
    usage = chat(host, probe.key, SMALL).json()["usage"]
    return usage["prompt_tokens"] * MINI[0] + usage["completion_tokens"] * MINI[1]


def amount(nano: int) -> str:
    return str(Decimal(nano) / 10**9)


def spent(storage: Storage, event_id: str, admitted: int) -> int:
    records = storage.usage(event_id, expect=admitted, timeout=20)
    assert len(records) == admitted
    return sum(int(r["cost_nano"]) for r in records)


def check_bound(
    answers: list[httpx.Response], budget: int, one: int, storage: Storage, event_id: str
) -> int:
    admitted = sum(a.status_code == 200 for a in answers)
    refused = [a for a in answers if a.status_code != 200]
    assert {a.status_code for a in refused} <= {429}
    assert {a.json()["error"]["code"] for a in refused} == {"attendee_budget_exhausted"}
    # The bound: the calls admitted never cost more than the budget.
    total = spent(storage, event_id, admitted)
    assert total == admitted * one <= budget
    assert 1 <= admitted <= 10
    return admitted


async def test_fifty_calls_at_once_never_spend_more_than_the_budget(
    host: AppHost, sim: Simulator, storage: Storage
) -> None:
    one = cost_of_small(host, sim)
    budget = 10 * one
    setup = EventSetup(host, sim, attendee_daily_budget=amount(budget))
    assert setup.event["attendee_daily_budget"] == amount(budget)
    answers = await burst(CHAT, SMALL, [host], setup.key, 50)
    admitted = check_bound(answers, budget, one, storage, setup.id)

    def refused_for_budget() -> int:
        report = host.manage.get(f"/events/{setup.id}/usage", params={"group_by": "attendee"})
        return report.json()["totals"]["refused"]["attendee_budget"]

    # Refusals are counted for the reports, under a reason of their own.
    wait_until(lambda: refused_for_budget() == 50 - admitted, timeout=15)
    refused = next(a for a in answers if a.status_code == 429)
    message = refused.json()["error"]["message"]
    assert "today's budget" in message and "midnight UTC" in message
    assert int(refused.headers["retry-after"]) > 0


@pytest.mark.e2e
async def test_the_budget_holds_across_two_instances(
    host: AppHost, second_host: AppHost, sim: Simulator, storage: Storage
) -> None:
    one = cost_of_small(host, sim)
    budget = 10 * one
    setup = EventSetup(host, sim, attendee_budget=amount(budget))
    answers = await burst(CHAT, SMALL, [host, second_host], setup.key, 50)
    check_bound(answers, budget, one, storage, setup.id)
    rows: list[dict[str, Any]] = storage.rows("budgets", f"PartitionKey eq '{setup.id}'")
    assert [int(r["granted"]) <= budget for r in rows] == [True]  # stored as text: 64 bits


def test_answers_carry_what_is_left_and_the_event_budget_has_its_own_code(
    host: AppHost, sim: Simulator, storage: Storage
) -> None:
    one = cost_of_small(host, sim)
    # Room for 3 calls at their cost, but not for a 4th at its worst case.
    setup = EventSetup(host, sim, attendee_budget="1", budget=amount(4 * one))
    lefts = []
    for _ in range(3):
        answer = chat(host, setup.key, SMALL)
        assert answer.status_code == 200, answer.text
        lefts.append(Decimal(answer.headers["x-aiproxy-budget-remaining"]))
    # What is left is known once earlier calls settled: never more than the budget, falling.
    assert lefts[0] <= 1 and lefts == sorted(lefts, reverse=True) and lefts[-1] < 1
    other = setup.add_attendee("other@example.com")["api_key"]
    refused = chat(host, other, SMALL)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "event_budget_exhausted"
    assert "for all attendees together" in error["message"]
    assert spent(storage, setup.id, 3) == 3 * one
    # The playground's view: the key's budgets and what is left, read fresh from storage.
    info = host.http.get("/eventinfo", headers={"api-key": setup.key}).json()["budget"]
    assert info == {
        "currency": "USD", "attendee_budget": "1", "attendee_daily_budget": "",
        "left": str(1 - Decimal(3 * one) / 10**9),
    }  # fmt: skip
    # No budget on the event: no header.
    plain = EventSetup(host, sim)
    assert "x-aiproxy-budget-remaining" not in chat(host, plain.key, SMALL).headers


def test_budgets_that_are_not_amounts_are_refused(host: AppHost, sim: Simulator) -> None:
    setup = EventSetup(host, sim)
    for field, bad in (
        ("budget", "lots"), ("attendee_budget", "-1"), ("attendee_daily_budget", "0.0000000001"),
        ("currency", "usd"), ("budget", 5),
    ):  # fmt: skip
        answer = host.manage.patch(f"/events/{setup.id}", json={field: bad})
        assert answer.status_code == 400, (field, bad, answer.text)
        assert answer.json()["error"]["details"][0]["field"] == field
    ok = host.manage.patch(f"/events/{setup.id}", json={"budget": "250.50", "currency": "EUR"})
    assert ok.status_code == 200 and ok.json()["budget"] == "250.5"
