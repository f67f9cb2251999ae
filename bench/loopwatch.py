"""Bench only: what holds a worker's event loop, and how long a call waits where.

Preloaded into a worker (AIPROXY_WORKER_PRELOAD=bench.loopwatch,...), it starts, on the
worker's loop:
- a lag probe: a task that asks to wake every PROBE_MS ms and records how late it woke (a
  callback that holds the loop shows as lag);
- slow-callback reporting: each callback (uvloop's or asyncio's handles) that ran longer than
  SLOW_MS ms, counted by what it ran;
- the garbage collector's passes, timed by generation;
- per-stage waits of the app's calls: how long the first byte waited for the call's journal
  entry (`Entry.landed`), an upstream request took to its headers (`UpstreamClient.send`), the
  admission's storage reads took.

Every second it writes what it saw to BENCH_LOOPWATCH_OUT (JSON): bench/concurrency.py reads it
after each level. Nothing here runs in the app unless a bench preloads it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

PROBE_MS = 2.0
SLOW_MS = 5.0
OUT = os.environ.get("BENCH_LOOPWATCH_OUT", "")

lags: list[float] = []
slow: Counter[str] = Counter()
slow_ms: Counter[str] = Counter()
stages: dict[str, list[float]] = {}
collections: dict[int, list[float]] = {}  # the garbage collector's passes, ms, by generation


def reset() -> None:
    lags.clear()
    slow.clear()
    slow_ms.clear()
    stages.clear()
    collections.clear()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))], 2)


def summary() -> dict[str, Any]:
    def dist(values: list[float]) -> dict[str, Any]:
        return {
            "n": len(values),
            "p50": _percentile(values, 50),
            "p99": _percentile(values, 99),
            "max": round(max(values), 2) if values else None,
        }

    return {
        "lag_ms": dist(lags),
        "lags_over_10ms": sum(1 for v in lags if v > 10),
        "slow_callbacks": [
            {"callback": k, "count": n, "ms": round(slow_ms[k], 1)} for k, n in slow.most_common(15)
        ],
        "stages_ms": {name: dist(values) for name, values in sorted(stages.items())},
        "gc_ms": {
            f"generation {generation}": {**dist(values), "total": round(sum(values), 1)}
            for generation, values in sorted(collections.items())
        },
    }


def _watch_collections() -> None:
    """Time each pass of the garbage collector (it holds the loop while it runs)."""
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent = (time.perf_counter() - started[0]) * 1000
            collections.setdefault(info["generation"], []).append(spent)

    gc.callbacks.append(callback)


def _timed(name: str, wrapped: Callable[..., Any]) -> Callable[..., Any]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await wrapped(*args, **kwargs)
        finally:
            stages.setdefault(name, []).append((time.perf_counter() - started) * 1000)

    return timed


def _instrument() -> None:
    from shared.governance import caps, journal
    from shared.pipeline import call, ledger
    from shared.upstreams import client

    for owner, name, label in (
        (journal.Entry, "landed", "5 first byte waits for the journal entry"),
        (journal.CallJournal, "_insert", "6 journal write (storage round trip)"),
        (client.UpstreamClient, "send", "4b upstream request to its headers"),
        (call.ProxyCall, "arrive", "1 arrive (key, event)"),
        (call.ProxyCall, "parse", "2 parse (body, pools)"),
        (ledger.Ledger, "admit", "3 admit (caps, rate limits, journal)"),
        (caps.Caps, "admit", "3a caps' admission"),
        (caps.Caps, "_reserve", "3b a block of requests reserved (storage)"),
        (call.ProxyCall, "dispatch", "4 dispatch (balancer + upstream headers)"),
        (call.ProxyCall, "run", "0 run (arrival to answer's headers)"),
    ):
        setattr(owner, name, _timed(label, getattr(owner, name)))


def _watch_handles(loop: asyncio.AbstractEventLoop) -> None:
    """Report callbacks longer than SLOW_MS (asyncio's debug check, without debug's cost)."""
    original = asyncio.events.Handle._run

    def _run(self: asyncio.Handle) -> None:
        started = time.perf_counter()
        original(self)
        spent = (time.perf_counter() - started) * 1000
        if spent > SLOW_MS:
            callback = getattr(self, "_callback", None)
            what = getattr(callback, "__qualname__", None) or repr(callback)[:80]
            task = getattr(callback, "__self__", None)
            if isinstance(task, asyncio.Task):
                coro = task.get_coro()
                what = getattr(coro, "__qualname__", repr(coro)[:80])
            slow[what] += 1
            slow_ms[what] += spent

    asyncio.events.Handle._run = _run  # type: ignore[method-assign]


async def _probe() -> None:
    step = PROBE_MS / 1000
    last_write = time.monotonic()
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(step)
        lags.append(max(0.0, (time.perf_counter() - asked - step) * 1000))
        if len(lags) > 200_000:
            del lags[:100_000]
        if OUT and time.monotonic() - last_write > 1.0:
            last_write = time.monotonic()
            with open(OUT + ".tmp", "w") as f:
                json.dump(summary(), f)
            os.replace(OUT + ".tmp", OUT)
            if os.path.exists(OUT + ".reset"):
                os.unlink(OUT + ".reset")
                reset()


_instrument()
_watch_collections()
try:
    _loop = asyncio.get_running_loop()
except RuntimeError:
    _loop = None
if _loop is not None:
    _watch_handles(_loop)
    _task = _loop.create_task(_probe())
