"""CPU per call of work done in this process, for the micro benchmarks (`bench.limits`,
`bench.plugins`, `bench.budgets`): the best of three rounds, and their one-table report."""

from __future__ import annotations

import platform
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def per_call(run: Callable[[int], Any], calls: int) -> float:
    """Microseconds of CPU per call, the best of three rounds."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        run(calls)
        best = min(best, time.process_time() - started)
    return best / calls * 1e6


async def per_call_async(run: Callable[[int], Awaitable[None]], calls: int) -> float:
    """The same, for work that awaits."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        await run(calls)
        best = min(best, time.process_time() - started)
    return best / calls * 1e6


def report(
    path: Path,
    title: str,
    calls: int,
    results: list[tuple[str, float]],
    *,
    machine: str = "",
    after: str = "",
    digits: int = 1,
) -> None:
    """Print the results as a table under `title` and write them to `path`; `machine` adds to
    the line that says where they were measured, `after` follows it."""
    lines = [
        f"# {title}",
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, Python {platform.python_version()}, "
        f"{platform.machine()}{machine}, {calls:,} calls per case, best of three.{after}",
        "",
        "| case | µs per call |",
        "|---|---:|",
        *(f"| {name} | {cost:.{digits}f} |" for name, cost in results),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
