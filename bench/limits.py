"""The cost per call of the per-minute checks (shared/governance/ratelimits.py, shared/governance/fairshare.py).

A micro-benchmark in one process, no storage and no HTTP: what `RateLimits.admit` and the
settling of the call add to each proxied request, in the cases an event meets. Part of
`make bench`; writes bench/results/limits.md.

Run: python -m bench.limits [calls]
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.cpu import per_call, report
from shared.directory.catalog import Resource
from shared.directory.events import Event
from shared.errors import ProxyError
from shared.governance.caps import Caps, Counter
from shared.governance.fairshare import FairShare
from shared.governance.ratelimits import RateLimits

RESULTS = Path(__file__).resolve().parent / "results" / "limits.md"
BIG = 10**9  # limits never reached: the checks run, nothing is refused


def event(**limits: int) -> Event:
    start = datetime.now(UTC).replace(tzinfo=None)
    return Event(id="bench", name="Bench", starts_at=start, ends_at=start + timedelta(days=1),
                 time_zone="UTC", max_token_cap=512, daily_request_cap=BIG, **limits)  # fmt: skip


def resource(**quota: int) -> Resource:
    return Resource(id="r1", name="r1", deployment="chat", model_class="openai-chat",
                    endpoint="https://example.com", upstream_deployment="chat", **quota)  # fmt: skip


def measure(calls: int) -> list[tuple[str, float]]:
    caps = Caps(tables=None)  # type: ignore[arg-type]  # admit is never called: no storage
    counter = Counter("bench_20260101", "a1", allowance=BIG)

    def admitting(limits: RateLimits, ev: Event, members: list[Resource], who: int = 1):
        def run(n: int) -> None:
            for i in range(n):
                attendee = f"a{i % who}"
                admission = limits.admit(ev, attendee, counter, "chat", members, 600)
                if admission is not None:
                    admission.settle(20)

        return run

    def refusing(limits: RateLimits, ev: Event, members: list[Resource]):
        def run(n: int) -> None:
            for _ in range(n):
                try:
                    limits.admit(ev, "a1", counter, "chat", members, 600)
                except ProxyError:
                    counter.allowance += 0  # the refusal hands its request back: nothing to do

        return run

    results = []
    plain = RateLimits(caps, FairShare())
    results.append(("no per-minute limits, no quota", per_call(
        admitting(plain, event(), [resource()]), calls)))  # fmt: skip
    limited = RateLimits(caps, FairShare())
    results.append(("requests and tokens per minute, under them", per_call(
        admitting(limited, event(requests_per_minute=BIG, tokens_per_minute=BIG),
                  [resource()]), calls)))  # fmt: skip
    quota = RateLimits(caps, FairShare())
    results.append(("a pool with a quota, far from it", per_call(
        admitting(quota, event(), [resource(quota_requests_per_minute=BIG)]), calls)))  # fmt: skip
    near = RateLimits(caps, FairShare())
    members = [resource(quota_requests_per_minute=3 * calls, quota_tokens_per_minute=BIG)]
    admitting(near, event(), members, who=200)(2 * calls)  # 200 attendees, two thirds used
    results.append(("a pool past half its quota, 200 attendees active", per_call(
        admitting(near, event(), members, who=200), calls // 10)))  # fmt: skip
    over = RateLimits(caps, FairShare())
    admitting(over, event(requests_per_minute=5), [resource()])(5)
    results.append(("refused: over requests_per_minute", per_call(
        refusing(over, event(requests_per_minute=5), [resource()]), calls)))  # fmt: skip
    return results


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    report(RESULTS, "Per-minute checks: CPU per call", calls, asyncio.run(_measure(calls)))


async def _measure(calls: int) -> list[tuple[str, float]]:
    return measure(calls)  # inside a loop, as on the request path


if __name__ == "__main__":
    main()
