"""The cost per call of pricing and of the budget check (shared/governance/prices.py,
shared/governance/budgets.py), beside the per-minute checks' (bench/limits.py).

A micro-benchmark in one process, no storage and no HTTP: what a call's cost at settle time,
its worst case at admission and `Budgets.admit` + `settle` add to each proxied request.
Part of `make bench`; writes bench/results/budgets.md.

Run: python -m bench.budgets [calls]
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.cpu import per_call, per_call_async, report
from shared.directory.events import Event
from shared.governance import prices
from shared.governance.budgets import Budgets

RESULTS = Path(__file__).resolve().parent / "results" / "budgets.md"
BIG = 10**18  # billionths held by the instance: no reservation from storage is needed


def event(**budgets: str) -> Event:
    start = datetime.now(UTC).replace(tzinfo=None)
    return Event(id="bench", name="Bench", starts_at=start, ends_at=start + timedelta(days=1),
                 time_zone="UTC", max_token_cap=512, daily_request_cap=10**9, **budgets)  # fmt: skip


async def measure(calls: int) -> list[tuple[str, float]]:
    results = []

    def pricing(run_calls: int) -> None:
        for i in range(run_calls):
            price = prices.price_of("gpt-4o-mini-2024-07-18")
            prices.cost_of(price, "openai-chat", prompt=1500 + i % 7, cached=1024, completion=200)

    results.append(("cost of a chat call (cached prompt, priced model)", per_call(pricing, calls)))

    def overridden(run_calls: int) -> None:
        for i in range(run_calls):
            price = prices.price_of("gpt-4o-mini-2024-07-18", "input=0.2,output=0.8")
            prices.cost_of(price, "openai-chat", prompt=900 + i % 7, completion=200)

    results.append(("cost with a resource's own prices", per_call(overridden, calls)))

    def unknown(run_calls: int) -> None:
        for i in range(run_calls):
            prices.cost_of(prices.price_of("brand-new-model"), "openai-chat", prompt=10 + i % 7)

    results.append(("an unpriced model", per_call(unknown, calls)))

    budgets = Budgets(tables=None)  # type: ignore[arg-type]  # allowances are held: no storage
    daily = event(attendee_daily_budget="1000000", attendee_budget="1000000", budget="1000000")
    now = datetime.now(UTC)
    for pot in budgets.pots(daily, "a1", now):
        pot.allowance = BIG

    async def checking(run_calls: int) -> None:
        for i in range(run_calls):
            hold = await budgets.admit(daily, "a1", now, 250_000)
            budgets.settle(hold, 120_000 + i % 7)

    results.append((
        "budget check: admit + settle, three budgets (event, attendee, daily)",
        await per_call_async(checking, calls),
    ))  # fmt: skip
    none = event()

    async def no_budget(run_calls: int) -> None:
        for _ in range(run_calls):
            budgets.settle(await budgets.admit(none, "a1", now, 250_000), 0)

    results.append(("budget check, event without budgets", await per_call_async(no_budget, calls)))
    if budgets._task is not None:
        budgets._task.cancel()
    return results


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    report(RESULTS, "Pricing and budgets: CPU per call", calls, asyncio.run(measure(calls)))


if __name__ == "__main__":
    main()
