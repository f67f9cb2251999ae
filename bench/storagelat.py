"""How fast Azurite answers the journal's inserts on its own core: the storage round trip a
streamed call's first byte waits for (shared/governance/journal.py), without the harness.

Azurite runs pinned to the load core (CPU 1, as in bench/concurrency.py) and this process on
the proxy's (CPU 0). One insert of a journal-sized entity (the app's own lean insert), 60 a
second as at 64 concurrent streams, for SECONDS: alone, then while a batch of 60 usage-sized
records is upserted every second (the usage writer's flush at that rate). Its p50/p99 set
beside the journal write's p99 in bench/results/concurrency-64-stages.md tell the harness's
share (the core Azurite shares there with the simulator, the client and the host stand-in)
from Azurite's own.

Run: python -m bench.storagelat. STORAGELAT_SECONDS per case (15). Writes
bench/results/storagelat.md.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from local.azurite import Azurite, free_port
from shared.platform.settings import load
from shared.platform.tables import Tables

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKER_CPU, LOAD_CPU = 0, 1
SECONDS = float(os.environ.get("STORAGELAT_SECONDS", "15"))
RATE = 60  # inserts a second: 64 streams of about a second each
BATCH = 60  # usage records a second at that rate, written as one batch
ENTRY = {"record": "x" * 600, "expires": 1.0, "admitted": 1.0, "whole": False}
RECORD = {f"field{i}": "v" * 10 for i in range(30)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def inserts(tables: Tables, seconds: float) -> list[float]:
    """One insert every 1/RATE s (bounded by `seconds`), each one's round trip in ms."""
    taken: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        entity = {"PartitionKey": "journal", "RowKey": uuid.uuid4().hex, **ENTRY}
        await tables.insert_lean("inflight", entity)
        taken.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(1 / RATE)
    return taken


async def batches(tables: Tables, seconds: float) -> list[float]:
    """A batch of BATCH records every second (bounded by `seconds`), each one's time in ms."""
    taken: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rows = [
            {"PartitionKey": "usage", "RowKey": uuid.uuid4().hex, **RECORD} for _ in range(BATCH)
        ]
        started = time.perf_counter()
        await tables.upsert_batch("usage", rows)
        taken.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(1.0)
    return taken


async def measure(connection_string: str) -> list[dict[str, object]]:
    settings = load(
        {"AIPROXY_STORAGE_CONNECTION_STRING": connection_string, "AIPROXY_TABLE_PREFIX": "lat"}
    )
    tables = Tables(settings)
    rows = []
    try:
        await inserts(tables, 1.0)  # tables made, connections open
        for case, with_batches in (("inserts alone", False), ("with a batch a second", True)):
            work = [inserts(tables, SECONDS)] + ([batches(tables, SECONDS)] if with_batches else [])
            taken, *batch = await asyncio.gather(*work)
            rows.append(
                {
                    "case": case,
                    "inserts": len(taken),
                    "p50": round(statistics.median(taken), 1),
                    "p99": round(percentile(taken, 99), 1),
                    "max": round(max(taken), 1),
                    "batch_p50": round(statistics.median(batch[0]), 1) if batch else None,
                }
            )
    finally:
        await tables.close()
    return rows


def main() -> int:
    azurite = Azurite(free_port()).start()
    try:
        assert azurite.process is not None
        if len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(azurite.process.pid, {LOAD_CPU})
            os.sched_setaffinity(0, {WORKER_CPU})
        rows = asyncio.run(measure(azurite.connection_string))
    finally:
        azurite.stop()
    lines = [
        "# Azurite's answer to the journal's inserts, on its own core",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs. Azurite (in memory) "
        f"pinned to CPU {LOAD_CPU} with nothing else on it; the inserts from CPU {WORKER_CPU}, "
        f"{RATE} a second for {SECONDS:g} s, each a journal-sized entity through the app's lean "
        f"insert; then the same while a batch of {BATCH} usage-sized records is upserted every "
        "second. `python -m bench.storagelat`.",
        "",
        "| case | inserts | p50 ms | p99 ms | max ms | batch p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['case']} | {r['inserts']} | {r['p50']} | {r['p99']} | {r['max']} | "
            f"{r['batch_p50'] if r['batch_p50'] is not None else '—'} |"
            for r in rows
        ),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "storagelat.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
