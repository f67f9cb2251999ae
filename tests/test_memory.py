"""Memory freed after a burst goes back to the system: the trim itself, and when the usage
writer asks for it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from local.azurite import Azurite
from shared.governance.usage import TRIM_AFTER, UsageRecord, UsageWriter
from shared.platform import memory
from shared.platform.settings import load
from shared.platform.tables import Tables
from tests.harness import ROOT, unique_prefix

glibc = pytest.mark.skipif(memory._malloc_trim is None, reason="the C library is not glibc")

# 60,000 objects of the size of an encoded usage record; one in fifty stays, so the freed ones
# sit between used ones and the heap cannot shrink by itself.
BURST = """
import asyncio
from shared.platform import memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

kept, freed = [], []
for i in range(60_000):
    (kept if i % 50 == 0 else freed).append(bytes(700) + i.to_bytes(4, "little"))
del freed
before = rss()
assert asyncio.run(memory.trim())
print(before, rss())
"""


@glibc
def test_a_trim_hands_the_memory_of_a_burst_back() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BURST], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, after = map(float, done.stdout.split())
    assert before - after > 20, f"RSS {before:.1f} MiB before the trim, {after:.1f} after"


def record(n: int) -> UsageRecord:
    now = datetime.now(UTC)
    return UsageRecord(
        event_id="trim", attendee_id="a", deployment="d", resource_id="r",
        model_class="openai-chat", status=200, prompt_tokens=n, completion_tokens=1,
        total_tokens=n + 1, streamed=False, estimated=False, latency_ms=1.0, time=now,
        local_date=now.strftime("%Y%m%d"), request_id=f"req{n:05d}",
    )  # fmt: skip


@glibc
async def test_the_writer_hands_memory_back_once_a_backlog_is_written(azurite: Azurite) -> None:
    tables = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                          "AIPROXY_TABLE_PREFIX": unique_prefix("trim")}))  # fmt: skip
    writer = UsageWriter(tables, flush_seconds=0.1)

    async def written(count: int) -> None:
        """`count` records written, and the round that wrote them over (a trim comes last in
        it): the writer's task ends at its next round, once nothing is pending."""
        deadline = time.monotonic() + 60
        while writer.written < count or writer.pending or not writer._task.done():
            assert time.monotonic() < deadline, f"{writer.written} of {count} written"
            await asyncio.sleep(0.05)

    for n in range(200):  # an ordinary flush interval of traffic
        writer.append(record(n))
    await written(200)
    assert writer.trims == 0
    for n in range(200, 200 + TRIM_AFTER + 100):  # a backlog, as while storage was slow
        writer.append(record(n))
    await written(TRIM_AFTER + 300)
    assert writer.trims == 1
    for n in range(TRIM_AFTER + 300, TRIM_AFTER + 500):
        writer.append(record(n))
    await written(TRIM_AFTER + 500)
    await writer.close()
    await tables.close()
    assert writer.trims == 1  # once per backlog, not per flush
